//! The VM: KVM VM fd, guest memory, vCPU threads, device buses, and the lifecycle and
//! migration capabilities other crates call (see `ARCHITECTURE.md` (vmm-node: internal seams)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSetup};
use crate::config::{ConfigError, VmConfig};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORTS};
use crate::devices::serial::{Console, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORTS};
use crate::devices::{
    Bus, BusError, DiskSlots, IrqLine, MmioDevice, NetDevices, PioDevice, RateLimitedLog,
};
use crate::kvm::{self, MemSlot, SysError};
use crate::memory::{self, MemoryError};
use crate::state::{self, StateError, VmState};
use crate::vcpu::{self, Control, Request, StopReason, VcpuContext};
use crate::GuestMem;

/// How long pause/stop wait for vCPU threads to acknowledge.
pub const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Identity-map / TSS addresses KVM needs on Intel hosts (inside the MMIO gap).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors of VM lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// Invalid configuration.
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    /// Host facts could not be read.
    #[error("reading host facts")]
    Facts(#[from] crate::facts::FactsError),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// Low-level KVM / OS operation.
    #[error("KVM setup")]
    Sys(#[from] SysError),
    /// A KVM ioctl during setup.
    #[error("{op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating an eventfd or thread.
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Kernel loading / boot setup.
    #[error("boot setup")]
    Boot(#[from] boot::BootError),
    /// Device registration.
    #[error("device registration")]
    Bus(#[from] BusError),
    /// Saving / restoring state.
    #[error("VM state")]
    State(#[from] StateError),
    /// Serial state restore.
    #[error("serial device state")]
    Serial(#[from] crate::devices::serial::SerialError),
    /// vCPUs did not acknowledge in time.
    #[error("vCPU threads did not {0} within {VCPU_ACK_TIMEOUT:?}")]
    AckTimeout(&'static str),
    /// A disk operation without virtio-blk slots installed.
    #[error("this VM has no virtio-blk slots (none installed with install_disk_slots)")]
    NoDiskSlots,
    /// The configuration lists NICs but no virtio-net devices were installed.
    #[error("this VM has no NIC devices (none installed with install_net_devices)")]
    NoNetDevices,
    /// A NIC operation failed.
    #[error("NICs: {op}")]
    Net {
        op: &'static str,
        #[source]
        source: crate::devices::DeviceError,
    },
    /// A disk slot operation failed.
    #[error("disk slot {slot}: {op}")]
    Disk {
        slot: u8,
        op: &'static str,
        #[source]
        source: crate::devices::DeviceError,
    },
    /// Operation not valid in the current state.
    #[error("cannot {op} a VM that is {status}")]
    WrongState { op: &'static str, status: String },
}

fn kerr(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Run state of a VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum VmStatus {
    /// Created or paused: no vCPU runs guest code.
    Paused,
    /// vCPUs run.
    Running,
    /// Stopped for good.
    Stopped { reason: StopReason },
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmStatus::Paused => write!(f, "paused"),
            VmStatus::Running => write!(f, "running"),
            VmStatus::Stopped { reason } => write!(f, "stopped ({reason:?})"),
        }
    }
}

/// An interrupt line backed by an irqfd on the in-kernel irqchip.
pub struct IrqFdLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine for IrqFdLine {
    fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(gsi = self.gsi, error = %e, "cannot raise interrupt");
        }
    }
}

/// A running (or paused) virtual machine. Dropping it stops and joins every vCPU thread,
/// closes its fds and unmaps its memory.
pub struct Vm {
    config: VmConfig,
    console: Console,
    serial: Arc<Mutex<SerialDevice>>,
    com1_irq: Arc<dyn IrqLine>,
    ctl: Arc<Control>,
    pio: Arc<RwLock<Bus<dyn PioDevice>>>,
    mmio: Arc<RwLock<Bus<dyn MmioDevice>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    throttle_thread: Mutex<Option<JoinHandle<()>>>,
    boost: Arc<(Mutex<VcpuBoost>, std::sync::Condvar)>,
    has_pit: AtomicBool,
    tsc_khz: u32,
    msr_index_list: Vec<u32>,
    slots: Vec<MemSlot>,
    boot: Option<BootSetup>,
    disks: Mutex<Option<Arc<dyn DiskSlots>>>,
    nets: Mutex<Option<Arc<dyn NetDevices>>>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    vm_fd: Arc<VmFd>,
    // Last: unmapped after the VM fd (and its memory slots) are closed.
    memory: GuestMem,
}

/// The vCPU threads a [`Vm::boost_vcpus`] raised, with the nice value each had.
#[derive(Default)]
struct VcpuBoost {
    generation: u64,
    saved: Vec<(u32, i32)>,
}

impl VcpuBoost {
    fn restore(&mut self) {
        for (tid, nice) in self.saved.drain(..) {
            // Lowering a priority needs no privilege; a thread that ended meanwhile is gone.
            if let Err(e) = crate::kvm::set_thread_nice(tid, nice) {
                tracing::debug!(error = %e, tid, nice, "cannot give a vCPU thread its priority back");
            }
        }
    }
}

impl Vm {
    /// Create a VM with fresh memory and devices, its vCPU threads parked (paused), no
    /// kernel loaded: the migration target's starting point.
    pub fn new_paused(config: VmConfig) -> Result<Vm, VmError> {
        let host_mib = crate::facts::host_memory_mib()?;
        config.validate(host_mib)?;
        let mem = memory::allocate(config.memory_mib << 20)?;
        Self::with_memory(config, mem)
    }

    /// Create a VM and load its kernel; it stays paused until [`Vm::start`].
    pub fn create(config: VmConfig) -> Result<Vm, VmError> {
        let mut vm = Self::new_paused(config)?;
        vm.load_kernel()?;
        Ok(vm)
    }

    /// Create a paused VM around existing guest memory (e.g. a mapped snapshot file).
    pub fn with_memory(config: VmConfig, mem: GuestMem) -> Result<Vm, VmError> {
        let host_mib = crate::facts::host_memory_mib()?;
        config.validate(host_mib)?;
        kvm::install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?);
        let slots = kvm::memory_slots(&mem)?;
        kvm::register_memory_slots(&vm_fd, &mem, &slots, false)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(kerr("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kerr("KVM_CREATE_IRQCHIP"))?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;

        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for id in 0..u32::from(config.vcpus) {
            let fd = vm_fd
                .create_vcpu(id.into())
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&vcpu_cpuid(&supported, id))
                .map_err(kerr("KVM_SET_CPUID2"))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let tsc_khz = vcpus[0]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_tsc_khz()
            .map_err(kerr("KVM_GET_TSC_KHZ"))?;

        let ctl = Arc::new(Control::new(vcpus.len()));
        let console = Console::new();
        let com1_irq = new_irq_line(&vm_fd, COM1_IRQ)?;
        let vm = Vm {
            config,
            serial: Arc::new(Mutex::new(SerialDevice::new(
                console.clone(),
                com1_irq.clone(),
            ))),
            com1_irq: com1_irq.clone(),
            console,
            ctl,
            pio: Arc::new(RwLock::new(Bus::default())),
            mmio: Arc::new(RwLock::new(Bus::default())),
            threads: Mutex::new(Vec::new()),
            throttle_thread: Mutex::new(None),
            boost: Arc::default(),
            has_pit: AtomicBool::new(false),
            tsc_khz,
            msr_index_list,
            slots,
            boot: None,
            disks: Mutex::new(None),
            nets: Mutex::new(None),
            vcpus,
            vm_fd,
            memory: mem,
        };
        let ctl = vm.ctl.clone();
        let i8042 = I8042::new(
            Arc::new(AtomicBool::new(false)),
            Box::new(move || ctl.request_exit(StopReason::GuestReset)),
        );
        {
            let mut pio = vm.pio.write().unwrap_or_else(|e| e.into_inner());
            let serial: Arc<Mutex<dyn PioDevice>> = vm.serial.clone();
            pio.insert(COM1_PORT.into(), COM1_PORTS.into(), serial)?;
            pio.insert(
                I8042_PORT.into(),
                I8042_PORTS.into(),
                Arc::new(Mutex::new(i8042)),
            )?;
        }
        vm.spawn_vcpu_threads()?;
        tracing::info!(
            name = %vm.config.name,
            vcpus = vm.config.vcpus,
            memory_mib = vm.config.memory_mib,
            tsc_khz,
            "vm created"
        );
        Ok(vm)
    }

    fn spawn_vcpu_threads(&self) -> Result<(), VmError> {
        for (id, fd) in self.vcpus.iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u32,
                ctl: self.ctl.clone(),
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                unknown_io_log: Arc::new(Mutex::new(RateLimitedLog::new(
                    10,
                    Duration::from_secs(1),
                ))),
            };
            let fd = fd.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::kvm::apply_vcpu_placement();
                    vcpu::vcpu_thread(ctx, fd)
                })
                .map_err(|source| VmError::Os {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            self.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(h);
        }
        Ok(())
    }

    /// Load the configured kernel and set the boot vCPU registers (VM must be paused and
    /// never started).
    pub fn load_kernel(&mut self) -> Result<(), VmError> {
        self.require_paused("load a kernel into")?;
        let setup = boot::load(&self.config, &self.memory, self.tsc_khz)?;
        if setup.is_linux() && !self.has_pit.load(Ordering::SeqCst) {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            self.vm_fd
                .create_pit2(pit)
                .map_err(kerr("KVM_CREATE_PIT2"))?;
            self.has_pit.store(true, Ordering::SeqCst);
        }
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            if id == 0 {
                boot::setup_bsp(&fd, &setup)?;
            } else {
                boot::setup_test_guest_ap(&fd, id as u32, &setup)?;
            }
        }
        tracing::info!(kernel = %self.config.kernel.display(), entry = ?setup.entry, "kernel loaded");
        self.boot = Some(setup);
        Ok(())
    }

    fn require_paused(&self, op: &'static str) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Paused => Ok(()),
            s => Err(VmError::WrongState {
                op,
                status: s.to_string(),
            }),
        }
    }

    /// Kernel thread ids of the vCPU threads that have started.
    pub fn vcpu_thread_ids(&self) -> Vec<u32> {
        self.ctl.lock().tids.iter().flatten().copied().collect()
    }

    /// Runs the vCPU threads at nice `nice` for at most `for_at_most` (or until
    /// [`Vm::end_vcpu_boost`]), where that is a higher priority than theirs; each then gets
    /// its own nice value back. A live migration does this while the guest's network
    /// answers are watched most closely (the source's pre-copy, the target's first
    /// moments), so a guest whose vCPUs normally yield to the host's other work (the
    /// cluster's VM workers run them at nice 10) is not starved by the migration's own
    /// threads then. Needs `CAP_SYS_NICE` (or a permissive `RLIMIT_NICE`); without it the
    /// threads keep their priority. A boost already running ends first. Returns how
    /// many vCPU threads were raised.
    pub fn boost_vcpus(&self, nice: i32, for_at_most: Duration) -> usize {
        let tids = self.vcpu_thread_ids();
        let (lock, ended) = &*self.boost;
        let mut b = lock.lock().unwrap_or_else(|e| e.into_inner());
        b.restore();
        b.generation += 1;
        ended.notify_all();
        for tid in tids {
            match crate::kvm::thread_nice(tid) {
                Ok(own) if own > nice => match crate::kvm::set_thread_nice(tid, nice) {
                    Ok(()) => b.saved.push((tid, own)),
                    Err(e) => {
                        tracing::debug!(error = %e, tid, nice, "cannot raise a vCPU thread's priority")
                    }
                },
                _ => {}
            }
        }
        let raised = b.saved.len();
        if raised > 0 {
            let (boost, generation) = (self.boost.clone(), b.generation);
            // Waits for the time to pass or the boost to end (a new generation), whichever
            // comes first, so no timer outlives its boost.
            let timer = std::thread::Builder::new()
                .name("vcpu-boost".into())
                .spawn(move || {
                    let (lock, ended) = &*boost;
                    let b = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (mut b, _) = ended
                        .wait_timeout_while(b, for_at_most, |b| b.generation == generation)
                        .unwrap_or_else(|e| e.into_inner());
                    if b.generation == generation {
                        b.restore();
                    }
                });
            if timer.is_err() {
                // Without its timer the boost must not outlive this call.
                b.restore();
                return 0;
            }
        }
        raised
    }

    /// Ends a boost of [`Vm::boost_vcpus`] now (nothing if none runs).
    pub fn end_vcpu_boost(&self) {
        let (lock, ended) = &*self.boost;
        let mut b = lock.lock().unwrap_or_else(|e| e.into_inner());
        b.generation += 1;
        b.restore();
        ended.notify_all();
    }

    /// CPU time of the vCPU threads and guest memory resident on this host now (see
    /// [`crate::usage`]). A vCPU thread that has not started yet counts zero.
    pub fn usage(&self) -> Result<crate::usage::VmUsage, crate::usage::UsageError> {
        let tids: Vec<u32> = self.ctl.lock().tids.iter().flatten().copied().collect();
        let ranges: Vec<(u64, u64)> = crate::kvm::memory_slots(&self.memory)
            .map_err(crate::usage::UsageError::Mapping)?
            .iter()
            .map(|s| (s.host_addr, s.size_bytes))
            .collect();
        crate::usage::measure(&tids, &ranges)
    }

    /// Current run state.
    pub fn status(&self) -> VmStatus {
        let st = self.ctl.lock();
        match st.request {
            Request::Run => VmStatus::Running,
            Request::Pause => VmStatus::Paused,
            Request::Exit => VmStatus::Stopped {
                reason: st.stop_reason.clone().unwrap_or(StopReason::Requested),
            },
        }
    }

    /// Start (or resume) running guest code.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut st = self.ctl.lock();
        match st.request {
            Request::Exit => {
                return Err(VmError::WrongState {
                    op: "resume",
                    status: "stopped".into(),
                })
            }
            Request::Run => return Ok(()),
            Request::Pause => {}
        }
        if let Some(n) = self.net_devices() {
            n.resume();
        }
        st.request = Request::Run;
        self.ctl.kick_flag.store(false, Ordering::SeqCst);
        self.ctl.cond.notify_all();
        tracing::info!(name = %self.config.name, "vm resumed");
        Ok(())
    }

    /// Start a created VM (then the same as [`Vm::resume`]). Refuses to start a VM whose
    /// configuration lists disks when no virtio-blk slots were installed, rather than
    /// running it without them.
    pub fn start(&self) -> Result<(), VmError> {
        if !self.config.disks.is_empty() && self.disk_slots().is_none() {
            return Err(VmError::NoDiskSlots);
        }
        if !self.config.nics.is_empty() && self.net_devices().is_none() {
            return Err(VmError::NoNetDevices);
        }
        self.resume()
    }

    /// Stop every vCPU (kicked out of `KVM_RUN`, pending I/O completed) and wait until all
    /// acknowledge. Idempotent.
    pub fn pause(&self) -> Result<(), VmError> {
        {
            let mut st = self.ctl.lock();
            match st.request {
                Request::Exit => {
                    return Err(VmError::WrongState {
                        op: "pause",
                        status: "stopped".into(),
                    })
                }
                Request::Pause => {}
                Request::Run => {
                    st.request = Request::Pause;
                    self.ctl.kick_flag.store(true, Ordering::SeqCst);
                }
            }
        }
        // Wakes a vCPU thread sleeping for the guest or the throttle.
        self.ctl.cond.notify_all();
        let n = self.ctl.vcpus;
        self.ctl
            .wait_kicking(VCPU_ACK_TIMEOUT, |st| {
                st.request != Request::Pause || st.parked + st.exited == n
            })
            .map_err(|()| VmError::AckTimeout("pause"))?;
        if let VmStatus::Stopped { .. } = self.status() {
            return Err(VmError::WrongState {
                op: "pause",
                status: "stopped".into(),
            });
        }
        // NICs write guest memory from their own threads: stop them too, so a paused VM's
        // memory and device state hold still (snapshots, the migration blackout).
        if let Some(n) = self.net_devices() {
            n.pause();
        }
        tracing::info!(name = %self.config.name, "vm paused");
        Ok(())
    }

    /// Wait up to `timeout` for the VM to stop by itself; returns the reason if it did.
    pub fn wait_stopped(&self, timeout: Duration) -> Option<StopReason> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.ctl.lock();
        loop {
            if st.request == Request::Exit {
                return Some(st.stop_reason.clone().unwrap_or(StopReason::Requested));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .ctl
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stop the VM for good and join its vCPU threads. Idempotent.
    pub fn stop(&self) -> Result<(), VmError> {
        self.ctl.request_exit(StopReason::Requested);
        if let Some(n) = self.net_devices() {
            n.shutdown();
        }
        let n = self.ctl.vcpus;
        let r = self
            .ctl
            .wait_kicking(VCPU_ACK_TIMEOUT, |st| st.exited == n)
            .map_err(|()| VmError::AckTimeout("stop"));
        if r.is_ok() {
            let threads =
                std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
            for h in threads {
                let _ = h.join();
            }
        } else {
            tracing::error!(name = %self.config.name, "vCPU threads did not stop; leaking them");
        }
        if let Some(h) = self
            .throttle_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
        r
    }

    /// Stop the VM and release all its resources.
    pub fn destroy(self) -> Result<(), VmError> {
        self.stop()
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.memory
    }

    /// The console (log + live subscribers).
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// TSC frequency of the vCPUs in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The boot setup, when a kernel was loaded.
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.boot.as_ref()
    }

    /// The KVM VM fd (for device code that needs ioeventfds etc.).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// An interrupt line for `gsi` (irqfd on the in-kernel irqchip).
    pub fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, VmError> {
        Ok(new_irq_line(&self.vm_fd, gsi)?)
    }

    /// Put `dev` on the MMIO bus at `[base, base + len)` (allowed while running).
    pub fn register_mmio_device(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), VmError> {
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(base, len, dev)?;
        Ok(())
    }

    /// Remove the MMIO device registered at `base`.
    pub fn unregister_mmio_device(&self, base: u64) -> Option<Arc<Mutex<dyn MmioDevice>>> {
        self.mmio
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(base)
    }

    /// Install the VM's virtio-blk slots (done by the code that creates the devices, once).
    /// With `attach_configured`, the disks of `config().disks` are attached now (fresh boot);
    /// a restore passes false and lets `restore_state` reopen them.
    pub fn install_disk_slots(
        &self,
        slots: Arc<dyn DiskSlots>,
        attach_configured: bool,
    ) -> Result<(), VmError> {
        if attach_configured {
            for d in &self.config.disks {
                slots.attach(d).map_err(|source| VmError::Disk {
                    slot: d.slot,
                    op: "attach",
                    source,
                })?;
            }
        }
        *self.disks.lock().unwrap_or_else(|e| e.into_inner()) = Some(slots);
        Ok(())
    }

    /// Install the VM's NICs (done once by the code that creates the devices; they start
    /// paused and follow the VM's pause and resume from then on).
    pub fn install_net_devices(&self, nets: Arc<dyn NetDevices>) {
        if self.status() == VmStatus::Running {
            nets.resume();
        }
        *self.nets.lock().unwrap_or_else(|e| e.into_inner()) = Some(nets);
    }

    fn net_devices(&self) -> Option<Arc<dyn NetDevices>> {
        self.nets.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn disk_slots(&self) -> Option<Arc<dyn DiskSlots>> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Hot-add a disk to a running (or paused) VM.
    pub fn attach_disk(&self, disk: &crate::config::DiskSlotConfig) -> Result<(), VmError> {
        if usize::from(disk.slot) >= crate::config::VIRTIO_BLK_SLOTS {
            return Err(ConfigError::DiskSlot(disk.slot).into());
        }
        let slots = self.disk_slots().ok_or(VmError::NoDiskSlots)?;
        slots.attach(disk).map_err(|source| VmError::Disk {
            slot: disk.slot,
            op: "attach",
            source,
        })?;
        tracing::info!(slot = disk.slot, path = %disk.path.display(), "disk attached");
        Ok(())
    }

    /// Hot-remove the disk in `slot`.
    pub fn detach_disk(&self, slot: u8) -> Result<(), VmError> {
        let slots = self.disk_slots().ok_or(VmError::NoDiskSlots)?;
        slots.detach(slot).map_err(|source| VmError::Disk {
            slot,
            op: "detach",
            source,
        })?;
        tracing::info!(slot, "disk detached");
        Ok(())
    }

    /// Hot-add a NIC on TAP `nic.tap_name` into slot `nic.slot` (lowest free when `None`).
    /// The NIC is checked against the VM's current NICs (MAC, TAP, slot, MTU). Returns
    /// its slot.
    pub fn attach_nic(&self, nic: &crate::config::NicConfig) -> Result<u8, VmError> {
        let nets = self.net_devices().ok_or(VmError::NoNetDevices)?;
        let mut check = self.config.clone();
        check.nics = nets.configs();
        let mut new = nic.clone();
        if new.slot.is_none() {
            // Checked in the slot it would get; the device picks the same one.
            new.slot = (0..crate::config::NICS_MAX as u8)
                .find(|s| check.nics.iter().all(|n| n.slot != Some(*s)));
        }
        if new.slot.is_none() {
            return Err(VmError::Net {
                op: "attach",
                source: Box::new(crate::devices::virtio::net::VirtioNetError::NoFreeSlot),
            });
        }
        check.nics.push(new.clone());
        check.validate_nics()?;
        let slot = nets.attach(&new).map_err(|source| VmError::Net {
            op: "attach",
            source,
        })?;
        tracing::info!(slot, tap = %nic.tap_name, mac = %nic.mac, mtu = nic.mtu, "nic attached");
        Ok(slot)
    }

    /// Hot-remove the NIC with MAC `mac` (its slot empties, its TAP is closed).
    pub fn detach_nic(&self, mac: &str) -> Result<crate::config::NicConfig, VmError> {
        let nets = self.net_devices().ok_or(VmError::NoNetDevices)?;
        nets.detach(mac).map_err(|source| VmError::Net {
            op: "detach",
            source,
        })
    }

    /// The configuration with the NICs present now (hot-added ones included, removed ones
    /// left out, each with its slot): what a snapshot or a migration target must build.
    pub fn current_config(&self) -> VmConfig {
        let mut c = self.config.clone();
        if let Some(n) = self.net_devices() {
            c.nics = n.configs();
        }
        c
    }

    /// Flush and close every disk (storage hand-off before a migration switchover). A VM
    /// without disk slots has nothing to do.
    pub fn detach_all_disks(&self) -> Result<(), VmError> {
        match self.disk_slots() {
            Some(s) => s.detach_all().map_err(|source| VmError::Disk {
                slot: 0,
                op: "detach all",
                source,
            }),
            None => Ok(()),
        }
    }

    /// Announce every NIC's MAC on its TAP while the VM is still paused (a migration
    /// target as the state arrives); see `NetDevices::announce_early`. Does nothing for a
    /// running VM or one without NICs.
    pub fn announce_nics_early(&self) {
        if self.status() != VmStatus::Paused {
            return;
        }
        if let Some(n) = self.net_devices() {
            n.announce_early();
        }
    }

    /// Complete state (vCPUs, VM-wide, devices), without memory. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        self.require_paused("save the state of")?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.push(state::save_vcpu(
                &fd,
                id as u32,
                &self.msr_index_list,
                true,
            )?);
        }
        let vm = state::save_vm(
            &self.vm_fd,
            true,
            self.has_pit.load(Ordering::SeqCst),
            self.tsc_khz,
        )?;
        let devices = state::DeviceStates {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            disks: self.disk_slots().map(|d| d.save()).unwrap_or_default(),
            nics: self.net_devices().map(|n| n.save()).unwrap_or_default(),
        };
        Ok(VmState { vcpus, vm, devices })
    }

    /// Load `st` into this paused VM. Guest time (TSC, kvmclock) is advanced by the wall
    /// time elapsed since the state was saved.
    pub fn restore_state(&self, st: &VmState) -> Result<(), VmError> {
        self.require_paused("restore state into")?;
        if st.vcpus.len() != self.vcpus.len() {
            return Err(StateError::VcpuCount {
                saved: st.vcpus.len(),
                actual: self.vcpus.len(),
            }
            .into());
        }
        let elapsed_ns = state::unix_now_ns()
            .saturating_sub(st.vm.saved_at_unix_ns)
            .min(u64::MAX.into()) as u64;
        if st.vm.pit.is_some() && !self.has_pit.load(Ordering::SeqCst) {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            self.vm_fd
                .create_pit2(pit)
                .map_err(kerr("KVM_CREATE_PIT2"))?;
            self.has_pit.store(true, Ordering::SeqCst);
        }
        state::restore_vm(&self.vm_fd, &st.vm, elapsed_ns)?;
        for (fd, vst) in self.vcpus.iter().zip(&st.vcpus) {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            if st.vm.tsc_khz != self.tsc_khz {
                if let Err(e) = fd.set_tsc_khz(st.vm.tsc_khz) {
                    tracing::warn!(saved_khz = st.vm.tsc_khz, host_khz = self.tsc_khz, error = %e,
                        "cannot set the guest TSC frequency; guest time will drift");
                }
            }
            let tsc = state::advance_tsc(vst.tsc, st.vm.tsc_khz, elapsed_ns);
            state::restore_vcpu(&fd, vst, tsc)?;
        }
        *self.serial.lock().unwrap_or_else(|e| e.into_inner()) = SerialDevice::from_state(
            &st.devices.serial,
            self.console.clone(),
            self.com1_irq.clone(),
        )?;
        if !st.devices.disks.is_empty() {
            let slots = self.disk_slots().ok_or(VmError::NoDiskSlots)?;
            slots
                .restore(&st.devices.disks, &self.config.disks)
                .map_err(|source| VmError::Disk {
                    slot: 0,
                    op: "restore",
                    source,
                })?;
        }
        if !st.devices.nics.is_empty() || !self.config.nics.is_empty() {
            let nets = self.net_devices().ok_or(VmError::NoNetDevices)?;
            nets.restore(&st.devices.nics)
                .map_err(|source| VmError::Net {
                    op: "restore",
                    source,
                })?;
        }
        tracing::info!(name = %self.config.name, elapsed_ms = elapsed_ns / 1_000_000, "vm state restored");
        Ok(())
    }

    /// Start tracking guest writes (KVM dirty log + the device write bitmap).
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        // Clear what devices wrote before tracking starts.
        for r in self.memory.iter() {
            let mapping: &vm_memory::mmap::MmapRegion<_> = r;
            mapping.bitmap().reset();
        }
        kvm::register_memory_slots(&self.vm_fd, &self.memory, &self.slots, true)?;
        Ok(())
    }

    /// Stop tracking guest writes.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        kvm::register_memory_slots(&self.vm_fd, &self.memory, &self.slots, false)?;
        Ok(())
    }

    /// Pages written since the last call (or [`Vm::start_dirty_log`]), one bitmap per
    /// memory region (bit `i` of word `i / 64` = page `i` of the region, 4 KiB pages),
    /// KVM's dirty log ORed with the device write bitmap; both are cleared.
    pub fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (slot, region) in self.slots.iter().zip(self.memory.iter()) {
            let mut bits = self
                .vm_fd
                .get_dirty_log(slot.slot, slot.size_bytes as usize)
                .map_err(kerr("KVM_GET_DIRTY_LOG"))?;
            let mapping: &vm_memory::mmap::MmapRegion<_> = region;
            let dev = mapping.bitmap().get_and_reset();
            for (b, d) in bits.iter_mut().zip(dev) {
                *b |= d;
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Auto-converge: vCPU threads sleep `percent` of wall time (0 turns it off).
    pub fn set_throttle(&self, percent: u8) {
        let p = percent.min(99);
        self.ctl.throttle_percent.store(p, Ordering::SeqCst);
        let mut slot = self
            .throttle_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|h| h.is_finished()) {
            if let Some(h) = slot.take() {
                let _ = h.join();
            }
        }
        if p > 0 && slot.is_none() {
            let ctl = self.ctl.clone();
            *slot = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(vcpu::THROTTLE_PERIOD_MS));
                    if ctl.throttle_percent.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    let st = ctl.lock();
                    match st.request {
                        Request::Exit => return,
                        Request::Run => Control::kick_all(&st),
                        Request::Pause => {}
                    }
                })
                .ok();
        }
    }

    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle_percent.load(Ordering::SeqCst)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "stopping VM on drop");
        }
    }
}

fn new_irq_line(vm_fd: &VmFd, gsi: u32) -> Result<Arc<IrqFdLine>, VmError> {
    let evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| VmError::Os {
            what: "creating an eventfd",
            source,
        })?;
    vm_fd.register_irqfd(&evt, gsi).map_err(kerr("KVM_IRQFD"))?;
    Ok(Arc::new(IrqFdLine { evt, gsi }))
}

/// CPUID for vCPU `id`: KVM's supported set with the APIC ids patched.
fn vcpu_cpuid(supported: &CpuId, id: u32) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_carries_apic_id() {
        let kvm = Kvm::new().expect("cannot open /dev/kvm: the VMM tests need KVM");
        let sup = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let c = vcpu_cpuid(&sup, 5);
        if let Some(e) = c.as_slice().iter().find(|e| e.function == 1) {
            assert_eq!(e.ebx >> 24, 5);
        }
    }
}
