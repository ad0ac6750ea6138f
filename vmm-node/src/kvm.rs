//! The only module of vmm-node with `unsafe` code.
//!
//! It wraps the few operations that the safe crates (kvm-ioctls, vm-memory, vmm-sys-util)
//! leave `unsafe`: registering guest memory slots, loading an XSAVE area, sending the
//! vCPU "kick" signal to a thread, reading host CPUID, and the TAP ioctls of virtio-net
//! (`TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`, `if_nametoindex`). Every block states
//! why it holds.

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
    /// The TAP device does not exist in this network namespace.
    #[error("TAP device {name} does not exist in this network namespace (create it first, e.g. `ip tuntap add dev {name} mode tap`)")]
    TapMissing { name: String },
    /// A TAP operation failed.
    #[error("TAP device {name}: {op} failed")]
    Tap {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD` = `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` = `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `IFF_VNET_HDR` (not in libc): frames carry a `virtio_net_hdr`.
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags member of the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

/// Whether a network interface called `name` exists in this process's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; if_nametoindex
    // only reads it and returns 0 when there is no such interface.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Attach to the existing TAP device `name` as `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with a
/// `vnet_hdr_bytes`-byte header, non-blocking and close-on-exec. A missing device is an
/// error (the VMM never creates TAPs: whoever owns the network does).
pub fn open_tap(name: &str, vnet_hdr_bytes: i32) -> Result<std::fs::File, SysError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |op: &'static str| {
        let name = name.to_string();
        move |source| SysError::Tap { name, op, source }
    };
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(err("checking the name")(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    }
    if !interface_exists(name) {
        return Err(SysError::TapMissing {
            name: name.to_string(),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(err("opening /dev/net/tun"))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd and `req` a 40-byte `struct ifreq` with a
    // NUL-terminated name (checked shorter than IFNAMSIZ, zero filled) and the flags member
    // set; TUNSETIFF reads and writes only those 40 bytes.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, TUNSETIFF, &mut req) } < 0 {
        return Err(err(
            "TUNSETIFF (attach as IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; is it a TAP not used by another process?)",
        )(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which refers to a live i32.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&file, TUNSETVNETHDRSZ, &vnet_hdr_bytes) } < 0 {
        return Err(err("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Tell the TAP which offloads (`TUN_F_*`) the reader of `tap` (the guest) accepts in
/// frames it receives.
pub fn tap_set_offload(tap: &std::fs::File, tun_flags: u32) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no user memory; `tap`
    // is an open TAP fd.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_val(tap, TUNSETOFFLOAD, tun_flags.into()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

/// Kernel thread id (`gettid`) of the calling thread.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid.unsigned_abs()
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

/// A new anonymous memory file (`memfd_create`, close-on-exec) named `name` for
/// debugging (`/proc/<pid>/fd` shows it): guest memory two processes can map.
pub fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a memfd name")
    })?;
    // SAFETY: memfd_create reads the NUL-terminated name, which outlives the call, and
    // returns a new descriptor or -1; it touches no other memory of this process.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The nice value vCPU threads set for themselves when they start (`i32::MIN`: none,
/// they keep their creator's). See [`set_vcpu_nice`].
static VCPU_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(i32::MIN);

/// Makes every vCPU thread started from now on in this process run at `nice` (a process
/// that runs one VM lowers its guest's priority while its control threads keep theirs).
pub fn set_vcpu_nice(nice: i32) {
    VCPU_NICE.store(nice, std::sync::atomic::Ordering::Relaxed);
}

/// The cgroup v1 `tasks` files every vCPU thread started from now on moves itself into.
/// See [`set_vcpu_cgroups`].
static VCPU_CGROUPS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Makes every vCPU thread started from now on in this process move itself into the
/// cgroups whose per-thread membership files (cgroup v1 `tasks`) are `tasks_files`, so a
/// cgroup can weigh and cap the guest's threads apart from the process's others.
pub fn set_vcpu_cgroups(tasks_files: Vec<std::path::PathBuf>) {
    *VCPU_CGROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = tasks_files;
}

/// Applies [`set_vcpu_nice`]'s value and [`set_vcpu_cgroups`]'s cgroups to the calling
/// (vCPU) thread, where they were set; a failure is logged and the thread runs on.
pub(crate) fn apply_vcpu_placement() {
    let nice = VCPU_NICE.load(std::sync::atomic::Ordering::Relaxed);
    if nice != i32::MIN {
        if let Err(e) = set_nice(nice) {
            tracing::warn!(error = %e, nice, "cannot lower the vCPU thread's priority");
        }
    }
    let files = VCPU_CGROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for f in files {
        // "0" is the writing thread itself (cgroup v1 `tasks`).
        if let Err(e) = std::fs::write(&f, "0") {
            tracing::warn!(error = %e, file = %f.display(), "cannot move the vCPU thread into its cgroup");
        }
    }
}

/// Sets the calling thread's nice value to `nice` (-20..=19; higher yields the CPU to
/// others). Threads it creates afterwards inherit it, so a process that calls this first
/// runs every later vCPU thread at that priority.
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of this process;
    // `who == 0` is the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's nice value.
pub fn nice() -> std::io::Result<i32> {
    thread_nice(0)
}

/// The nice value of thread `tid` of this host (0: the calling thread).
pub fn thread_nice(tid: u32) -> std::io::Result<i32> {
    // getpriority returns the nice value, and -1 both as a value and as an error: errno
    // tells them apart, so it is cleared first.
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life;
    // getpriority takes plain integers and touches no memory of this process.
    let r = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    if r == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    Ok(r)
}

/// Sets the nice value of thread `tid` (0: the calling thread). Raising a priority
/// (a lower value than the thread has) needs `CAP_SYS_NICE` or a permissive
/// `RLIMIT_NICE`; lowering one never does.
pub fn set_thread_nice(tid: u32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of this process.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Nanoseconds on `CLOCK_MONOTONIC`: one clock for every process of the host, so a
/// deadline one process sets can be judged by another (e.g. a VM worker's lease).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` into `ts`, which we own and which
    // outlives the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Whether `file` lives on tmpfs (a memfd does).
pub fn is_tmpfs(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `statfs` is a valid value of that plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes only into `st`, which outlives the call; the descriptor is
    // open (owned by `file`).
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

/// What [`seek_data_or_hole`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// `lseek(SEEK_DATA | SEEK_HOLE)`: the offset of the next data (or hole) in `file` at or
/// after `off`; `None` when there is no data at or after `off` (ENXIO). Moves `file`'s
/// offset.
pub fn seek_data_or_hole(
    file: &std::fs::File,
    off: u64,
    what: Seek,
) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(off)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset too large"))?;
    let whence = match what {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: lseek takes plain integers and touches no memory; the descriptor is open
    // (owned by `file`).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(u64::try_from(r).ok());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}
