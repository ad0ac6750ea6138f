//! The only module of vmm-node with `unsafe` code.
//!
//! It wraps the few operations that the safe crates (kvm-ioctls, vm-memory, vmm-sys-util)
//! leave `unsafe`: registering guest memory slots, loading an XSAVE area, sending the
//! vCPU "kick" signal to a thread, and reading host CPUID. Every block states why it holds.

use std::sync::OnceLock;

use kvm_bindings::{kvm_userspace_memory_region, kvm_xsave, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMem;

/// Errors from the raw KVM / OS operations of this module.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory slot {slot} at {guest_addr:#x} ({size_bytes} bytes)")]
    MemorySlot {
        slot: u32,
        guest_addr: u64,
        size_bytes: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A guest memory region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostMapping(u64),
    /// `KVM_SET_XSAVE` failed.
    #[error("KVM_SET_XSAVE failed")]
    SetXsave(#[source] kvm_ioctls::Error),
    /// Installing the vCPU kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

/// One KVM memory slot as registered: slot number, guest address, size, host address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

/// Describe the regions of `mem` as memory slots (slot `i` = region `i`).
pub fn memory_slots(mem: &GuestMem) -> Result<Vec<MemSlot>, SysError> {
    mem.iter()
        .enumerate()
        .map(|(i, region)| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| SysError::NoHostMapping(region.start_addr().0))?;
            Ok(MemSlot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size_bytes: region.len(),
                host_addr: host as u64,
            })
        })
        .collect()
}

/// Register (or re-register, e.g. to toggle dirty logging) `slots` with the VM.
///
/// `mem` must be the memory the slots were computed from: it is borrowed here so that the
/// mappings are alive for the duration of the call, and the caller (`Vm`) keeps `mem`
/// alive for as long as the VM fd exists.
pub fn register_memory_slots(
    vm: &VmFd,
    mem: &GuestMem,
    slots: &[MemSlot],
    log_dirty: bool,
) -> Result<(), SysError> {
    let current = memory_slots(mem)?;
    for s in slots {
        assert!(
            current.contains(s),
            "memory slot does not belong to the given guest memory"
        );
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: s.guest_addr,
            memory_size: s.size_bytes,
            userspace_addr: s.host_addr,
        };
        // SAFETY: the host range [host_addr, host_addr + size) is a live mapping owned by
        // `mem` (checked just above against `mem`'s regions); the `Vm` that owns `vm` also
        // owns `mem` and drops the VM fd (and with it the slots) before unmapping memory.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| SysError::MemorySlot {
            slot: s.slot,
            guest_addr: s.guest_addr,
            size_bytes: s.size_bytes,
            source,
        })?;
    }
    Ok(())
}

/// Load a saved XSAVE area into a vCPU.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), SysError> {
    // SAFETY: `xsave` is a complete `kvm_xsave` (4 KiB legacy layout) and this VMM never
    // enables KVM_CAP_XSAVE2, so the kernel reads exactly `size_of::<kvm_xsave>()` bytes.
    unsafe { vcpu.set_xsave(xsave) }.map_err(SysError::SetXsave)
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick signal handler once per process. Its only effect is that a
/// blocked `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() -> Result<(), SysError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler))
        .map_err(SysError::SignalHandler)
}

/// `pthread_self()` of the calling thread.
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Send the kick signal to `thread`.
///
/// The caller guarantees `thread` is a live thread of this process: vCPU threads publish
/// their id when they start and are only joined after they stop being kicked.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: see the function doc: `thread` is a live, not yet joined thread of this
    // process, and the kick signal has a handler installed, so delivery cannot kill us.
    let _ = unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Sub-error code of the `KVM_EXIT_INTERNAL_ERROR` exit that `vcpu.run()` just returned
/// (0 if the last exit was something else).
pub fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return 0;
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
    // member of the exit union; it is plain integers, valid for any bit pattern.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Host CPUID leaf `leaf`, subleaf `subleaf`: (eax, ebx, ecx, edx).
pub fn host_cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU and only reads processor information.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}
