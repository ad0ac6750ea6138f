//! Serializable VM state (everything but guest memory) and the KVM save/restore sequences.
//!
//! Ordering follows KVM's pitfalls: on save `MP_STATE` is read first (reading it lets KVM
//! settle pending APIC events); on restore `CPUID → MP_STATE → REGS/SREGS → XSAVE/XCRS →
//! DEBUGREGS → LAPIC → MSRs (TSC last among them) → VCPU_EVENTS`.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialDeviceState;

/// MSR index of the time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;

/// MSRs saved per vCPU when KVM reports them (TSC is handled separately).
pub const SAVED_MSRS: &[u32] = &[
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
];

/// Errors of state save/restore.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{op} failed on vcpu {vcpu}")]
    Vcpu {
        op: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM-wide KVM ioctl failed.
    #[error("{op} failed")]
    Vm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting XSAVE failed.
    #[error("restoring xsave of vcpu {vcpu}")]
    Xsave {
        vcpu: u32,
        #[source]
        source: crate::kvm::SysError,
    },
    /// Fewer MSRs were accepted than given.
    #[error("vcpu {vcpu}: KVM accepted {accepted} of {given} MSRs")]
    Msrs {
        vcpu: u32,
        accepted: usize,
        given: usize,
    },
    /// CPUID list could not be built.
    #[error("saved CPUID has too many entries")]
    CpuidList,
    /// MSR list could not be built.
    #[error("building the MSR list")]
    MsrList,
    /// State does not fit this VM.
    #[error("saved state has {saved} vcpus, this VM has {actual}")]
    VcpuCount { saved: usize, actual: usize },
}

/// Saved state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value) of the MSRs KVM returned, TSC excluded.
    pub msrs: Vec<(u32, u64)>,
    /// Guest TSC when saved.
    pub tsc: u64,
    pub vcpu_events: kvm_vcpu_events,
}

/// VM-wide KVM state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmWideState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC (present when the VM has an in-kernel irqchip).
    pub irqchips: Vec<kvm_irqchip>,
    /// PIT (Linux guests).
    pub pit: Option<kvm_pit_state2>,
    /// TSC frequency of the vCPUs in kHz.
    pub tsc_khz: u32,
    /// Host wall clock at save, ns since the Unix epoch (to advance guest time on restore).
    pub saved_at_unix_ns: u128,
}

/// State of one virtio-blk slot as far as core knows it (the device's own state is an
/// opaque serialized blob owned by the virtio module).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSlotState {
    pub slot: u8,
    /// bincode of the virtio device's `save_state()`.
    pub device: Vec<u8>,
}

/// State of one NIC (virtio-net slot) as far as core knows it: an opaque blob owned by the
/// virtio module, which versions it itself (`devices::virtio::net::NetState`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicState {
    pub slot: u8,
    /// Encoded device state (`NetState::encode`).
    pub device: Vec<u8>,
}

/// State of the emulated devices.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub disks: Vec<DiskSlotState>,
    /// One entry per NIC (added with NICs: see [`VmStateV1`] for states saved before).
    pub nics: Vec<NicState>,
}

/// Complete VM state without guest memory: what snapshots and migration transfer.
///
/// Layout versions (bincode, not self-describing, so every layout has its own type):
/// * 2 (this type): `devices` has `nics`.
/// * 1 ([`VmStateV1`]): before NICs existed. Snapshot files say which one they hold in
///   their header; a migration state is decoded as version 2 first and as version 1 when
///   that fails (a version-1 state is too short for version 2, and a version-2 state has
///   trailing bytes for version 1, so at most one decodes).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmWideState,
    pub devices: DeviceStates,
}

/// Device states as saved before NICs existed (layout version 1).
#[derive(Serialize, Deserialize)]
pub struct DeviceStatesV1 {
    pub serial: SerialDeviceState,
    pub disks: Vec<DiskSlotState>,
}

/// [`VmState`] layout version 1 (before NICs existed); read only, converted on load.
#[derive(Serialize, Deserialize)]
pub struct VmStateV1 {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmWideState,
    pub devices: DeviceStatesV1,
}

impl From<VmStateV1> for VmState {
    fn from(v1: VmStateV1) -> Self {
        VmState {
            vcpus: v1.vcpus,
            vm: v1.vm,
            devices: DeviceStates {
                serial: v1.devices.serial,
                disks: v1.devices.disks,
                nics: Vec::new(),
            },
        }
    }
}

/// Decode a VM state of layout version 2 or 1 with `opts` (which must reject trailing
/// bytes). On failure the version-2 error is returned.
pub fn decode_any_version<O: bincode::Options + Copy>(
    opts: O,
    bytes: &[u8],
) -> Result<VmState, bincode::Error> {
    match opts.deserialize::<VmState>(bytes) {
        Ok(st) => Ok(st),
        Err(e) => opts
            .deserialize::<VmStateV1>(bytes)
            .map(VmState::from)
            .map_err(|_| e),
    }
}

fn verr(op: &'static str, vcpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu { op, vcpu, source }
}

/// Read the state of a stopped vCPU (not inside `KVM_RUN`, pending I/O completed).
pub fn save_vcpu(
    fd: &VcpuFd,
    id: u32,
    msr_index_list: &[u32],
    has_irqchip: bool,
) -> Result<VcpuState, StateError> {
    // MP_STATE first.
    let mp_state = fd.get_mp_state().map_err(verr("KVM_GET_MP_STATE", id))?;
    let regs = fd.get_regs().map_err(verr("KVM_GET_REGS", id))?;
    let sregs = fd.get_sregs().map_err(verr("KVM_GET_SREGS", id))?;
    let xsave = fd.get_xsave().map_err(verr("KVM_GET_XSAVE", id))?;
    let xcrs = fd.get_xcrs().ok();
    let debugregs = fd.get_debug_regs().map_err(verr("KVM_GET_DEBUGREGS", id))?;
    let lapic = if has_irqchip {
        Some(fd.get_lapic().map_err(verr("KVM_GET_LAPIC", id))?)
    } else {
        None
    };
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(verr("KVM_GET_CPUID2", id))?
        .as_slice()
        .to_vec();
    let wanted: Vec<u32> = SAVED_MSRS
        .iter()
        .copied()
        .filter(|m| msr_index_list.contains(m))
        .chain(std::iter::once(MSR_IA32_TSC))
        .collect();
    let mut msrs = Vec::new();
    let mut tsc = 0;
    // Read one at a time: KVM stops at the first MSR it cannot read.
    for index in wanted {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| StateError::MsrList)?;
        if fd.get_msrs(&mut m).map_err(verr("KVM_GET_MSRS", id))? == 1 {
            let v = m.as_slice()[0].data;
            if index == MSR_IA32_TSC {
                tsc = v;
            } else {
                msrs.push((index, v));
            }
        }
    }
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(verr("KVM_GET_VCPU_EVENTS", id))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        tsc,
        vcpu_events,
    })
}

/// Load `st` into a fresh, stopped vCPU; its TSC is set to `tsc`.
pub fn restore_vcpu(fd: &VcpuFd, st: &VcpuState, tsc: u64) -> Result<(), StateError> {
    let id = st.id;
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|_| StateError::CpuidList)?;
    fd.set_cpuid2(&cpuid).map_err(verr("KVM_SET_CPUID2", id))?;
    fd.set_mp_state(st.mp_state)
        .map_err(verr("KVM_SET_MP_STATE", id))?;
    fd.set_regs(&st.regs).map_err(verr("KVM_SET_REGS", id))?;
    fd.set_sregs(&st.sregs).map_err(verr("KVM_SET_SREGS", id))?;
    crate::kvm::set_xsave(fd, &st.xsave)
        .map_err(|source| StateError::Xsave { vcpu: id, source })?;
    if let Some(x) = &st.xcrs {
        fd.set_xcrs(x).map_err(verr("KVM_SET_XCRS", id))?;
    }
    fd.set_debug_regs(&st.debugregs)
        .map_err(verr("KVM_SET_DEBUGREGS", id))?;
    if let Some(l) = &st.lapic {
        fd.set_lapic(l).map_err(verr("KVM_SET_LAPIC", id))?;
    }
    let entries: Vec<kvm_msr_entry> = st
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .chain(std::iter::once(kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: tsc,
            ..Default::default()
        }))
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrList)?;
    let accepted = fd.set_msrs(&msrs).map_err(verr("KVM_SET_MSRS", id))?;
    if accepted != entries.len() {
        return Err(StateError::Msrs {
            vcpu: id,
            accepted,
            given: entries.len(),
        });
    }
    fd.set_vcpu_events(&st.vcpu_events)
        .map_err(verr("KVM_SET_VCPU_EVENTS", id))?;
    Ok(())
}

fn vmerr(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { op, source }
}

/// Read VM-wide state.
pub fn save_vm(
    vm: &VmFd,
    has_irqchip: bool,
    has_pit: bool,
    tsc_khz: u32,
) -> Result<VmWideState, StateError> {
    let clock = vm.get_clock().map_err(vmerr("KVM_GET_CLOCK"))?;
    let mut irqchips = Vec::new();
    if has_irqchip {
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(vmerr("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
    }
    let pit = if has_pit {
        Some(vm.get_pit2().map_err(vmerr("KVM_GET_PIT2"))?)
    } else {
        None
    };
    Ok(VmWideState {
        clock,
        irqchips,
        pit,
        tsc_khz,
        saved_at_unix_ns: unix_now_ns(),
    })
}

/// Load VM-wide state; kvmclock is advanced by `elapsed_ns`.
pub fn restore_vm(vm: &VmFd, st: &VmWideState, elapsed_ns: u64) -> Result<(), StateError> {
    if let Some(p) = &st.pit {
        vm.set_pit2(p).map_err(vmerr("KVM_SET_PIT2"))?;
    }
    for c in &st.irqchips {
        vm.set_irqchip(c).map_err(vmerr("KVM_SET_IRQCHIP"))?;
    }
    let clock = kvm_clock_data {
        clock: st.clock.clock.wrapping_add(elapsed_ns),
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(vmerr("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Host wall clock in ns since the Unix epoch.
pub fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Guest TSC after `elapsed_ns` of real time at `tsc_khz`.
pub fn advance_tsc(tsc: u64, tsc_khz: u32, elapsed_ns: u64) -> u64 {
    let ticks = (elapsed_ns as u128 * tsc_khz as u128) / 1_000_000;
    tsc.wrapping_add(ticks as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_advances_by_elapsed_time() {
        assert_eq!(
            advance_tsc(1000, 2_000_000, 1_000_000_000),
            1000 + 2_000_000_000
        );
        assert_eq!(advance_tsc(5, 1, 0), 5);
    }
}
