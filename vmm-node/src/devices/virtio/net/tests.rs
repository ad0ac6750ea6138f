//! Host-side tests of virtio-net: a small driver in Rust writes real descriptor chains into
//! a real `GuestMem` and drives the device through its MMIO registers, against a fake
//! backend (frames in queues).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::config::NicConfig;
use crate::devices::virtio::mmio::{self, reg, status as st};
use crate::devices::{IrqLine, MmioDevice, NetDevices};
use crate::GuestMem;

const MEM_BYTES: usize = 1 << 20;
const QSIZE: u16 = 8;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 7];
/// Queue layouts: (desc, avail, used) per queue.
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x4000, 0x5000, 0x6000)];
const RXBUF: u64 = 0x10000;
const TXBUF: u64 = 0x40000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Default)]
struct CountIrq(AtomicUsize);
impl IrqLine for CountIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Frames in both directions, shared with the test.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    offloads: Vec<u32>,
}

struct FakeBackend(Arc<Mutex<Wire>>);

impl NetBackend for FakeBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap().to_guest.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().from_guest.push(frame.to_vec());
        Ok(())
    }
    fn set_offloads(&mut self, tun_flags: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().offloads.push(tun_flags);
        Ok(())
    }
    fn readable_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    fn describe(&self) -> String {
        "fake".into()
    }
}

fn new_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
}

fn rd(dev: &mut VirtioNet, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(dev: &mut VirtioNet, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

fn write_desc(mem: &GuestMem, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + u64::from(idx) * 16;
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

struct Rig {
    mem: GuestMem,
    irq: Arc<CountIrq>,
    wire: Arc<Mutex<Wire>>,
    dev: VirtioNet,
    avail_idx: [u16; 2],
    used_idx: [u16; 2],
}

fn negotiate(dev: &mut VirtioNet, features: u64) -> bool {
    wr(dev, reg::STATUS, 0);
    wr(dev, reg::STATUS, st::ACKNOWLEDGE);
    wr(dev, reg::STATUS, st::ACKNOWLEDGE | st::DRIVER);
    wr(dev, reg::DRIVER_FEATURES_SEL, 0);
    wr(dev, reg::DRIVER_FEATURES, features as u32);
    wr(dev, reg::DRIVER_FEATURES_SEL, 1);
    wr(dev, reg::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        dev,
        reg::STATUS,
        st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
    );
    rd(dev, reg::STATUS) & st::FEATURES_OK != 0
}

fn rig(features: u64) -> Rig {
    let mem = new_mem();
    let irq = Arc::new(CountIrq::default());
    let wire = Arc::new(Mutex::new(Wire::default()));
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut dev = VirtioNet::new(
        0,
        MAC,
        1500,
        mem.clone(),
        irq.clone(),
        Box::new(FakeBackend(wire.clone())),
        kick,
    );
    dev.resume(Instant::now());
    assert!(negotiate(&mut dev, features));
    for (q, (d, a, u)) in RINGS.iter().enumerate() {
        wr(&mut dev, reg::QUEUE_SEL, q as u32);
        assert_eq!(rd(&mut dev, reg::QUEUE_NUM_MAX), u32::from(QUEUE_MAX_SIZE));
        wr(&mut dev, reg::QUEUE_NUM, u32::from(QSIZE));
        wr(&mut dev, reg::QUEUE_DESC_LOW, *d as u32);
        wr(&mut dev, reg::QUEUE_DRIVER_LOW, *a as u32);
        wr(&mut dev, reg::QUEUE_DEVICE_LOW, *u as u32);
        wr(&mut dev, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut dev, reg::QUEUE_READY), 1);
    }
    let s = rd(&mut dev, reg::STATUS);
    wr(&mut dev, reg::STATUS, s | st::DRIVER_OK);
    assert!(dev.transport().driver_ok());
    Rig {
        mem,
        irq,
        wire,
        dev,
        avail_idx: [0; 2],
        used_idx: [0; 2],
    }
}

const BASIC: u64 = mmio::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU;

impl Rig {
    fn push_avail(&mut self, q: usize, head: u16) {
        let (_, avail, _) = RINGS[q];
        let i = self.avail_idx[q] % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(i)))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let (_, _, used) = RINGS[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        if idx == self.used_idx[q] {
            return None;
        }
        let at = used + 4 + 8 * u64::from(self.used_idx[q] % QSIZE);
        self.used_idx[q] = self.used_idx[q].wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        ))
    }

    /// Post receive buffer `i` (`len` bytes at RXBUF + i * 0x2000).
    fn post_rx(&mut self, i: u16, len: u32) {
        let (desc, _, _) = RINGS[0];
        write_desc(
            &self.mem,
            desc,
            i,
            RXBUF + u64::from(i) * 0x2000,
            len,
            F_WRITE,
            0,
        );
        self.push_avail(0, i);
    }

    /// Post a transmit chain of `parts` (header included) in descriptors `i..`.
    fn post_tx(&mut self, i: u16, parts: &[&[u8]]) {
        let (desc, _, _) = RINGS[1];
        let mut addr = TXBUF + u64::from(i) * 0x10000;
        for (k, p) in parts.iter().enumerate() {
            self.mem.write_slice(p, GuestAddress(addr)).unwrap();
            let last = k + 1 == parts.len();
            let idx = i + k as u16;
            write_desc(
                &self.mem,
                desc,
                idx,
                addr,
                p.len() as u32,
                if last { 0 } else { F_NEXT },
                idx + 1,
            );
            addr += p.len() as u64;
        }
        self.push_avail(1, i);
    }

    fn inject(&self, frame: Vec<u8>) {
        self.wire.lock().unwrap().to_guest.push_back(frame);
    }

    fn rx_bytes(&self, i: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(RXBUF + u64::from(i) * 0x2000))
            .unwrap();
        v
    }
}

/// A frame from the host: zero header + `len` bytes of Ethernet frame.
fn host_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_BYTES];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    f
}

#[test]
fn identifies_as_a_network_device_with_mac_mtu_and_link_up() {
    let mut r = rig(BASIC);
    assert_eq!(rd(&mut r.dev, reg::DEVICE_ID), VIRTIO_ID_NET);
    let mut cfg = [0u8; 12];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut x = [0u8; 1];
        r.dev.mmio_read(reg::CONFIG + i as u64, &mut x);
        *b = x[0];
    }
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    wr(&mut r.dev, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        u64::from(rd(&mut r.dev, reg::DEVICE_FEATURES)),
        OFFERED_FEATURES & 0xffff_ffff
    );
    // No guest-receive offload negotiated: the TAP was told so at DRIVER_OK.
    assert_eq!(r.wire.lock().unwrap().offloads.last(), Some(&0));
}

#[test]
fn feature_dependencies_are_enforced() {
    let mem = new_mem();
    let mk = || {
        VirtioNet::new(
            0,
            MAC,
            1500,
            mem.clone(),
            Arc::new(CountIrq::default()),
            Box::new(FakeBackend(Arc::default())),
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        )
    };
    let v1 = mmio::VIRTIO_F_VERSION_1;
    assert!(!negotiate(&mut mk(), v1 | VIRTIO_NET_F_GUEST_TSO4));
    assert!(!negotiate(&mut mk(), v1 | VIRTIO_NET_F_HOST_TSO6));
    assert!(!negotiate(
        &mut mk(),
        v1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_ECN
    ));
    assert!(negotiate(
        &mut mk(),
        v1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_ECN
    ));
    let mut d = mk();
    assert!(negotiate(&mut d, OFFERED_FEATURES));
    assert!(d.stats().guest_errors == 0);
    assert_eq!(
        tun_offloads(OFFERED_FEATURES),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    );
    assert_eq!(tun_offloads(v1 | VIRTIO_NET_F_GUEST_TSO4), 0);
}

#[test]
fn offloads_go_to_the_tap_when_the_driver_is_live() {
    let r = rig(mmio::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4);
    assert_eq!(
        r.wire.lock().unwrap().offloads.last(),
        Some(&(TUN_F_CSUM | TUN_F_TSO4))
    );
}

#[test]
fn transmit_passes_header_and_frame_to_the_backend() {
    let mut r = rig(BASIC | VIRTIO_NET_F_CSUM);
    let mut hdr = [0u8; NET_HDR_BYTES];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[6] = 34;
    hdr[8] = 6;
    let frame: Vec<u8> = (0..100u8).collect();
    r.post_tx(0, &[&hdr, &frame[..40], &frame[40..]]);
    let irqs = r.irq.0.load(Ordering::SeqCst);
    wr(&mut r.dev, reg::QUEUE_NOTIFY, 1);
    assert_eq!(r.pop_used(1), Some((0, 0)));
    let sent = r.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0][..NET_HDR_BYTES], &hdr);
    assert_eq!(&sent[0][NET_HDR_BYTES..], &frame[..]);
    assert_eq!(r.dev.stats().tx_frames, 1);
    assert!(r.irq.0.load(Ordering::SeqCst) > irqs);
}

#[test]
fn transmit_offloads_not_negotiated_drop_the_frame() {
    let mut r = rig(BASIC);
    let mut hdr = [0u8; NET_HDR_BYTES];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    r.post_tx(0, &[&hdr, &[0u8; 60]]);
    let mut gso = [0u8; NET_HDR_BYTES];
    gso[1] = VIRTIO_NET_HDR_GSO_TCPV4;
    r.post_tx(2, &[&gso, &[0u8; 60]]);
    r.post_tx(4, &[&[0u8; 5]]); // shorter than a header
    wr(&mut r.dev, reg::QUEUE_NOTIFY, 1);
    assert!(r.pop_used(1).is_some() && r.pop_used(1).is_some() && r.pop_used(1).is_some());
    assert!(r.wire.lock().unwrap().from_guest.is_empty());
    assert_eq!(r.dev.stats().tx_dropped, 3);
    assert_eq!(r.dev.stats().guest_errors, 3);
}

#[test]
fn receive_fills_one_buffer_with_num_buffers_one() {
    let mut r = rig(BASIC);
    r.post_rx(0, 2048);
    let f = host_frame(1000, 3);
    r.inject(f.clone());
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Drained);
    assert_eq!(r.pop_used(0), Some((0, f.len() as u32)));
    let got = r.rx_bytes(0, f.len());
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[NET_HDR_BYTES..], &f[NET_HDR_BYTES..]);
    assert_eq!(r.dev.stats().rx_frames, 1);
}

#[test]
fn receive_waits_for_buffers_and_keeps_the_frame() {
    let mut r = rig(BASIC);
    let f = host_frame(200, 9);
    r.inject(f.clone());
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NeedBuffers);
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NeedBuffers);
    // Waiting: the driver is asked to notify (VRING_USED_F_NO_NOTIFY clear).
    let used_flags = |r: &Rig| r.mem.read_obj::<u16>(GuestAddress(RINGS[0].2)).unwrap();
    assert_eq!(used_flags(&r), 0);
    r.post_rx(0, 2048);
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Drained);
    // Not waiting: no notifications wanted.
    assert_eq!(used_flags(&r), 1);
    assert_eq!(r.pop_used(0), Some((0, f.len() as u32)));
    assert_eq!(
        &r.rx_bytes(0, f.len())[NET_HDR_BYTES..],
        &f[NET_HDR_BYTES..]
    );
}

#[test]
fn frame_larger_than_a_buffer_is_dropped_without_mrg_rxbuf() {
    let mut r = rig(BASIC);
    r.post_rx(0, 512);
    r.inject(host_frame(1500, 1));
    r.inject(host_frame(100, 2));
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Drained);
    // The big frame was dropped; the buffer took the small one.
    assert_eq!(r.pop_used(0), Some((0, (NET_HDR_BYTES + 100) as u32)));
    assert_eq!(r.dev.stats().rx_dropped, 1);
}

#[test]
fn mergeable_buffers_spread_a_frame_over_several_chains() {
    let mut r = rig(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    for i in 0..4 {
        r.post_rx(i, 1024);
    }
    let f = host_frame(3000, 5);
    r.inject(f.clone());
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Drained);
    let used: Vec<_> = std::iter::from_fn(|| r.pop_used(0)).collect();
    assert_eq!(
        used,
        vec![(0, 1024), (1, 1024), (2, (f.len() - 2048) as u32)]
    );
    let mut got = Vec::new();
    for (i, (_, len)) in used.iter().enumerate() {
        got.extend(r.rx_bytes(i as u16, *len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[NET_HDR_BYTES..], &f[NET_HDR_BYTES..]);
    // Not enough buffers: the frame waits, no buffer is consumed.
    r.inject(host_frame(3000, 6));
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NeedBuffers);
    assert!(r.pop_used(0).is_none());
    r.post_rx(4, 1024);
    r.post_rx(5, 1024);
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Drained);
    assert_eq!(std::iter::from_fn(|| r.pop_used(0)).count(), 3);
}

#[test]
fn paused_or_not_live_devices_do_not_touch_guest_memory() {
    let mut r = rig(BASIC);
    r.post_rx(0, 2048);
    r.inject(host_frame(100, 1));
    r.dev.pause();
    assert_eq!(r.dev.rx_pump(8), RxOutcome::Paused);
    assert!(r.pop_used(0).is_none());
    r.dev.resume(Instant::now());
    wr(&mut r.dev, reg::STATUS, 0); // reset
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NotLive);
    assert!(r.pop_used(0).is_none());
}

#[test]
fn malformed_receive_chains_mark_the_device_broken() {
    // A device-readable buffer in the receive queue.
    let mut r = rig(BASIC);
    let (desc, _, _) = RINGS[0];
    write_desc(&r.mem, desc, 0, RXBUF, 2048, 0, 0);
    r.push_avail(0, 0);
    r.inject(host_frame(100, 1));
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NotLive);
    assert!(r.dev.transport().status() & st::DEVICE_NEEDS_RESET != 0);
    // A buffer outside guest memory, and a descriptor loop.
    for (addr, flags, next) in [
        (MEM_BYTES as u64 - 16, F_WRITE, 0),
        (RXBUF, F_WRITE | F_NEXT, 0),
    ] {
        let mut r = rig(BASIC);
        write_desc(&r.mem, desc, 0, addr, 2048, flags, next);
        r.push_avail(0, 0);
        r.inject(host_frame(100, 1));
        assert_eq!(r.dev.rx_pump(8), RxOutcome::NotLive);
        assert!(r.dev.stats().guest_errors >= 1);
    }
}

#[test]
fn announcements_go_out_after_a_restore_only() {
    let mut r = rig(BASIC);
    let t0 = Instant::now();
    r.dev.resume(t0);
    assert_eq!(r.dev.announce_due(t0), None);
    let state = r.dev.save_state();
    let t = r.dev.check_restore(&state).unwrap();
    r.dev.apply_restore(t, state.rx_frames.clone());
    r.dev.pause();
    assert_eq!(r.dev.announce_due(t0), None, "paused: nothing goes out");
    r.dev.resume(t0);
    let next = r.dev.announce_due(t0).expect("more rounds follow");
    assert_eq!(next, t0 + ANNOUNCE_INTERVALS[0]);
    let next = r.dev.announce_due(next).unwrap();
    assert_eq!(r.dev.announce_due(next), None);
    let sent = r.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), usize::from(ANNOUNCE_ROUNDS));
    assert!(sent
        .iter()
        .all(|f| f[..] == frames::rarp_announcement(MAC)[..]));
    assert_eq!(r.dev.stats().announcements, u64::from(ANNOUNCE_ROUNDS));
}

/// The first announcement is on the wire when `resume` returns (before the vCPUs run and
/// the guest can send anything), not when the I/O thread gets to it.
#[test]
fn resume_after_a_restore_sends_the_first_announcement_itself() {
    let mut r = rig(BASIC);
    let state = r.dev.save_state();
    let t = r.dev.check_restore(&state).unwrap();
    r.dev.apply_restore(t, state.rx_frames.clone());
    assert!(r.wire.lock().unwrap().from_guest.is_empty());
    let t0 = Instant::now();
    r.dev.resume(t0);
    let sent = r.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), 1, "one announcement, sent by resume");
    assert_eq!(sent[0][..], frames::rarp_announcement(MAC)[..]);
    // A frame the guest sends right after goes out behind it.
    r.post_tx(1, &[&[0u8; NET_HDR_BYTES], &[1u8; 60]]);
    wr(&mut r.dev, reg::QUEUE_NOTIFY, 1);
    let sent = r.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0][..], frames::rarp_announcement(MAC)[..]);
    // The I/O thread's next call finds only the later rounds due.
    assert_eq!(r.dev.announce_due(t0), Some(t0 + ANNOUNCE_INTERVALS[0]));
    assert_eq!(r.dev.stats().announcements, 1);
}

/// A migration target announces while still paused (its state arrived): one frame, and
/// the resume after the restore sends only the later rounds (three in all). A running NIC
/// never announces early.
#[test]
fn an_early_announcement_is_round_zero() {
    let mut r = rig(BASIC);
    r.dev.announce_early();
    assert!(
        r.wire.lock().unwrap().from_guest.is_empty(),
        "running: nothing"
    );
    let state = r.dev.save_state();
    let mut t = rig(BASIC);
    t.dev.pause();
    t.dev.announce_early();
    t.dev.announce_early();
    assert_eq!(t.wire.lock().unwrap().from_guest.len(), 1, "once");
    let tr = t.dev.check_restore(&state).unwrap();
    t.dev.apply_restore(tr, Vec::new());
    let t0 = Instant::now();
    t.dev.resume(t0);
    assert_eq!(
        t.wire.lock().unwrap().from_guest.len(),
        1,
        "round 0 is not sent again"
    );
    let next = t.dev.announce_due(t0).expect("later rounds follow");
    assert_eq!(next, t0 + ANNOUNCE_INTERVALS[0]);
    let next = t.dev.announce_due(next).unwrap();
    assert_eq!(t.dev.announce_due(next), None);
    let sent = t.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), usize::from(ANNOUNCE_ROUNDS));
    assert!(sent
        .iter()
        .all(|f| f[..] == frames::rarp_announcement(MAC)[..]));
}

/// A NIC whose state was saved announces when it resumes where it was (a rolled-back
/// migration: the target may have announced the MAC meanwhile).
#[test]
fn a_saved_nic_announces_when_it_resumes() {
    let mut r = rig(BASIC);
    r.dev.pause();
    let _ = r.dev.save_state();
    r.dev.resume(Instant::now());
    let sent = r.wire.lock().unwrap().from_guest.clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0][..], frames::rarp_announcement(MAC)[..]);
}

#[test]
fn state_round_trips_and_mismatches_are_refused() {
    let mut r = rig(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    r.post_rx(0, 2048);
    r.post_tx(1, &[&[0u8; NET_HDR_BYTES], &[1u8; 60]]);
    wr(&mut r.dev, reg::QUEUE_NOTIFY, 1);
    let state = r.dev.save_state();
    let bytes = state.encode();
    let back = NetState::decode(0, &bytes).unwrap();
    assert_eq!(back, state);
    // A fresh NIC takes it and carries on where the old one was.
    let mut fresh = rig(BASIC);
    let t = fresh.dev.check_restore(&back).unwrap();
    fresh.dev.apply_restore(t, back.rx_frames.clone());
    assert_eq!(fresh.dev.save_state(), state);
    // Other MAC, MTU, slot, newer format, garbage.
    let mut other = state.clone();
    other.mac[5] ^= 1;
    assert!(matches!(
        fresh.dev.check_restore(&other),
        Err(VirtioNetError::StateMismatch { .. })
    ));
    let mut other = state.clone();
    other.mtu = 9000;
    assert!(fresh.dev.check_restore(&other).is_err());
    let mut other = state.clone();
    other.slot = 2;
    assert!(fresh.dev.check_restore(&other).is_err());
    let mut other = state.clone();
    other.transport.driver_features |= 1 << 40;
    assert!(matches!(
        fresh.dev.check_restore(&other),
        Err(VirtioNetError::Transport { .. })
    ));
    let mut newer = bytes.clone();
    newer[0..2].copy_from_slice(&(NET_STATE_FORMAT + 1).to_le_bytes());
    assert!(matches!(
        NetState::decode(0, &newer),
        Err(VirtioNetError::StateFormat { .. })
    ));
    assert!(NetState::decode(0, &[]).is_err());
    assert!(NetState::decode(0, &bytes[..bytes.len() - 1]).is_err());
}

/// Frames waiting in the backend when the NIC is paused and saved travel with the state
/// (format 2): the restored NIC delivers them, oldest first, before its backend's frames;
/// nothing is lost or duplicated. On the source they stay carried and are delivered if it
/// resumes (a rolled-back migration).
#[test]
fn frames_waiting_at_pause_are_carried_with_the_state() {
    let mut r = rig(BASIC);
    // One frame read but stuck waiting for buffers, then four more in the backend.
    for seed in 1..=5u8 {
        r.inject(host_frame(60 + usize::from(seed), seed));
    }
    assert_eq!(r.dev.rx_pump(8), RxOutcome::NeedBuffers);
    r.dev.pause();
    let state = r.dev.save_state();
    assert_eq!(state.rx_frames.len(), 5);
    assert!(
        r.wire.lock().unwrap().to_guest.is_empty(),
        "the backend was drained"
    );
    assert_eq!(r.dev.stats().rx_carried, 5);
    let bytes = state.encode();
    assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), 2);
    let back = NetState::decode(0, &bytes).unwrap();
    assert_eq!(back, state);

    // The target: a frame already in its own backend comes after the carried ones.
    let mut t = rig(BASIC);
    t.inject(host_frame(80, 9));
    t.dev.pause();
    let tr = t.dev.check_restore(&back).unwrap();
    t.dev.apply_restore(tr, back.rx_frames.clone());
    t.dev.resume(Instant::now());
    for i in 0..6 {
        t.post_rx(i, 2048);
    }
    assert_eq!(t.dev.rx_pump(16), RxOutcome::Drained);
    let mut got = Vec::new();
    while let Some((head, len)) = t.pop_used(0) {
        got.push(t.rx_bytes(head as u16, len as usize));
    }
    let want: Vec<Vec<u8>> = (1..=5u8)
        .map(|seed| host_frame(60 + usize::from(seed), seed))
        .chain([host_frame(80, 9)])
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[NET_HDR_BYTES..], &w[NET_HDR_BYTES..]);
    }
    assert_eq!(t.dev.stats().rx_frames, 6);

    // The source resumed instead (rollback): it delivers them itself, once.
    r.dev.resume(Instant::now());
    for i in 0..5 {
        r.post_rx(i, 2048);
    }
    r.dev.rx_pump(16);
    assert_eq!(r.dev.stats().rx_frames, 5);
    assert_eq!(r.dev.carried_frames(), 0);
    assert_eq!(r.dev.save_state().rx_frames.len(), 0);
}

/// A state without carried frames is written as format 1 (older builds read it); format 1
/// still decodes; carried frames beyond the bounds are refused by the decoder and by
/// `check_restore`.
#[test]
fn carried_frames_are_versioned_and_bounded() {
    let mut r = rig(BASIC);
    let state = r.dev.save_state();
    let bytes = state.encode();
    assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), 1);
    assert_eq!(NetState::decode(0, &bytes).unwrap(), state);

    let with = |frames: Vec<Vec<u8>>| NetState {
        rx_frames: frames,
        ..state.clone()
    };
    let too_many = with(vec![host_frame(60, 0); state::CARRIED_FRAMES_MAX + 1]);
    let runt = with(vec![vec![0u8; NET_HDR_BYTES + 3]]);
    let huge = with(vec![vec![0u8; NET_HDR_BYTES + FRAME_BYTES_MAX + 1]]);
    let too_big = with(vec![
        host_frame(FRAME_BYTES_MAX, 0);
        state::CARRIED_BYTES_MAX / FRAME_BYTES_MAX + 1
    ]);
    for bad in [too_many, runt, huge, too_big] {
        assert!(matches!(
            r.dev.check_restore(&bad),
            Err(VirtioNetError::StateMismatch { .. })
        ));
        // Encoded by hand (encode() only ever writes valid states).
        use bincode::Options;
        let mut b = 2u16.to_le_bytes().to_vec();
        b.extend(
            bincode::options()
                .with_fixint_encoding()
                .serialize(&bad)
                .unwrap(),
        );
        assert!(NetState::decode(0, &b).is_err());
    }
    let ok = with(vec![host_frame(60, 1), host_frame(1500, 2)]);
    assert!(r.dev.check_restore(&ok).is_ok());
    assert_eq!(NetState::decode(0, &ok.encode()).unwrap(), ok);
}

#[test]
fn nics_restore_all_or_nothing_and_shut_down() {
    let mem = new_mem();
    let wire: Arc<Mutex<Wire>> = Arc::default();
    let cfgs = [
        NicConfig::new("t0", "52:54:00:00:00:01"),
        NicConfig::new("t1", "52:54:00:00:00:02"),
    ];
    let mk = || {
        VirtioNics::new(
            &mem,
            cfgs.iter()
                .map(|c| {
                    (
                        c.clone(),
                        Box::new(FakeBackend(wire.clone())) as Box<dyn NetBackend>,
                    )
                })
                .collect(),
            |_| Ok::<_, std::io::Error>(Arc::new(CountIrq::default()) as Arc<dyn IrqLine>),
        )
        .unwrap()
    };
    let a = mk();
    // Every slot is on the bus; slots 2 and 3 are empty windows (device id 0).
    let buses: Vec<_> = a.bus_devices().collect();
    assert_eq!(
        buses.iter().map(|(b, _, _)| *b).collect::<Vec<_>>(),
        (0..NIC_SLOTS).map(nic_mmio_base).collect::<Vec<_>>()
    );
    let read = |i: usize, off: u64| {
        let mut v = [0u8; 4];
        buses[i].2.lock().unwrap().mmio_read(off, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!(read(2, 0), 0x7472_6976);
    assert_eq!(read(2, 4), 2);
    assert_eq!(read(2, 8), 0, "an empty slot has device id 0");
    assert_eq!(read(0, 8), VIRTIO_ID_NET);
    buses[2].2.lock().unwrap().mmio_write(0x70, &[1, 0, 0, 0]);
    assert_eq!(read(2, 0x70), 0, "writes to an empty slot change nothing");
    a.resume();
    a.pause();
    let saved = a.save();
    assert_eq!(saved.len(), 2);
    let b = mk();
    b.restore(&saved).unwrap();
    let e = b.restore(&saved[..1]).unwrap_err();
    assert!(e.to_string().contains("list slots"), "{e}");
    let mut bad = saved.clone();
    bad[1].device = vec![1, 0, 9];
    assert!(b.restore(&bad).is_err());
    // Slot 1's state on slot 0 (other MAC): refused before anything changed.
    let mut swapped = saved.clone();
    swapped[0].device = saved[1].device.clone();
    assert!(b.restore(&swapped).is_err());
    // Hot add takes the lowest free slot and raises a config interrupt; a duplicate MAC, a
    // taken slot and a full table are refused; hot remove empties the slot.
    let backend = || Box::new(FakeBackend(wire.clone())) as Box<dyn NetBackend>;
    let slot = a
        .attach_backend(NicConfig::new("t2", "52:54:00:00:00:03"), backend(), true)
        .unwrap();
    assert_eq!(slot, 2);
    assert_eq!(read(2, 8), VIRTIO_ID_NET);
    assert_eq!(read(2, 0x60) & 2, 2, "INT_CONFIG after a hot add");
    let e = a
        .attach_backend(NicConfig::new("t9", "52:54:00:00:00:01"), backend(), true)
        .unwrap_err();
    assert!(matches!(e, VirtioNetError::MacInUse { slot: 0, .. }), "{e}");
    let taken = NicConfig {
        slot: Some(1),
        ..NicConfig::new("t9", "52:54:00:00:00:09")
    };
    let e = a.attach_backend(taken, backend(), true).unwrap_err();
    assert!(matches!(e, VirtioNetError::SlotOccupied { slot: 1 }), "{e}");
    a.attach_backend(NicConfig::new("t3", "52:54:00:00:00:04"), backend(), true)
        .unwrap();
    let e = a
        .attach_backend(NicConfig::new("t9", "52:54:00:00:00:09"), backend(), true)
        .unwrap_err();
    assert!(matches!(e, VirtioNetError::NoFreeSlot), "{e}");
    assert_eq!(a.save().len(), 4);
    let gone = a.detach_mac([0x52, 0x54, 0, 0, 0, 1]).unwrap();
    assert_eq!((gone.tap_name.as_str(), gone.slot), ("t0", Some(0)));
    assert_eq!(read(0, 8), 0, "a hot-removed NIC's slot is empty");
    assert!(matches!(
        a.detach_mac([0x52, 0x54, 0, 0, 0, 1]),
        Err(VirtioNetError::NoSuchMac { .. })
    ));
    assert_eq!(
        a.configs().iter().map(|c| c.slot).collect::<Vec<_>>(),
        vec![Some(1), Some(2), Some(3)]
    );
    // States of slots 1..3 do not fit a VM with NICs in slots 0 and 1.
    let e = b.restore(&a.save()).unwrap_err();
    assert!(e.to_string().contains("list slots"), "{e}");
    a.shutdown();
    a.shutdown();
    assert_eq!(nic_kernel_cmdline(1), "virtio_mmio.device=4K@0xd0009000:17");
}

proptest! {
    /// Arbitrary register traffic, ring contents and frames never panic the device.
    #[test]
    fn random_guest_input_never_panics(
        ops in proptest::collection::vec((0u64..0x120, any::<u32>(), 0u8..4), 0..200),
        ring in proptest::collection::vec(any::<u8>(), 0..512),
        frames in proptest::collection::vec(0usize..4000, 0..6),
    ) {
        let mut r = rig(BASIC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_CSUM);
        // Scribble over descriptor tables and rings of both queues.
        for (q, (d, _, _)) in RINGS.iter().enumerate() {
            r.mem.write_slice(&ring, GuestAddress(*d)).unwrap();
            r.mem.write_slice(&ring, GuestAddress(RINGS[q].1)).unwrap();
        }
        for n in &frames {
            r.inject(host_frame(*n, 1));
        }
        for (off, v, kind) in ops {
            match kind {
                0 => wr(&mut r.dev, off & !3, v),
                1 => { rd(&mut r.dev, off); }
                2 => { r.dev.rx_pump(4); }
                _ => wr(&mut r.dev, reg::QUEUE_NOTIFY, v % 3),
            }
        }
        r.dev.rx_pump(16);
    }

    /// The state decoder never panics on arbitrary bytes.
    #[test]
    fn state_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = NetState::decode(0, &bytes);
        for format in 1..=NET_STATE_FORMAT {
            let mut b = format.to_le_bytes().to_vec();
            b.extend(&bytes);
            let _ = NetState::decode(0, &b);
        }
    }
}
