//! Every NIC slot of a VM as one unit ([`VirtioNics`], core's `NetDevices`), the per-NIC
//! I/O thread, and [`install_virtio_nics`].
//!
//! All [`NIC_SLOTS`] slot windows are on the MMIO bus for the VM's whole life; an empty slot
//! answers as a virtio-mmio device with device id 0 ("no device", virtio 1.x §4.2.2), so a
//! driver that probes it finds nothing. Hot add fills a slot (a new `VirtioNet` and its I/O
//! thread) and raises a configuration-change interrupt on it; hot remove empties it, stops
//! the thread and closes the backend. virtio-mmio has no hot-plug notification a Linux
//! driver acts on: only drivers that poll the slots (the test guest) see NICs come and go.
//!
//! Lock order: the slot table → a slot's bus device → the NIC's device lock. The I/O
//! thread takes only its device lock.

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
use super::{nic_irq, nic_mmio_base, VirtioNetError, NIC_SLOTS, RX_FRAMES_PER_WAKEUP};
use crate::config::NicConfig;
use crate::devices::virtio::mmio;
use crate::devices::virtio::SLOT_MMIO_SIZE_BYTES;
use crate::devices::{DeviceError, IrqLine, MmioDevice, NetDevices};
use crate::state::NicState;
use crate::vm::{Vm, VmError};
use crate::GuestMem;

const TOKEN_KICK: u64 = 0;
const TOKEN_BACKEND: u64 = 1;
/// How long the I/O thread waits before reading a backend again after a read error.
const BACKEND_RETRY_MS: i32 = 100;

/// One NIC in a slot: its device, I/O thread and configuration (with the slot filled in).
struct Nic {
    cfg: NicConfig,
    dev: Arc<Mutex<VirtioNet>>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Nic {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kick.write(1);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// The bus device of one slot: the NIC in it, or an empty virtio-mmio window (device id 0).
struct SlotDev {
    nic: Option<Arc<Mutex<VirtioNet>>>,
}

impl MmioDevice for SlotDev {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match &self.nic {
            Some(d) => lock(d).mmio_read(offset, data),
            None => {
                let word = match offset & !3 {
                    mmio::reg::MAGIC_VALUE => mmio::MMIO_MAGIC_VALUE,
                    mmio::reg::VERSION => mmio::MMIO_VERSION,
                    _ => 0,
                }
                .to_le_bytes();
                let start = (offset & 3) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = word.get(start + i).copied().unwrap_or(0);
                }
            }
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(d) = &self.nic {
            lock(d).mmio_write(offset, data);
        }
    }
}

struct Table {
    nics: Vec<Option<Nic>>,
    paused: bool,
}

/// The NIC slots of one VM, each NIC with its I/O thread.
pub struct VirtioNics {
    mem: GuestMem,
    irqs: Vec<Arc<dyn IrqLine>>,
    buses: Vec<Arc<Mutex<SlotDev>>>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for VirtioNics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.stats()).finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding the lock left consistent registers (no frame
    // is half delivered across a lock release), so go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioNics {
    /// Every slot (interrupt line `irq_for(nic_irq(i))`), with NIC `i` of `nics` in slot
    /// `nics[i].0.slot` (default `i`) on its backend; their I/O threads start now, paused.
    pub fn new<E>(
        mem: &GuestMem,
        nics: Vec<(NicConfig, Box<dyn NetBackend>)>,
        mut irq_for: impl FnMut(u32) -> Result<Arc<dyn IrqLine>, E>,
    ) -> Result<Self, VirtioNetError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut irqs = Vec::with_capacity(NIC_SLOTS);
        for i in 0..NIC_SLOTS {
            let gsi = nic_irq(i);
            irqs.push(irq_for(gsi).map_err(|e| VirtioNetError::Irq {
                slot: i as u8,
                gsi,
                source: Box::new(e),
            })?);
        }
        let out = VirtioNics {
            mem: mem.clone(),
            irqs,
            buses: (0..NIC_SLOTS)
                .map(|_| Arc::new(Mutex::new(SlotDev { nic: None })))
                .collect(),
            table: Mutex::new(Table {
                nics: (0..NIC_SLOTS).map(|_| None).collect(),
                paused: true,
            }),
        };
        for (i, (mut cfg, backend)) in nics.into_iter().enumerate() {
            cfg.slot = Some(cfg.slot.unwrap_or(i as u8));
            out.attach_backend(cfg, backend, false)?;
        }
        Ok(out)
    }

    /// Put a NIC on `backend` into slot `cfg.slot` (the lowest free slot when `None`) and
    /// start its I/O thread (running if the VM runs). With `notify`, raise a
    /// configuration-change interrupt on the slot (hot add). Returns the slot.
    pub fn attach_backend(
        &self,
        mut cfg: NicConfig,
        backend: Box<dyn NetBackend>,
        notify: bool,
    ) -> Result<u8, VirtioNetError> {
        let mut t = lock(&self.table);
        let slot = match cfg.slot {
            Some(s) => usize::from(s),
            None => t
                .nics
                .iter()
                .position(Option::is_none)
                .ok_or(VirtioNetError::NoFreeSlot)?,
        };
        let Some(entry) = t.nics.get(slot) else {
            return Err(VirtioNetError::NoSuchSlot { slot });
        };
        if entry.is_some() {
            return Err(VirtioNetError::SlotOccupied { slot: slot as u8 });
        }
        let mac = cfg.mac_bytes().ok_or_else(|| VirtioNetError::Mac {
            slot: slot as u8,
            mac: cfg.mac.clone(),
        })?;
        if let Some(other) = t
            .nics
            .iter()
            .flatten()
            .find(|n| n.cfg.mac_bytes() == Some(mac))
        {
            return Err(VirtioNetError::MacInUse {
                mac: cfg.mac.clone(),
                slot: other.cfg.slot.unwrap_or(0),
            });
        }
        cfg.slot = Some(slot as u8);
        let nic = spawn_nic(&self.mem, self.irqs[slot].clone(), cfg, mac, backend)?;
        if !t.paused {
            lock(&nic.dev).resume(Instant::now());
        }
        if notify {
            lock(&nic.dev).config_changed();
        }
        lock(&self.buses[slot]).nic = Some(nic.dev.clone());
        t.nics[slot] = Some(nic);
        drop(t);
        if notify {
            self.irqs[slot].trigger();
        }
        Ok(slot as u8)
    }

    /// Hot remove the NIC with `mac`: its slot becomes empty, its I/O thread stops and its
    /// backend is closed. Returns its configuration.
    pub fn detach_mac(&self, mac: [u8; 6]) -> Result<NicConfig, VirtioNetError> {
        let mut t = lock(&self.table);
        let slot = t
            .nics
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.cfg.mac_bytes() == Some(mac)))
            .ok_or_else(|| VirtioNetError::NoSuchMac {
                mac: crate::config::format_mac(&mac),
            })?;
        lock(&self.buses[slot]).nic = None;
        let mut nic = t.nics[slot].take().expect("the slot was found occupied");
        drop(t);
        nic.stop();
        self.irqs[slot].trigger();
        tracing::info!(slot, mac = %nic.cfg.mac, tap = %nic.cfg.tap_name, "nic detached");
        Ok(nic.cfg)
    }

    /// `(base, len, device)` of every slot (occupied or not), for the MMIO bus.
    pub fn bus_devices(&self) -> impl Iterator<Item = (u64, u64, Arc<Mutex<dyn MmioDevice>>)> + '_ {
        self.buses.iter().enumerate().map(|(i, b)| {
            let dev: Arc<Mutex<dyn MmioDevice>> = b.clone();
            (nic_mmio_base(i), SLOT_MMIO_SIZE_BYTES, dev)
        })
    }

    /// Number of NICs (occupied slots).
    pub fn len(&self) -> usize {
        lock(&self.table).nics.iter().flatten().count()
    }

    /// Whether the VM has no NIC.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device in slot `slot`, if one is there.
    pub fn nic(&self, slot: usize) -> Option<Arc<Mutex<VirtioNet>>> {
        lock(&self.table)
            .nics
            .get(slot)
            .and_then(|n| n.as_ref().map(|n| n.dev.clone()))
    }

    /// The configuration of every NIC (slot filled in), in slot order.
    pub fn configs(&self) -> Vec<NicConfig> {
        lock(&self.table)
            .nics
            .iter()
            .flatten()
            .map(|n| n.cfg.clone())
            .collect()
    }

    /// Counters of every NIC, in slot order.
    pub fn stats(&self) -> Vec<NetStats> {
        lock(&self.table)
            .nics
            .iter()
            .flatten()
            .map(|n| lock(&n.dev).stats())
            .collect()
    }

    /// Load `states` (every occupied slot exactly once). Everything is decoded and checked
    /// before any NIC changes, so on error the NICs are as they were.
    pub fn restore_states(&self, states: &[NicState]) -> Result<(), VirtioNetError> {
        let t = lock(&self.table);
        let occupied: Vec<u8> = (0..NIC_SLOTS as u8)
            .filter(|s| t.nics[usize::from(*s)].is_some())
            .collect();
        let mut listed: Vec<u8> = states.iter().map(|s| s.slot).collect();
        listed.sort_unstable();
        if listed != occupied {
            return Err(VirtioNetError::SlotList {
                saved: listed,
                occupied,
            });
        }
        let mut staged = Vec::with_capacity(states.len());
        for s in states {
            let state = NetState::decode(s.slot, &s.device)?;
            let Some(nic) = &t.nics[usize::from(s.slot)] else {
                continue;
            };
            let transport = lock(&nic.dev).check_restore(&state)?;
            staged.push((nic.dev.clone(), transport, state.rx_frames));
        }
        for (dev, transport, frames) in staged {
            lock(&dev).apply_restore(transport, frames);
        }
        Ok(())
    }
}

fn spawn_nic(
    mem: &GuestMem,
    irq: Arc<dyn IrqLine>,
    cfg: NicConfig,
    mac: [u8; 6],
    backend: Box<dyn NetBackend>,
) -> Result<Nic, VirtioNetError> {
    let slot = cfg.slot.unwrap_or(0);
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
        .name(format!("nic{slot}"))
        .spawn(move || io.run())
        .map_err(os("spawning the I/O thread"))?;
    Ok(Nic {
        cfg,
        dev,
        kick,
        stop,
        thread: Some(thread),
    })
}

impl NetDevices for VirtioNics {
    fn pause(&self) {
        let mut t = lock(&self.table);
        t.paused = true;
        for n in t.nics.iter().flatten() {
            lock(&n.dev).pause();
        }
    }

    fn resume(&self) {
        let now = Instant::now();
        let mut t = lock(&self.table);
        t.paused = false;
        for n in t.nics.iter().flatten() {
            lock(&n.dev).resume(now);
        }
    }

    fn save(&self) -> Vec<NicState> {
        lock(&self.table)
            .nics
            .iter()
            .flatten()
            .map(|n| {
                let mut d = lock(&n.dev);
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

    fn announce_early(&self) {
        for n in lock(&self.table).nics.iter().flatten() {
            lock(&n.dev).announce_early();
        }
    }

    fn attach(&self, nic: &NicConfig) -> Result<u8, DeviceError> {
        let slot = nic.slot.unwrap_or(0);
        let tap = Tap::open(&nic.tap_name).map_err(|source| VirtioNetError::Tap {
            slot,
            tap: nic.tap_name.clone(),
            source,
        })?;
        Ok(self.attach_backend(nic.clone(), Box::new(tap), true)?)
    }

    fn detach(&self, mac: &str) -> Result<NicConfig, DeviceError> {
        let bytes = crate::config::parse_mac(mac).ok_or_else(|| VirtioNetError::NoSuchMac {
            mac: mac.to_owned(),
        })?;
        Ok(self.detach_mac(bytes)?)
    }

    fn configs(&self) -> Vec<NicConfig> {
        VirtioNics::configs(self)
    }

    fn shutdown(&self) {
        let nics: Vec<Nic> = {
            let mut t = lock(&self.table);
            for b in &self.buses {
                lock(b).nic = None;
            }
            t.nics.iter_mut().filter_map(Option::take).collect()
        };
        for mut n in nics {
            n.stop();
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

/// Open the TAP of every NIC in `vm.config().nics`, create every slot, put them on the
/// VM's MMIO bus and install them as the VM's `NetDevices` (also for a VM without NICs:
/// NICs can be hot-added later). A restore or migration target calls this before
/// `Vm::restore_state`.
pub fn install_virtio_nics(vm: &Vm) -> Result<Arc<VirtioNics>, VmError> {
    let net_err = |e: VirtioNetError| VmError::Net {
        op: "create NICs",
        source: Box::new(e),
    };
    let mut backends = Vec::with_capacity(vm.config().nics.len());
    for (i, n) in vm.config().nics.iter().enumerate() {
        let tap = Tap::open(&n.tap_name).map_err(|source| {
            net_err(VirtioNetError::Tap {
                slot: n.slot.unwrap_or(i as u8),
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
    for n in nics.configs() {
        tracing::info!(slot = n.slot, tap = %n.tap_name, mac = %n.mac, mtu = n.mtu, "nic created");
    }
    Ok(nics)
}
