//! Every NIC of a VM as one unit ([`VirtioNics`], core's `NetDevices`), the per-NIC I/O
//! thread, and [`install_virtio_nics`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{NetBackend, Tap};
use super::device::{NetStats, RxOutcome, VirtioNet};
use super::state::NetState;
use super::{nic_irq, nic_mmio_base, VirtioNetError, RX_FRAMES_PER_WAKEUP};
use crate::config::NicConfig;
use crate::devices::virtio::SLOT_MMIO_SIZE_BYTES;
use crate::devices::{DeviceError, IrqLine, MmioDevice, NetDevices};
use crate::state::NicState;
use crate::vm::{Vm, VmError};
use crate::GuestMem;

const TOKEN_KICK: u64 = 0;
const TOKEN_BACKEND: u64 = 1;
/// How long the I/O thread waits before reading a backend again after a read error.
const BACKEND_RETRY_MS: i32 = 100;

struct Nic {
    dev: Arc<Mutex<VirtioNet>>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The NICs of one VM, each with its I/O thread.
pub struct VirtioNics {
    nics: Vec<Nic>,
}

impl std::fmt::Debug for VirtioNics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.nics.iter().map(|n| lock(&n.dev).stats()))
            .finish()
    }
}

fn lock(dev: &Mutex<VirtioNet>) -> MutexGuard<'_, VirtioNet> {
    // A thread that panicked while holding the lock left consistent registers (no frame
    // is half delivered across a lock release), so go on.
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioNics {
    /// NIC `i` on `nics[i]`'s backend, with interrupt line `irq_for(nic_irq(i))`; their
    /// I/O threads start now, paused.
    pub fn new<E>(
        mem: &GuestMem,
        nics: Vec<(NicConfig, Box<dyn NetBackend>)>,
        mut irq_for: impl FnMut(u32) -> Result<Arc<dyn IrqLine>, E>,
    ) -> Result<Self, VirtioNetError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut out = VirtioNics {
            nics: Vec::with_capacity(nics.len()),
        };
        for (i, (cfg, backend)) in nics.into_iter().enumerate() {
            let slot = i as u8;
            let mac = cfg.mac_bytes().ok_or_else(|| VirtioNetError::Mac {
                slot,
                mac: cfg.mac.clone(),
            })?;
            let gsi = nic_irq(i);
            let irq = irq_for(gsi).map_err(|e| VirtioNetError::Irq {
                slot,
                gsi,
                source: Box::new(e),
            })?;
            let os = |what| move |source| VirtioNetError::Os { slot, what, source };
            let kick = Arc::new(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(os("creating the kick eventfd"))?,
            );
            let backend_fd = backend.readable_fd();
            let epoll = Epoll::new().map_err(os("creating the epoll instance"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_KICK),
                )
                .map_err(os("watching the kick eventfd"))?;
            if let Some(fd) = backend_fd {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
                    )
                    .map_err(os("watching the TAP"))?;
            }
            let dev = Arc::new(Mutex::new(VirtioNet::new(
                slot,
                mac,
                cfg.mtu,
                mem.clone(),
                irq,
                backend,
                kick.clone(),
            )));
            let stop = Arc::new(AtomicBool::new(false));
            let io = IoThread {
                dev: dev.clone(),
                kick: kick.clone(),
                stop: stop.clone(),
                epoll,
                backend_fd,
            };
            let thread = std::thread::Builder::new()
                .name(format!("nic{i}"))
                .spawn(move || io.run())
                .map_err(os("spawning the I/O thread"))?;
            out.nics.push(Nic {
                dev,
                kick,
                stop,
                thread: Mutex::new(Some(thread)),
            });
        }
        Ok(out)
    }

    /// `(base, len, device)` of every NIC, for the MMIO bus.
    pub fn bus_devices(&self) -> impl Iterator<Item = (u64, u64, Arc<Mutex<dyn MmioDevice>>)> + '_ {
        self.nics.iter().enumerate().map(|(i, n)| {
            let dev: Arc<Mutex<dyn MmioDevice>> = n.dev.clone();
            (nic_mmio_base(i), SLOT_MMIO_SIZE_BYTES, dev)
        })
    }

    /// Number of NICs.
    pub fn len(&self) -> usize {
        self.nics.len()
    }

    /// Whether the VM has no NIC.
    pub fn is_empty(&self) -> bool {
        self.nics.is_empty()
    }

    /// The device of NIC `i` (shared with the MMIO bus).
    pub fn nic(&self, i: usize) -> Option<&Arc<Mutex<VirtioNet>>> {
        self.nics.get(i).map(|n| &n.dev)
    }

    /// Counters of every NIC.
    pub fn stats(&self) -> Vec<NetStats> {
        self.nics.iter().map(|n| lock(&n.dev).stats()).collect()
    }

    /// Load `states` (every NIC exactly once). Everything is decoded and checked before
    /// any NIC changes, so on error the NICs are as they were.
    pub fn restore_states(&self, states: &[NicState]) -> Result<(), VirtioNetError> {
        let mut listed: Vec<u8> = states.iter().map(|s| s.slot).collect();
        listed.sort_unstable();
        if listed != (0..self.nics.len() as u8).collect::<Vec<_>>() {
            return Err(VirtioNetError::SlotList {
                saved: listed,
                nics: self.nics.len(),
            });
        }
        let mut staged = Vec::with_capacity(states.len());
        for s in states {
            let state = NetState::decode(s.slot, &s.device)?;
            let nic = &self.nics[usize::from(s.slot)];
            let transport = lock(&nic.dev).check_restore(&state)?;
            staged.push((nic, transport));
        }
        for (nic, transport) in staged {
            lock(&nic.dev).apply_restore(transport);
        }
        Ok(())
    }
}

impl NetDevices for VirtioNics {
    fn pause(&self) {
        for n in &self.nics {
            lock(&n.dev).pause();
        }
    }

    fn resume(&self) {
        let now = Instant::now();
        for n in &self.nics {
            lock(&n.dev).resume(now);
        }
    }

    fn save(&self) -> Vec<NicState> {
        self.nics
            .iter()
            .map(|n| {
                let d = lock(&n.dev);
                NicState {
                    slot: d.slot(),
                    device: d.save_state().encode(),
                }
            })
            .collect()
    }

    fn restore(&self, states: &[NicState]) -> Result<(), DeviceError> {
        Ok(self.restore_states(states)?)
    }

    fn shutdown(&self) {
        for n in &self.nics {
            n.stop.store(true, Ordering::SeqCst);
            let _ = n.kick.write(1);
        }
        for n in &self.nics {
            let handle = n.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }
}

impl Drop for VirtioNics {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The I/O thread of one NIC: waits on its kick eventfd and its backend, delivers received
/// frames (at most [`RX_FRAMES_PER_WAKEUP`] per wakeup) and sends due announcements. It
/// stops watching the backend while the NIC cannot take frames (paused, not live, no
/// receive buffers), so a full TAP never makes it spin.
struct IoThread {
    dev: Arc<Mutex<VirtioNet>>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
    backend_fd: Option<RawFd>,
}

impl IoThread {
    fn run(self) {
        let mut events = [EpollEvent::default(); 4];
        let mut timeout_ms: i32 = -1;
        let mut backend_armed = self.backend_fd.is_some();
        loop {
            if let Err(e) = self.epoll.wait(timeout_ms, &mut events) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "virtio-net I/O thread: epoll_wait failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let _ = self.kick.read();
            let now = Instant::now();
            let (outcome, next_announce) = {
                let mut d = lock(&self.dev);
                let next = d.announce_due(now);
                (d.rx_pump(RX_FRAMES_PER_WAKEUP), next)
            };
            // Watch the backend only while frames can go somewhere. Removed rather than
            // masked: epoll reports errors (a deleted TAP) even for an empty event set.
            let want = matches!(outcome, RxOutcome::Drained | RxOutcome::Budget);
            if let Some(fd) = self.backend_fd.filter(|_| want != backend_armed) {
                let op = if want {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                match self
                    .epoll
                    .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_BACKEND))
                {
                    Ok(()) => backend_armed = want,
                    Err(e) => {
                        tracing::error!(error = %e, "virtio-net I/O thread: epoll_ctl failed")
                    }
                }
            }
            let announce_ms = next_announce.map_or(-1, |t| {
                let ms = t.saturating_duration_since(Instant::now()).as_millis() + 1;
                i32::try_from(ms).unwrap_or(i32::MAX)
            });
            timeout_ms = match outcome {
                RxOutcome::Budget => 0,
                RxOutcome::BackendFailed if announce_ms < 0 => BACKEND_RETRY_MS,
                RxOutcome::BackendFailed => announce_ms.min(BACKEND_RETRY_MS),
                _ => announce_ms,
            };
        }
    }
}

/// Open the TAP of every NIC in `vm.config().nics`, create the devices, put them on the
/// VM's MMIO bus and install them as the VM's `NetDevices` (also for a VM without NICs).
/// A restore or migration target calls this before `Vm::restore_state`.
pub fn install_virtio_nics(vm: &Vm) -> Result<Arc<VirtioNics>, VmError> {
    let net_err = |e: VirtioNetError| VmError::Net {
        op: "create NICs",
        source: Box::new(e),
    };
    let mut backends = Vec::with_capacity(vm.config().nics.len());
    for (i, n) in vm.config().nics.iter().enumerate() {
        let tap = Tap::open(&n.tap_name).map_err(|source| {
            net_err(VirtioNetError::Tap {
                slot: i as u8,
                tap: n.tap_name.clone(),
                source,
            })
        })?;
        backends.push((n.clone(), Box::new(tap) as Box<dyn NetBackend>));
    }
    let nics = VirtioNics::new(vm.memory(), backends, |gsi| vm.irq_line(gsi)).map_err(net_err)?;
    for (base, len, dev) in nics.bus_devices() {
        vm.register_mmio_device(base, len, dev)?;
    }
    let nics = Arc::new(nics);
    vm.install_net_devices(nics.clone());
    for (i, n) in vm.config().nics.iter().enumerate() {
        tracing::info!(slot = i, tap = %n.tap_name, mac = %n.mac, mtu = n.mtu, "nic created");
    }
    Ok(nics)
}
