//! One NIC: [`VirtioNet`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::frames::rarp_announcement;
use super::state::{NetState, CARRIED_BYTES_MAX, CARRIED_FRAMES_MAX};
use super::*;
use crate::devices::virtio::mmio::{self, MmioEvent, MmioTransport};
use crate::devices::{IrqLine, MmioDevice};
use crate::GuestMem;

/// Counters a test or the debug binary can read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (frames without the header).
    pub rx_bytes: u64,
    /// Frames from the backend dropped (no guest buffer could ever hold them, runts).
    pub rx_dropped: u64,
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Bytes the guest sent (frames without the header).
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped (malformed, or the backend refused them).
    pub tx_dropped: u64,
    /// Backend (TAP) I/O errors.
    pub backend_errors: u64,
    /// Announcement frames sent.
    pub announcements: u64,
    /// Frames taken from the backend while the NIC was paused, to be delivered after the
    /// resume here or on a migration target (see [`VirtioNet::save_state`]).
    pub rx_carried: u64,
    /// Register accesses or rings the specification forbids.
    pub guest_errors: u64,
}

/// What one run of the receive path ended with; tells the I/O thread what to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The NIC is paused: wait for a resume kick.
    Paused,
    /// The driver has not set the device live (or it needs a reset): wait for a kick.
    NotLive,
    /// The backend has no more frames: wait for it to become readable.
    Drained,
    /// A frame waits for guest receive buffers: wait for a kick (queue notify).
    NeedBuffers,
    /// The per-wakeup budget is used up and frames may be waiting: run again.
    Budget,
    /// Reading the backend failed (e.g. the TAP was deleted): retry later.
    BackendFailed,
}

/// Result of delivering one frame.
enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
    Broken(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Announce {
    next_at: Instant,
    sent: u8,
}

/// One virtio-net device on the MMIO bus.
pub struct VirtioNet {
    slot: u8,
    mac: [u8; 6],
    mtu: u16,
    transport: MmioTransport,
    mem: GuestMem,
    irq: Arc<dyn IrqLine>,
    backend: Box<dyn NetBackend>,
    kick: Arc<EventFd>,
    paused: bool,
    announce_on_resume: bool,
    /// The first announcement went out before the resume ([`VirtioNet::announce_early`]).
    announced_early: bool,
    announce: Option<Announce>,
    stats: NetStats,
    rx_buf: Vec<u8>,
    rx_pending: usize,
    /// Frames (header included) to deliver before the backend's: taken from the backend
    /// while paused ([`VirtioNet::save_state`]) or restored with the state.
    rx_carried: VecDeque<Vec<u8>>,
    /// Whether the receive queue's used ring asks the driver for notifications (clear
    /// `VRING_USED_F_NO_NOTIFY`): only while a frame waits for buffers.
    rx_notify: bool,
    /// Available index of the receive queue when a frame last found too few buffers.
    rx_avail_seen: u16,
    tx_buf: Vec<u8>,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("slot", &self.slot)
            .field("mac", &crate::config::format_mac(&self.mac))
            .field("backend", &self.backend.describe())
            .field("transport", &self.transport)
            .field("stats", &self.stats)
            .finish()
    }
}

fn new_transport() -> MmioTransport {
    let mut t = MmioTransport::with_queues(VIRTIO_ID_NET, QUEUE_MAX_SIZE, QUEUES)
        .expect("QUEUE_MAX_SIZE is a valid power of two");
    t.set_feature_check(check_feature_dependencies);
    t
}

impl VirtioNet {
    /// A NIC in `slot` with `mac` and `mtu` on `backend`. It starts paused: its receive path
    /// does nothing until [`VirtioNet::resume`]. `kick` wakes its I/O thread.
    pub fn new(
        slot: u8,
        mac: [u8; 6],
        mtu: u16,
        mem: GuestMem,
        irq: Arc<dyn IrqLine>,
        backend: Box<dyn NetBackend>,
        kick: Arc<EventFd>,
    ) -> Self {
        Self {
            slot,
            mac,
            mtu,
            transport: new_transport(),
            mem,
            irq,
            backend,
            kick,
            paused: true,
            announce_on_resume: false,
            announced_early: false,
            announce: None,
            stats: NetStats::default(),
            rx_buf: vec![0; NET_HDR_BYTES + FRAME_BYTES_MAX],
            rx_pending: 0,
            rx_carried: VecDeque::new(),
            rx_notify: true,
            rx_avail_seen: 0,
            tx_buf: Vec::new(),
        }
    }

    /// Slot index.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The MAC the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The transport (status, features, interrupt bits) for inspection.
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// Whether the receive path is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The configuration space (`struct virtio_net_config` up to `mtu`): `mac` @0,
    /// `status` le16 @6, `max_virtqueue_pairs` le16 @8, `mtu` le16 @10.
    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn wake(&self) {
        // A full eventfd counter still wakes the thread; nothing to do on error.
        let _ = self.kick.write(1);
    }

    /// Record a configuration change (hot add) for the driver: `INT_CONFIG` and a new
    /// configuration generation. The caller triggers the interrupt line.
    pub fn config_changed(&mut self) {
        self.transport.config_changed();
    }

    /// Stop the receive path (under the device lock: when the caller releases the lock,
    /// no more guest memory writes happen until [`VirtioNet::resume`]).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Resume the receive path; after a restore, send the first announcement and schedule
    /// the others (the I/O thread sends them).
    ///
    /// The first one goes out here, before the caller lets the vCPUs run: a guest that
    /// answers a frame still in its receive ring right after the resume would otherwise
    /// race the I/O thread, and its reply, not the announcement, would be the first frame
    /// from its MAC on the new port.
    pub fn resume(&mut self, now: Instant) {
        self.paused = false;
        let early = std::mem::take(&mut self.announced_early);
        if std::mem::take(&mut self.announce_on_resume) {
            if early {
                // Round 0 went out before the resume: the others follow from now.
                self.announce = ANNOUNCE_INTERVALS.first().map(|d| Announce {
                    next_at: now + *d,
                    sent: 1,
                });
            } else {
                self.announce = Some(Announce {
                    next_at: now,
                    sent: 0,
                });
                self.announce_due(now);
            }
        }
        self.wake();
    }

    /// While paused (a migration target whose state is arriving), send the first
    /// announcement now: the bridge then sends the VM's frames to this NIC's TAP, where they
    /// wait for the resume, instead of to the source's, where they would be lost with it. The
    /// resume that follows a restore sends the other rounds only. A NIC that is running
    /// sends nothing.
    pub fn announce_early(&mut self) {
        if !self.paused || self.announced_early {
            return;
        }
        match self.backend.write_frame(&rarp_announcement(self.mac)) {
            Ok(()) => {
                self.stats.announcements += 1;
                self.announced_early = true;
                tracing::info!(slot = self.slot, mac = %crate::config::format_mac(&self.mac),
                    backend = %self.backend.describe(), "nic announced before the resume");
            }
            Err(e) => self.backend_error("sending an announcement", &e),
        }
    }

    /// Send the announcements that are due; returns when the next one is due.
    pub fn announce_due(&mut self, now: Instant) -> Option<Instant> {
        if self.paused {
            return None;
        }
        while let Some(mut a) = self.announce {
            if a.next_at > now {
                break;
            }
            match self.backend.write_frame(&rarp_announcement(self.mac)) {
                Ok(()) => self.stats.announcements += 1,
                Err(e) => self.backend_error("sending an announcement", &e),
            }
            a.sent += 1;
            self.announce = ANNOUNCE_INTERVALS
                .get(usize::from(a.sent) - 1)
                .filter(|_| a.sent < ANNOUNCE_ROUNDS)
                .map(|d| Announce {
                    next_at: now + *d,
                    sent: a.sent,
                });
            if a.sent == 1 {
                tracing::info!(slot = self.slot, mac = %crate::config::format_mac(&self.mac),
                    backend = %self.backend.describe(), "nic announced");
            }
        }
        self.announce.map(|a| a.next_at)
    }

    fn guest_error(&mut self, what: &'static str) {
        self.stats.guest_errors += 1;
        let n = self.stats.guest_errors;
        if n <= GUEST_WARNINGS_LOGGED_MAX || n.is_power_of_two() {
            tracing::warn!(
                slot = self.slot,
                occurrences = n,
                "virtio-net guest error: {what}"
            );
        }
    }

    fn backend_error(&mut self, what: &'static str, e: &std::io::Error) {
        self.stats.backend_errors += 1;
        let n = self.stats.backend_errors;
        if n <= GUEST_WARNINGS_LOGGED_MAX || n.is_power_of_two() {
            tracing::warn!(slot = self.slot, occurrences = n, error = %e,
                backend = %self.backend.describe(), "virtio-net backend error: {what}");
        }
    }

    fn apply_offloads(&mut self) {
        let flags = if self.transport.status() & mmio::status::FEATURES_OK != 0 {
            tun_offloads(self.transport.driver_features())
        } else {
            0
        };
        if let Err(e) = self.backend.set_offloads(flags) {
            self.backend_error("setting the receive offloads", &e);
        }
    }

    fn broken(&mut self, what: &'static str) {
        self.guest_error(what);
        self.transport.set_needs_reset();
        self.irq.trigger();
    }

    /// Raise the used-ring interrupt for `queue` unless the driver asked for none
    /// (`VRING_AVAIL_F_NO_INTERRUPT`).
    fn signal_used(&mut self, queue: u16) {
        self.transport.raise(mmio::INT_VRING);
        let avail = self
            .transport
            .queue_at(usize::from(queue))
            .map(|q| q.avail_ring());
        let suppressed = avail
            .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
            .is_some_and(|flags| flags & 1 != 0);
        if !suppressed {
            self.irq.trigger();
        }
    }

    fn live(&mut self, queue: u16) -> bool {
        self.transport.driver_ok()
            && self
                .transport
                .queue_at(usize::from(queue))
                .is_some_and(|q| q.ready())
    }

    /// Deliver up to `budget` frames from the backend into the receive queue.
    pub fn rx_pump(&mut self, budget: usize) -> RxOutcome {
        if self.paused {
            return RxOutcome::Paused;
        }
        if !self.live(RX_QUEUE) {
            return RxOutcome::NotLive;
        }
        let mut delivered = 0;
        let mut outcome = RxOutcome::Budget;
        for _ in 0..budget {
            if self.rx_pending == 0 {
                if let Some(f) = self.rx_carried.pop_front() {
                    // Bounded by check_carried_frames / take_backend_frames.
                    let n = f.len().min(self.rx_buf.len());
                    self.rx_buf[..n].copy_from_slice(&f[..n]);
                    self.rx_pending = n;
                } else {
                    match self.backend.read_frame(&mut self.rx_buf) {
                        Ok(n) if n >= NET_HDR_BYTES + FRAME_BYTES_MIN => self.rx_pending = n,
                        Ok(_) => {
                            self.stats.rx_dropped += 1;
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            outcome = RxOutcome::Drained;
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            self.backend_error("reading a frame", &e);
                            outcome = RxOutcome::BackendFailed;
                            break;
                        }
                    }
                }
            }
            match self.deliver() {
                Delivery::Delivered => delivered += 1,
                Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    outcome = RxOutcome::NeedBuffers;
                    break;
                }
                Delivery::Broken(what) => {
                    self.rx_pending = 0;
                    self.broken(what);
                    outcome = RxOutcome::NotLive;
                    break;
                }
            }
        }
        if delivered > 0 {
            self.signal_used(RX_QUEUE);
        }
        // Ask for receive notifications only while a frame waits for buffers, so a driver
        // that honours VRING_USED_F_NO_NOTIFY saves a VM exit per refill otherwise.
        if outcome == RxOutcome::NeedBuffers {
            if self.set_rx_notify(true) {
                outcome = RxOutcome::Budget; // buffers arrived meanwhile: go again
            }
        } else if self.rx_notify && matches!(outcome, RxOutcome::Drained | RxOutcome::Budget) {
            self.set_rx_notify(false);
        }
        outcome
    }

    /// Set or clear `VRING_USED_F_NO_NOTIFY` on the receive queue; when enabling, returns
    /// whether the driver made buffers available meanwhile.
    fn set_rx_notify(&mut self, enable: bool) -> bool {
        let mem = self.mem.clone();
        let Some(q) = self.transport.queue_at(usize::from(RX_QUEUE)) else {
            return false;
        };
        let more = if enable {
            // Flag first (fenced inside), then look at the index again: a driver that
            // published buffers before it saw the flag did not notify.
            q.enable_notification(&mem).is_ok()
                && q.avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != self.rx_avail_seen)
        } else {
            let _ = q.disable_notification(&mem);
            false
        };
        self.rx_notify = enable;
        more
    }

    /// Copy the pending frame into guest receive buffers.
    fn deliver(&mut self) -> Delivery {
        let n = self.rx_pending;
        let features = self.transport.driver_features();
        let mrg = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mem = self.mem.clone();
        let Self {
            transport,
            rx_buf,
            stats,
            rx_pending,
            rx_avail_seen,
            ..
        } = self;
        // Receive offloads the guest did not accept never reach it: the TAP was told
        // (TUNSETOFFLOAD), and a header that still asks for one drops the frame.
        if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
            rx_buf[0] = 0;
        }
        if rx_buf[1] != VIRTIO_NET_HDR_GSO_NONE && tun_offloads(features) & !TUN_F_CSUM == 0 {
            stats.rx_dropped += 1;
            *rx_pending = 0;
            return Delivery::Dropped;
        }
        let Some(q) = transport.queue_at(usize::from(RX_QUEUE)) else {
            return Delivery::Broken("receive queue missing");
        };
        let start = q.next_avail();
        let size = q.size();
        let avail_before = q
            .avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
            .map_or(start, |i| i.0);
        let mut chains: Vec<(u16, Vec<(u64, u32)>)> = Vec::new();
        let mut capacity: u64 = 0;
        let mut exhausted = false;
        {
            let mut iter = match q.iter(&mem) {
                Ok(i) => i,
                Err(_) => return Delivery::Broken("receive ring index is invalid"),
            };
            while capacity < n as u64 {
                let Some(chain) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let head = chain.head_index();
                if head >= size {
                    return Delivery::Broken("receive ring names a descriptor beyond the queue");
                }
                let mut bufs = Vec::new();
                let mut last_next = false;
                for d in chain {
                    if bufs.len() == MAX_CHAIN_DESCRIPTORS {
                        return Delivery::Broken("receive chain longer than the limit");
                    }
                    if !d.is_write_only() {
                        return Delivery::Broken("device-readable buffer in a receive chain");
                    }
                    if !mem.check_range(d.addr(), d.len() as usize, vm_memory::Permissions::Write) {
                        return Delivery::Broken("receive buffer outside guest memory");
                    }
                    last_next = d.has_next();
                    capacity += u64::from(d.len());
                    bufs.push((d.addr().0, d.len()));
                }
                if last_next || bufs.is_empty() {
                    return Delivery::Broken("receive chain is broken (loop or bad index)");
                }
                chains.push((head, bufs));
                if !mrg {
                    break;
                }
            }
        }
        if capacity < n as u64 {
            // Give the buffers back untouched (nothing was written to guest memory).
            q.set_next_avail(start);
            if chains.is_empty() || (mrg && exhausted && chains.len() < usize::from(size)) {
                *rx_avail_seen = avail_before;
                return Delivery::NoBuffers;
            }
            // No buffer of this guest can ever hold the frame.
            stats.rx_dropped += 1;
            *rx_pending = 0;
            return Delivery::Dropped;
        }
        let num_buffers = chains.len() as u16;
        rx_buf[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut off = 0usize;
        let mut used = Vec::with_capacity(chains.len());
        for (head, bufs) in &chains {
            let mut len = 0u32;
            for &(addr, l) in bufs {
                if off >= n {
                    break;
                }
                let c = (l as usize).min(n - off);
                if mem
                    .write_slice(&rx_buf[off..off + c], GuestAddress(addr))
                    .is_err()
                {
                    return Delivery::Broken("receive buffer outside guest memory");
                }
                off += c;
                len += c as u32;
            }
            used.push((*head, len));
        }
        for (head, len) in used {
            if q.add_used(&mem, head, len).is_err() {
                return Delivery::Broken("used ring entry could not be written");
            }
        }
        stats.rx_frames += 1;
        stats.rx_bytes += (n - NET_HDR_BYTES) as u64;
        *rx_pending = 0;
        Delivery::Delivered
    }

    /// Send every frame the guest made available on the transmit queue (at most a queue's
    /// worth: the available ring cannot hold more).
    pub fn process_tx(&mut self) -> usize {
        if !self.live(TX_QUEUE) {
            return 0;
        }
        let mem = self.mem.clone();
        let features = self.transport.driver_features();
        let mut completions: Vec<u16> = Vec::new();
        let mut faults: Vec<&'static str> = Vec::new();
        let mut io_errors: Vec<std::io::Error> = Vec::new();
        let mut broken: Option<&'static str> = None;
        {
            let Self {
                transport,
                backend,
                stats,
                tx_buf,
                ..
            } = self;
            let Some(q) = transport.queue_at(usize::from(TX_QUEUE)) else {
                return 0;
            };
            let size = q.size();
            match q.iter(&mem) {
                Ok(iter) => {
                    for chain in iter {
                        let head = chain.head_index();
                        if head >= size {
                            broken = Some("transmit ring names a descriptor beyond the queue");
                            break;
                        }
                        let fault = gather(&mem, chain, tx_buf)
                            .and_then(|()| check_tx_header(tx_buf, features));
                        match fault {
                            Err(what) => {
                                faults.push(what);
                                stats.tx_dropped += 1;
                            }
                            Ok(()) => match backend.write_frame(tx_buf) {
                                Ok(()) => {
                                    stats.tx_frames += 1;
                                    stats.tx_bytes += (tx_buf.len() - NET_HDR_BYTES) as u64;
                                }
                                Err(e) => {
                                    stats.tx_dropped += 1;
                                    io_errors.push(e);
                                }
                            },
                        }
                        completions.push(head);
                    }
                }
                Err(_) => broken = Some("transmit ring index is invalid"),
            }
        }
        for what in faults {
            self.guest_error(what);
        }
        for e in io_errors {
            self.backend_error("writing a frame", &e);
        }
        let mut done = 0;
        for head in completions {
            let ok = self
                .transport
                .queue_at(usize::from(TX_QUEUE))
                .is_some_and(|q| q.add_used(&mem, head, 0).is_ok());
            if !ok {
                broken = Some("used ring entry could not be written");
                break;
            }
            done += 1;
        }
        if done > 0 {
            self.signal_used(TX_QUEUE);
        }
        if let Some(what) = broken {
            self.broken(what);
        }
        done
    }

    /// Frames carried over, waiting to be delivered before the backend's.
    pub fn carried_frames(&self) -> usize {
        self.rx_carried.len()
    }

    /// Move the frame read but not delivered and the frames waiting in the backend (read
    /// without blocking) into the carried frames, up to [`CARRIED_FRAMES_MAX`] frames and
    /// [`CARRIED_BYTES_MAX`] bytes; the rest stay in the backend. Only while paused (the
    /// receive path holds still), and only once the driver set the device live (a driver
    /// that never did would drop them anyway).
    fn take_backend_frames(&mut self) {
        if !self.paused || !self.transport.driver_ok() {
            return;
        }
        let mut bytes: usize = self.rx_carried.iter().map(Vec::len).sum();
        if self.rx_pending > 0 {
            let f = self.rx_buf[..self.rx_pending].to_vec();
            self.rx_pending = 0;
            bytes += f.len();
            // Carried frames are delivered first, so the pending one is older than every
            // frame still carried or in the backend.
            self.rx_carried.push_front(f);
            self.stats.rx_carried += 1;
        }
        let mut taken = 0u64;
        while self.rx_carried.len() < CARRIED_FRAMES_MAX
            && bytes + NET_HDR_BYTES + FRAME_BYTES_MAX <= CARRIED_BYTES_MAX
        {
            match self.backend.read_frame(&mut self.rx_buf) {
                Ok(n) if n >= NET_HDR_BYTES + FRAME_BYTES_MIN => {
                    let n = n.min(self.rx_buf.len());
                    self.rx_carried.push_back(self.rx_buf[..n].to_vec());
                    bytes += n;
                    taken += 1;
                }
                Ok(_) => self.stats.rx_dropped += 1,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.backend_error("reading a frame to carry over", &e);
                    break;
                }
            }
        }
        self.stats.rx_carried += taken;
        if !self.rx_carried.is_empty() {
            tracing::info!(
                slot = self.slot,
                taken,
                carried = self.rx_carried.len(),
                "nic frames carried with the state"
            );
        }
    }

    /// Snapshot of the NIC (pause it first). The frames waiting in the backend are taken
    /// now and saved with it, so a migration target delivers them (they would be lost with
    /// the source's TAP); they stay carried here too, delivered first if this NIC resumes.
    ///
    /// A NIC whose state was saved announces its MAC when it resumes here: a migration
    /// target may have announced it meanwhile ([`VirtioNet::announce_early`]) and the
    /// migration then rolled back.
    pub fn save_state(&mut self) -> NetState {
        self.take_backend_frames();
        self.announce_on_resume = true;
        NetState {
            slot: self.slot,
            mac: self.mac,
            mtu: self.mtu,
            transport: self.transport.save(),
            tx_queue: self.transport.save_queues()[0],
            rx_frames: self.rx_carried.iter().cloned().collect(),
        }
    }

    /// Check `state` against this NIC and build the transport it describes, without
    /// changing the NIC.
    pub fn check_restore(&self, state: &NetState) -> Result<MmioTransport, VirtioNetError> {
        let slot = self.slot;
        let mismatch = |what: String| VirtioNetError::StateMismatch { slot, what };
        if state.slot != slot {
            return Err(mismatch(format!("it is for NIC {}", state.slot)));
        }
        if state.mac != self.mac {
            return Err(mismatch(format!(
                "it has MAC {}, this NIC has {}",
                crate::config::format_mac(&state.mac),
                crate::config::format_mac(&self.mac)
            )));
        }
        if state.mtu != self.mtu {
            return Err(mismatch(format!(
                "it has MTU {}, this NIC has {}",
                state.mtu, self.mtu
            )));
        }
        let mut t = MmioTransport::restore_queues(
            VIRTIO_ID_NET,
            QUEUE_MAX_SIZE,
            OFFERED_FEATURES,
            &state.transport,
            &[state.tx_queue],
            QUEUES,
        )
        .map_err(|source| VirtioNetError::Transport { slot, source })?;
        if state.transport.status & mmio::status::FEATURES_OK != 0 {
            check_feature_dependencies(state.transport.driver_features)
                .map_err(|what| mismatch(what.to_string()))?;
        }
        super::state::check_carried_frames(&state.rx_frames).map_err(mismatch)?;
        t.set_feature_check(check_feature_dependencies);
        Ok(t)
    }

    /// Load a transport built by [`VirtioNet::check_restore`] and the state's carried
    /// frames (checked there too). The NIC announces its MAC when it is next resumed, then
    /// delivers the carried frames before any from its backend.
    pub fn apply_restore(&mut self, transport: MmioTransport, rx_frames: Vec<Vec<u8>>) {
        self.transport = transport;
        self.rx_pending = 0;
        self.rx_carried = rx_frames.into();
        self.rx_notify = true;
        self.announce = None;
        self.announce_on_resume = true;
        self.apply_offloads();
        self.wake();
    }
}

/// Copy a transmit chain into `buf` (header included), checking direction, count, size
/// and guest memory.
fn gather<M>(
    mem: &GuestMem,
    chain: virtio_queue::DescriptorChain<M>,
    buf: &mut Vec<u8>,
) -> Result<(), &'static str>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    buf.clear();
    let mut count = 0;
    let mut last_next = false;
    for d in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err("transmit chain longer than the limit");
        }
        if d.is_write_only() {
            return Err("device-writable buffer in a transmit chain");
        }
        last_next = d.has_next();
        let l = d.len() as usize;
        let old = buf.len();
        if old + l > NET_HDR_BYTES + FRAME_BYTES_MAX {
            return Err("transmit frame larger than the limit");
        }
        buf.resize(old + l, 0);
        if mem.read_slice(&mut buf[old..], d.addr()).is_err() {
            return Err("transmit buffer outside guest memory");
        }
    }
    if last_next || count == 0 {
        return Err("transmit chain is broken (loop or bad index)");
    }
    Ok(())
}

/// Whether a transmit header asks only for offloads the guest negotiated.
pub fn check_tx_header(frame: &[u8], features: u64) -> Result<(), &'static str> {
    if frame.len() < NET_HDR_BYTES + FRAME_BYTES_MIN {
        return Err("transmit frame shorter than the header and an Ethernet header");
    }
    let (flags, gso) = (frame[0], frame[1]);
    if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
        return Err("transmit header has unknown flags");
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && features & VIRTIO_NET_F_CSUM == 0 {
        return Err("partial checksum sent without VIRTIO_NET_F_CSUM");
    }
    let need = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => return Err("transmit header has an unsupported GSO type"),
    };
    let ecn = if gso & VIRTIO_NET_HDR_GSO_ECN != 0 {
        VIRTIO_NET_F_HOST_ECN
    } else {
        0
    };
    if features & (need | ecn) != need | ecn {
        return Err("GSO frame sent without the matching HOST_TSO/ECN feature");
    }
    if need == 0 && ecn != 0 {
        return Err("ECN flag on a frame without GSO");
    }
    Ok(())
}

impl MmioDevice for VirtioNet {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        if let Some(what) = self.transport.read(offset, data, OFFERED_FEATURES, &config) {
            self.guest_error(what);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let was_live = self.transport.driver_ok();
        match self
            .transport
            .write(offset, data, OFFERED_FEATURES, &self.mem)
        {
            MmioEvent::None => {}
            MmioEvent::Reset => {
                tracing::debug!(slot = self.slot, "virtio-net reset by the driver");
                self.rx_pending = 0;
                self.rx_carried.clear();
                self.rx_notify = true;
                self.apply_offloads();
            }
            MmioEvent::QueueNotify(RX_QUEUE) => self.wake(),
            MmioEvent::QueueNotify(_) => {
                self.process_tx();
            }
            MmioEvent::GuestError(what) => self.guest_error(what),
        }
        if !was_live && self.transport.driver_ok() {
            self.apply_offloads();
            self.wake();
        }
    }
}
