//! vCPU threads: the `KVM_RUN` loop, exit dispatch to the I/O buses, and the pause/stop
//! protocol shared with [`crate::vm::Vm`].
//!
//! Protocol: a controller sets the requested run state in [`Control`] and raises
//! `kick_flag`, then sends the kick signal to vCPU threads until each acknowledges. A vCPU
//! thread that sees `kick_flag` re-enters `KVM_RUN` once with `immediate_exit = 1`, which
//! completes a pending I/O instruction without running guest code, and then parks on the
//! condition variable. While parked it holds no lock on its `VcpuFd`, so the controller can
//! read or write its state.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::devices::{Bus, MmioDevice, PioDevice, RateLimitedLog};

/// Port the test guest writes a 32-bit microsecond count to, to sleep (yield the host CPU).
pub const GUEST_SLEEP_PORT: u16 = 0x5f0;
/// Port the test guest writes a 32-bit code to, to stop the VM.
pub const GUEST_EXIT_PORT: u16 = 0x5f4;
/// Longest sleep a guest may request through [`GUEST_SLEEP_PORT`].
pub const GUEST_SLEEP_US_MAX: u32 = 10_000;
/// Period of the auto-converge throttle.
pub const THROTTLE_PERIOD_MS: u64 = 20;

/// Why a VM stopped running for good.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum StopReason {
    /// `Vm::stop`/`destroy` was called.
    Requested,
    /// The guest wrote its exit port.
    GuestExit { code: u32 },
    /// The guest reset the machine (i8042) or triple-faulted (KVM shutdown exit).
    GuestReset,
    /// A vCPU failed; the message says how.
    VcpuError { vcpu: u32, message: String },
    /// The process that ran the VM is gone (e.g. a VM worker process was killed); set by
    /// whoever watched it, never by the VMM itself.
    ProcessGone { message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Run,
    Pause,
    Exit,
}

pub(crate) struct CtlState {
    pub request: Request,
    pub parked: usize,
    pub exited: usize,
    pub threads: Vec<Option<libc::pthread_t>>,
    /// Kernel thread id of each vCPU thread once it started (kept after it exits: its CPU
    /// time is read from `/proc/self/task/<tid>/schedstat`, see `crate::usage`).
    pub tids: Vec<Option<u32>>,
    pub stop_reason: Option<StopReason>,
}

/// Run-state control shared by the VM and its vCPU threads.
pub(crate) struct Control {
    pub state: Mutex<CtlState>,
    pub cond: Condvar,
    pub kick_flag: AtomicBool,
    pub throttle_percent: AtomicU8,
    pub vcpus: usize,
}

impl Control {
    pub fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(CtlState {
                request: Request::Pause,
                parked: 0,
                exited: 0,
                threads: vec![None; vcpus],
                tids: vec![None; vcpus],
                stop_reason: None,
            }),
            cond: Condvar::new(),
            kick_flag: AtomicBool::new(true),
            throttle_percent: AtomicU8::new(0),
            vcpus,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleep for `d` on a vCPU thread (the guest's sleep port, the throttle), or less if a
    /// kick is raised meanwhile: a pause or a stop does not wait for the sleep to end
    /// (the kick's signal does not cut a sleep short). Whoever raises the kick notifies
    /// `cond` after it.
    pub fn sleep_unless_kicked(&self, d: Duration) {
        let st = self.lock();
        let _ = self
            .cond
            .wait_timeout_while(st, d, |_| !self.kick_flag.load(Ordering::SeqCst));
    }

    /// Kick every live vCPU thread (caller holds the state lock, so none is joined).
    pub fn kick_all(st: &CtlState) {
        for t in st.threads.iter().flatten() {
            crate::kvm::kick_thread(*t);
        }
    }

    /// Stop the VM for good (from any thread).
    pub fn request_exit(&self, reason: StopReason) {
        let mut st = self.lock();
        if st.request != Request::Exit {
            st.request = Request::Exit;
            st.stop_reason.get_or_insert(reason);
        }
        self.kick_flag.store(true, Ordering::SeqCst);
        Self::kick_all(&st);
        self.cond.notify_all();
    }

    /// Wait until `done(state)` holds, kicking vCPU threads every millisecond.
    pub fn wait_kicking(
        &self,
        timeout: Duration,
        done: impl Fn(&CtlState) -> bool,
    ) -> Result<(), ()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if done(&st) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(());
            }
            Self::kick_all(&st);
            st = self
                .cond
                .wait_timeout(st, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a vCPU thread needs besides its fd.
pub(crate) struct VcpuContext {
    pub id: u32,
    pub ctl: Arc<Control>,
    pub pio: Arc<RwLock<Bus<dyn PioDevice>>>,
    pub mmio: Arc<RwLock<Bus<dyn MmioDevice>>>,
    pub unknown_io_log: Arc<Mutex<RateLimitedLog>>,
}

enum Flow {
    Continue,
    Stop(StopReason),
}

impl VcpuContext {
    fn log_unknown(&self, what: &str, addr: u64, len: usize, write: bool) {
        let mut rl = self
            .unknown_io_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = rl.allow(Instant::now()) {
            tracing::warn!(
                vcpu = self.id,
                kind = what,
                addr = format_args!("{addr:#x}"),
                len,
                write,
                suppressed,
                "guest accessed an address with no device"
            );
        }
    }

    fn io_out(&self, port: u16, data: &[u8]) -> Flow {
        match port {
            GUEST_SLEEP_PORT => {
                let us = le_u32(data).min(GUEST_SLEEP_US_MAX);
                self.ctl
                    .sleep_unless_kicked(Duration::from_micros(us.into()));
                return Flow::Continue;
            }
            GUEST_EXIT_PORT => return Flow::Stop(StopReason::GuestExit { code: le_u32(data) }),
            // POST/delay port and PCI configuration (no PCI bus): silently ignored.
            0x80 | 0xcf8..=0xcff => return Flow::Continue,
            _ => {}
        }
        let bus = self.pio.read().unwrap_or_else(|e| e.into_inner());
        match bus.find(port.into()) {
            Some((off, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pio_write(off as u16, data),
            None => self.log_unknown("pio", port.into(), data.len(), true),
        }
        Flow::Continue
    }

    fn io_in(&self, port: u16, data: &mut [u8]) {
        let bus = self.pio.read().unwrap_or_else(|e| e.into_inner());
        match bus.find(port.into()) {
            Some((off, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pio_read(off as u16, data),
            None => {
                data.fill(0xff);
                if !matches!(port, 0x80 | 0xcf8..=0xcff) {
                    self.log_unknown("pio", port.into(), data.len(), false);
                }
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let bus = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        match bus.find(addr) {
            Some((off, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_read(off, data),
            None => {
                data.fill(0xff);
                self.log_unknown("mmio", addr, data.len(), false);
            }
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let bus = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        match bus.find(addr) {
            Some((off, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_write(off, data),
            None => self.log_unknown("mmio", addr, data.len(), true),
        }
    }

    /// Park until allowed to run; returns false when the thread must exit.
    fn park(&self) -> bool {
        let mut st = self.ctl.lock();
        let mut counted = false;
        loop {
            match st.request {
                Request::Exit => {
                    if counted {
                        st.parked -= 1;
                    }
                    st.exited += 1;
                    st.threads[self.id as usize] = None;
                    self.ctl.cond.notify_all();
                    return false;
                }
                Request::Pause => {
                    if !counted {
                        st.parked += 1;
                        counted = true;
                        self.ctl.cond.notify_all();
                    }
                    st = self.ctl.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                Request::Run => {
                    if counted {
                        st.parked -= 1;
                    }
                    return true;
                }
            }
        }
    }

    /// Run guest code until a kick asks this thread to park; returns a stop reason if the
    /// guest (or an error) ended the VM.
    fn run_until_kicked(&self, fd: &mut VcpuFd) -> Option<StopReason> {
        loop {
            if self.ctl.kick_flag.load(Ordering::SeqCst) {
                // Complete a pending I/O or MMIO read without running guest code.
                fd.set_kvm_immediate_exit(1);
                let _ = fd.run();
                fd.set_kvm_immediate_exit(0);
                return None;
            }
            let flow = match fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.io_out(port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.io_in(port, data);
                    Flow::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio_read(addr, data);
                    Flow::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio_write(addr, data);
                    Flow::Continue
                }
                Ok(VcpuExit::Shutdown) => {
                    let regs = fd.get_regs().unwrap_or_default();
                    let sregs = fd.get_sregs().unwrap_or_default();
                    tracing::info!(
                        vcpu = self.id,
                        rip = format_args!("{:#x}", regs.rip),
                        rsp = format_args!("{:#x}", regs.rsp),
                        rflags = format_args!("{:#x}", regs.rflags),
                        cs = sregs.cs.selector,
                        cr0 = format_args!("{:#x}", sregs.cr0),
                        efer = format_args!("{:#x}", sregs.efer),
                        "guest shutdown (triple fault or reset)"
                    );
                    Flow::Stop(StopReason::GuestReset)
                }
                Ok(VcpuExit::Hlt) => Flow::Stop(StopReason::VcpuError {
                    vcpu: self.id,
                    message: "guest halted with interrupts disabled".into(),
                }),
                Ok(VcpuExit::InternalError) => {
                    let suberror = crate::kvm::internal_error_suberror(fd);
                    let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
                    Flow::Stop(StopReason::VcpuError {
                        vcpu: self.id,
                        message: format!(
                            "KVM internal error (suberror {suberror}) at rip {rip:#x}: \
                             KVM could not emulate a guest instruction"
                        ),
                    })
                }
                Ok(other) => Flow::Stop(StopReason::VcpuError {
                    vcpu: self.id,
                    message: format!("unhandled KVM exit {other:?}"),
                }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    let p = self.ctl.throttle_percent.load(Ordering::Relaxed);
                    if p > 0 {
                        self.ctl.sleep_unless_kicked(Duration::from_millis(
                            THROTTLE_PERIOD_MS * u64::from(p.min(99)) / 100,
                        ));
                    }
                    Flow::Continue
                }
                Err(e) => Flow::Stop(StopReason::VcpuError {
                    vcpu: self.id,
                    message: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Flow::Stop(reason) = flow {
                return Some(reason);
            }
        }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Body of a vCPU thread.
pub(crate) fn vcpu_thread(ctx: VcpuContext, fd: Arc<Mutex<VcpuFd>>) {
    {
        let mut st = ctx.ctl.lock();
        st.threads[ctx.id as usize] = Some(crate::kvm::current_thread());
        st.tids[ctx.id as usize] = Some(crate::kvm::current_tid());
    }
    while ctx.park() {
        let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = ctx.run_until_kicked(&mut guard) {
            drop(guard);
            match &reason {
                StopReason::VcpuError { .. } => {
                    tracing::error!(vcpu = ctx.id, ?reason, "vcpu stopped the VM")
                }
                _ => tracing::info!(vcpu = ctx.id, ?reason, "guest stopped the VM"),
            }
            ctx.ctl.request_exit(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU thread sleeping for the guest or the throttle wakes when a pause raises the
    /// kick (the kick's signal alone would not cut the sleep short): an hour's sleep ends
    /// as soon as the kick is raised.
    #[test]
    fn a_kick_cuts_a_guest_sleep_short() {
        let ctl = Arc::new(Control::new(1));
        ctl.kick_flag.store(false, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        let sleeper = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                ctl.sleep_unless_kicked(Duration::from_secs(3600));
                let _ = tx.send(());
            })
        };
        {
            let mut st = ctl.lock();
            st.request = Request::Pause;
            ctl.kick_flag.store(true, Ordering::SeqCst);
        }
        ctl.cond.notify_all();
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the sleep did not end at the kick: {e}"));
        sleeper
            .join()
            .unwrap_or_else(|_| panic!("sleeper panicked"));
        // Raised already: a new sleep returns at once.
        ctl.sleep_unless_kicked(Duration::from_secs(3600));
    }
}
