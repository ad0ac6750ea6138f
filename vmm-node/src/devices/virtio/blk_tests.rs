//! Host-side tests of virtio-blk: a small driver in Rust writes real descriptor chains
//! into a real `GuestMem` and drives the device through its MMIO registers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::devices::virtio::mmio::{reg, status as st, INT_CONFIG, INT_VRING};
use crate::disk::RawFileDisk;

const MEM_BYTES: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const INDIRECT: u64 = 0x8000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x11000;
const DATA: u64 = 0x20000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Default)]
struct CountIrq(AtomicUsize);
impl IrqLine for CountIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
impl CountIrq {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn new_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
}

fn image(sectors: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * 512).unwrap();
    f
}

fn open(img: &tempfile::NamedTempFile, read_only: bool) -> Box<dyn DiskBackend> {
    Box::new(RawFileDisk::open(img.path(), read_only).unwrap())
}

fn rd(dev: &mut VirtioBlk, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(dev: &mut VirtioBlk, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

fn capacity(dev: &mut VirtioBlk) -> u64 {
    let mut b = [0u8; 8];
    dev.mmio_read(reg::CONFIG, &mut b);
    u64::from_le_bytes(b)
}

/// The guest side: ring indices it keeps.
struct Driver {
    avail_idx: u16,
    used_idx: u16,
}

struct Rig {
    mem: GuestMem,
    irq: Arc<CountIrq>,
    dev: VirtioBlk,
    drv: Driver,
}

fn negotiate(dev: &mut VirtioBlk, wanted: u64) -> Result<(), u32> {
    wr(dev, reg::STATUS, 0);
    wr(dev, reg::STATUS, st::ACKNOWLEDGE);
    wr(dev, reg::STATUS, st::ACKNOWLEDGE | st::DRIVER);
    wr(dev, reg::DEVICE_FEATURES_SEL, 0);
    let lo = rd(dev, reg::DEVICE_FEATURES);
    wr(dev, reg::DEVICE_FEATURES_SEL, 1);
    let hi = rd(dev, reg::DEVICE_FEATURES);
    let offered = (u64::from(hi) << 32) | u64::from(lo);
    let acked = if wanted == u64::MAX { offered } else { wanted };
    wr(dev, reg::DRIVER_FEATURES_SEL, 0);
    wr(dev, reg::DRIVER_FEATURES, acked as u32);
    wr(dev, reg::DRIVER_FEATURES_SEL, 1);
    wr(dev, reg::DRIVER_FEATURES, (acked >> 32) as u32);
    wr(
        dev,
        reg::STATUS,
        st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
    );
    let s = rd(dev, reg::STATUS);
    if s & st::FEATURES_OK == 0 {
        return Err(s);
    }
    Ok(())
}

fn setup_queue(dev: &mut VirtioBlk) {
    wr(dev, reg::QUEUE_SEL, 0);
    assert!(rd(dev, reg::QUEUE_NUM_MAX) >= u32::from(QSIZE));
    wr(dev, reg::QUEUE_NUM, u32::from(QSIZE));
    wr(dev, reg::QUEUE_DESC_LOW, DESC as u32);
    wr(dev, reg::QUEUE_DESC_HIGH, 0);
    wr(dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
    wr(dev, reg::QUEUE_DRIVER_HIGH, 0);
    wr(dev, reg::QUEUE_DEVICE_LOW, USED as u32);
    wr(dev, reg::QUEUE_DEVICE_HIGH, 0);
    wr(dev, reg::QUEUE_READY, 1);
    assert_eq!(rd(dev, reg::QUEUE_READY), 1);
    let s = rd(dev, reg::STATUS);
    wr(dev, reg::STATUS, s | st::DRIVER_OK);
    assert_eq!(rd(dev, reg::STATUS) & st::DRIVER_OK, st::DRIVER_OK);
}

fn rig(disk: Option<(Box<dyn DiskBackend>, bool)>) -> Rig {
    let mem = new_mem();
    let irq = Arc::new(CountIrq::default());
    let mut dev = VirtioBlk::new(3, mem.clone(), irq.clone());
    if let Some((d, ro)) = disk {
        dev.attach(d, ro).unwrap();
    }
    negotiate(&mut dev, u64::MAX).unwrap();
    setup_queue(&mut dev);
    Rig {
        mem,
        irq,
        dev,
        drv: Driver {
            avail_idx: 0,
            used_idx: 0,
        },
    }
}

fn write_desc(mem: &GuestMem, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + u64::from(idx) * 16;
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

/// A data buffer of a request: guest address, length, device-writable.
type Buf = (u64, u32, bool);

impl Rig {
    fn push_avail(&mut self, head: u16) {
        let i = self.drv.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
        self.drv.avail_idx = self.drv.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.drv.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn notify(&mut self) {
        wr(&mut self.dev, reg::QUEUE_NOTIFY, 0);
    }

    fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if idx == self.drv.used_idx {
            return None;
        }
        let at = USED + 4 + 8 * u64::from(self.drv.used_idx % QSIZE);
        self.drv.used_idx = self.drv.used_idx.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        Some((id, len))
    }

    /// Lay out a well-formed request in chain slot `cs` (descriptors `4*cs..`) and make it
    /// available; returns the head index.
    fn post(&mut self, cs: u16, req_type: u32, sector: u64, bufs: &[Buf]) -> u16 {
        assert!(bufs.len() <= 2);
        let head = cs * 4;
        let hdr = HDR + u64::from(cs) * 0x100;
        self.mem.write_obj(req_type, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        write_desc(&self.mem, DESC, head, hdr, 16, F_NEXT, head + 1);
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = head + 1 + i as u16;
            let flags = F_NEXT | if *w { F_WRITE } else { 0 };
            write_desc(&self.mem, DESC, idx, *addr, *len, flags, idx + 1);
        }
        let status_idx = head + 1 + bufs.len() as u16;
        let status_addr = STATUS + u64::from(cs);
        self.mem
            .write_obj(0xffu8, GuestAddress(status_addr))
            .unwrap();
        write_desc(&self.mem, DESC, status_idx, status_addr, 1, F_WRITE, 0);
        self.push_avail(head);
        head
    }

    fn status_of(&self, cs: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(cs)))
            .unwrap()
    }

    /// Post, notify, and return (status, used length).
    fn run(&mut self, req_type: u32, sector: u64, bufs: &[Buf]) -> (u8, u32) {
        let head = self.post(0, req_type, sector, bufs);
        self.notify();
        let (id, len) = self.pop_used().expect("request completed");
        assert_eq!(id, u32::from(head));
        assert!(self.pop_used().is_none());
        (self.status_of(0), len)
    }

    fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        data
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn empty_slot_identifies_as_modern_block_device() {
    let mem = new_mem();
    let mut dev = VirtioBlk::new(0, mem, Arc::new(CountIrq::default()));
    assert_eq!(rd(&mut dev, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut dev, reg::VERSION), 2);
    assert_eq!(rd(&mut dev, reg::DEVICE_ID), VIRTIO_ID_BLOCK);
    assert_eq!(capacity(&mut dev), 0);
    wr(&mut dev, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut dev, reg::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
    wr(&mut dev, reg::DEVICE_FEATURES_SEL, 0);
    let lo = u64::from(rd(&mut dev, reg::DEVICE_FEATURES));
    assert_ne!(lo & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(lo & VIRTIO_BLK_F_RO, 0);
    assert_ne!(lo & VIRTIO_BLK_F_SEG_MAX, 0);
    let mut b = [0u8; 4];
    dev.mmio_read(reg::CONFIG + 12, &mut b);
    assert_eq!(u32::from_le_bytes(b), SEG_MAX);
    dev.mmio_read(reg::CONFIG + 8, &mut b);
    assert_eq!(u32::from_le_bytes(b), SIZE_MAX_BYTES);
}

#[test]
fn feature_negotiation_requires_version_1_and_offered_bits() {
    let mem = new_mem();
    let mut dev = VirtioBlk::new(0, mem, Arc::new(CountIrq::default()));
    // Legacy driver (no VERSION_1): FEATURES_OK does not stick.
    assert!(negotiate(&mut dev, VIRTIO_BLK_F_FLUSH).is_err());
    // A bit the device never offered (VIRTIO_BLK_F_GEOMETRY = 4).
    assert!(negotiate(&mut dev, mmio::VIRTIO_F_VERSION_1 | (1 << 4)).is_err());
    // Queue cannot be made ready without FEATURES_OK.
    wr(&mut dev, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut dev, reg::QUEUE_READY), 0);
    negotiate(&mut dev, mmio::VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH).unwrap();
    assert_eq!(
        dev.transport().driver_features(),
        mmio::VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    );
    setup_queue(&mut dev);
    assert!(dev.transport().driver_ok());
    // Reset clears everything.
    wr(&mut dev, reg::STATUS, 0);
    assert_eq!(rd(&mut dev, reg::STATUS), 0);
    assert_eq!(rd(&mut dev, reg::QUEUE_READY), 0);
    assert_eq!(dev.transport().driver_features(), 0);
}

#[test]
fn write_read_flush_round_trip_is_durable_in_the_file() {
    let img = image(64);
    let mut r = rig(Some((open(&img, false), false)));
    // A write split over two data descriptors: 3 + 5 sectors at sector 7.
    let a = r.fill(DATA, 3 * 512, 0x11);
    let b = r.fill(DATA + 0x4000, 5 * 512, 0x22);
    let (s, len) = r.run(
        VIRTIO_BLK_T_OUT,
        7,
        &[(DATA, 3 * 512, false), (DATA + 0x4000, 5 * 512, false)],
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
    let (s, _) = r.run(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(r.dev.stats().flushes, 1);
    // Durable: another handle on the file sees the bytes.
    let file = std::fs::read(img.path()).unwrap();
    assert_eq!(&file[7 * 512..10 * 512], &a[..]);
    assert_eq!(&file[10 * 512..15 * 512], &b[..]);
    assert!(file[..7 * 512].iter().all(|x| *x == 0));
    // Read back into a different buffer.
    let (s, len) = r.run(VIRTIO_BLK_T_IN, 7, &[(DATA + 0x10000, 8 * 512, true)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 8 * 512 + 1));
    let back = r.read_guest(DATA + 0x10000, 8 * 512);
    assert_eq!(&back[..3 * 512], &a[..]);
    assert_eq!(&back[3 * 512..], &b[..]);
    // The last sector is reachable, one past it is not.
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 63, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 64, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    assert!(r.irq.count() >= 4);
    assert_ne!(r.dev.transport().interrupt_status() & INT_VRING, 0);
}

#[test]
fn device_writes_are_recorded_in_the_dirty_bitmap() {
    let img = image(64);
    let mut r = rig(Some((open(&img, false), false)));
    let region = r.mem.find_region(GuestAddress(0)).unwrap();
    vm_memory::MmapRegion::bitmap(&**region).reset();
    let target = DATA + 0x30000;
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 0, &[(target, 2 * 4096, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let region = r.mem.find_region(GuestAddress(0)).unwrap();
    let bm = region.bitmap();
    use vm_memory::bitmap::Bitmap;
    assert!(bm.dirty_at(target as usize));
    assert!(bm.dirty_at(target as usize + 4096));
    assert!(!bm.dirty_at(target as usize + 2 * 4096));
    assert!(bm.dirty_at(USED as usize), "used ring page");
    assert!(bm.dirty_at(STATUS as usize), "status byte page");
}

#[test]
fn hot_add_raises_config_interrupt_and_capacity() {
    let mut r = rig(None);
    assert_eq!(capacity(&mut r.dev), 0);
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR, "empty slot");
    let gen0 = rd(&mut r.dev, reg::CONFIG_GENERATION);
    let irqs0 = r.irq.count();
    wr(&mut r.dev, reg::INTERRUPT_ACK, INT_VRING | INT_CONFIG);
    let img = image(128);
    r.dev.attach(open(&img, false), false).unwrap();
    assert_eq!(r.irq.count(), irqs0 + 1);
    assert_eq!(rd(&mut r.dev, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_ne!(rd(&mut r.dev, reg::CONFIG_GENERATION), gen0);
    assert_eq!(capacity(&mut r.dev), 128);
    wr(&mut r.dev, reg::INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(rd(&mut r.dev, reg::INTERRUPT_STATUS), 0);
    let data = r.fill(DATA, 512, 9);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 127, &[(DATA, 512, false)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 127, &[(DATA + 0x1000, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(r.read_guest(DATA + 0x1000, 512), data);
    // A second disk on the same slot is refused and leaves the first in place.
    let other = image(8);
    let err = r.dev.attach(open(&other, false), false).unwrap_err();
    assert!(
        matches!(err, VirtioBlkError::SlotOccupied { slot: 3, .. }),
        "{err}"
    );
    assert_eq!(capacity(&mut r.dev), 128);
}

#[test]
fn hot_remove_flushes_returns_disk_and_fails_later_requests() {
    let img = image(16);
    let mut r = rig(Some((open(&img, false), false)));
    let data = r.fill(DATA, 1024, 3);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 2, &[(DATA, 1024, false)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let gen0 = rd(&mut r.dev, reg::CONFIG_GENERATION);
    let irqs0 = r.irq.count();
    let disk = r.dev.detach().unwrap();
    assert_eq!(disk.describe(), img.path().display().to_string());
    assert_eq!(r.irq.count(), irqs0 + 1);
    assert_ne!(rd(&mut r.dev, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    assert_ne!(rd(&mut r.dev, reg::CONFIG_GENERATION), gen0);
    assert_eq!(capacity(&mut r.dev), 0);
    assert_eq!(&std::fs::read(img.path()).unwrap()[1024..2048], &data[..]);
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let w = t == VIRTIO_BLK_T_IN;
        let (s, _) = r.run(t, 0, &[(DATA, 512, w)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
    }
    let (s, _) = r.run(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let err = r.dev.detach().unwrap_err();
    assert!(
        matches!(err, VirtioBlkError::SlotEmpty { slot: 3 }),
        "{err}"
    );
    // The same disk can come back.
    r.dev.attach(disk, false).unwrap();
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 2, &[(DATA + 0x2000, 1024, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(r.read_guest(DATA + 0x2000, 1024), data);
}

struct FailingFlush;
impl DiskBackend for FailingFlush {
    fn len(&self) -> u64 {
        4096
    }
    fn read_at(&mut self, buf: &mut [u8], _off: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _buf: &[u8], _off: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("disk gone"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other("disk gone"))
    }
    fn describe(&self) -> String {
        "failing".into()
    }
}

#[test]
fn backend_errors_become_ioerr_and_failed_detach_keeps_disk() {
    let mut r = rig(Some((Box::new(FailingFlush), false)));
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let err = r.dev.detach().unwrap_err();
    assert!(matches!(err, VirtioBlkError::DetachFlush { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(r.dev.capacity_sectors(), 8);
}

#[test]
fn read_only_slot_refuses_writes() {
    let img = image(16);
    std::fs::write(img.path(), vec![0x5au8; 16 * 512]).unwrap();
    let mut r = rig(Some((open(&img, true), true)));
    assert_ne!(r.dev.transport().driver_features() & VIRTIO_BLK_F_RO, 0);
    r.fill(DATA, 512, 1);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(r.read_guest(DATA, 512), vec![0x5au8; 512]);
    let (s, _) = r.run(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert!(std::fs::read(img.path())
        .unwrap()
        .iter()
        .all(|b| *b == 0x5a));
}

#[test]
fn get_id_and_unsupported_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data-disk.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let mut r = rig(Some((
        Box::new(RawFileDisk::open(&path, false).unwrap()),
        false,
    )));
    let (s, len) = r.run(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
    let id = r.read_guest(DATA, 20);
    assert_eq!(&id[..13], b"data-disk.img");
    assert!(id[13..].iter().all(|b| *b == 0));
    // DISCARD (11) is not offered.
    let (s, _) = r.run(11, 0, &[(DATA, 16, false)]);
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
}

/// Post a raw chain whose head is `head`, notify, and return what came back.
fn run_raw(r: &mut Rig, head: u16) -> Option<(u32, u32)> {
    r.push_avail(head);
    r.notify();
    r.pop_used()
}

fn header(r: &Rig, req_type: u32, sector: u64) {
    r.mem.write_obj(req_type, GuestAddress(HDR)).unwrap();
    r.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    r.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

/// After a malformed chain the device must still serve a good one.
fn still_works(r: &mut Rig) {
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_chains_get_ioerr_or_are_skipped() {
    let img = image(32);
    let mut r = rig(Some((open(&img, false), false)));
    let file_before = std::fs::read(img.path()).unwrap();
    let status = GuestAddress(STATUS);

    // 1. A loop: 0 -> 1 -> 0 ... (both say NEXT). The walk stops after queue-size
    //    steps; the last descriptor is writable so it receives IOERR.
    header(&r, VIRTIO_BLK_T_IN, 0);
    write_desc(&r.mem, DESC, 0, HDR, 16, F_NEXT, 1);
    write_desc(&r.mem, DESC, 1, STATUS, 1, F_NEXT | F_WRITE, 0);
    r.mem.write_obj(0xffu8, status).unwrap();
    assert_eq!(run_raw(&mut r, 0), Some((0, 1)));
    assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_IOERR);
    still_works(&mut r);

    // 2. `next` beyond the queue size.
    write_desc(&r.mem, DESC, 0, HDR, 16, F_NEXT, 1);
    write_desc(&r.mem, DESC, 1, STATUS, 1, F_NEXT | F_WRITE, 999);
    r.mem.write_obj(0xffu8, status).unwrap();
    assert_eq!(run_raw(&mut r, 0), Some((0, 1)));
    assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_IOERR);

    // 3. Too long: an indirect table of 300 writable descriptors.
    for i in 0..300u16 {
        let flags = F_WRITE | if i < 299 { F_NEXT } else { 0 };
        write_desc(
            &r.mem,
            INDIRECT,
            i,
            DATA + u64::from(i) * 512,
            512,
            flags,
            i + 1,
        );
    }
    write_desc(&r.mem, INDIRECT, 0, HDR, 16, F_NEXT, 1);
    write_desc(&r.mem, DESC, 0, INDIRECT, 300 * 16, F_INDIRECT, 0);
    let before = r.dev.stats();
    run_raw(&mut r, 0).expect("returned");
    let after = r.dev.stats();
    assert_eq!(
        after.requests_failed + after.chains_skipped,
        before.requests_failed + before.chains_skipped + 1
    );
    assert_eq!(after.read_bytes, before.read_bytes);
    still_works(&mut r);

    // 4. Data buffer outside guest memory (and one straddling its end).
    for (addr, len) in [(0x4000_0000u64, 512u32), (MEM_BYTES as u64 - 256, 512)] {
        header(&r, VIRTIO_BLK_T_IN, 0);
        write_desc(&r.mem, DESC, 0, HDR, 16, F_NEXT, 1);
        write_desc(&r.mem, DESC, 1, addr, len, F_NEXT | F_WRITE, 2);
        write_desc(&r.mem, DESC, 2, STATUS, 1, F_WRITE, 0);
        r.mem.write_obj(0xffu8, status).unwrap();
        assert_eq!(run_raw(&mut r, 0), Some((0, 1)));
        assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_IOERR);
    }

    // 5. Header outside memory, header too short, header device-writable.
    for (addr, len, flags) in [
        (0x4000_0000u64, 16u32, F_NEXT),
        (HDR, 8, F_NEXT),
        (HDR, 16, F_NEXT | F_WRITE),
    ] {
        header(&r, VIRTIO_BLK_T_IN, 0);
        write_desc(&r.mem, DESC, 0, addr, len, flags, 1);
        write_desc(&r.mem, DESC, 1, DATA, 512, F_NEXT | F_WRITE, 2);
        write_desc(&r.mem, DESC, 2, STATUS, 1, F_WRITE, 0);
        r.mem.write_obj(0xffu8, status).unwrap();
        assert_eq!(run_raw(&mut r, 0), Some((0, 1)));
        assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_IOERR);
    }

    // 6. Sector ranges past the end, including u64 overflow.
    for sector in [32u64, 31 + 1, u64::MAX - 1, u64::MAX / 512] {
        let (s, _) = r.run(VIRTIO_BLK_T_IN, sector, &[(DATA, 1024, true)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR, "sector {sector}");
        let (s, _) = r.run(VIRTIO_BLK_T_OUT, sector, &[(DATA, 1024, false)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR, "sector {sector}");
    }
    // Partially beyond: sectors 31..33.
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 31, &[(DATA, 1024, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);

    // 7. Wrong directions, lengths that are not whole sectors, no data at all.
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_IN, 0, &[]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = r.run(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, false)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);

    // 8. Status descriptor read-only, or of length 0: nowhere to report, skipped.
    for (flags, len) in [(0u16, 1u32), (F_WRITE, 0)] {
        header(&r, VIRTIO_BLK_T_IN, 0);
        write_desc(&r.mem, DESC, 0, HDR, 16, F_NEXT, 1);
        write_desc(&r.mem, DESC, 1, STATUS, len, flags, 0);
        r.mem.write_obj(0xffu8, status).unwrap();
        let before = r.dev.stats().chains_skipped;
        assert_eq!(run_raw(&mut r, 0), Some((0, 0)));
        assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), 0xff);
        assert_eq!(r.dev.stats().chains_skipped, before + 1);
    }

    // 9. Head index beyond the queue: nothing to return, the queue stays usable.
    r.push_avail(200);
    r.notify();
    assert!(r.pop_used().is_none());
    still_works(&mut r);

    // 10. The whole time, nothing was written to the disk.
    assert_eq!(std::fs::read(img.path()).unwrap(), file_before);
    assert!(r.dev.transport().driver_ok());
}

#[test]
fn corrupt_available_index_needs_reset_then_recovers() {
    let img = image(8);
    let mut r = rig(Some((open(&img, false), false)));
    still_works(&mut r);
    // The driver claims 100 new entries in a 16-entry queue.
    r.mem
        .write_obj(r.drv.avail_idx.wrapping_add(100), GuestAddress(AVAIL + 2))
        .unwrap();
    r.notify();
    assert_ne!(rd(&mut r.dev, reg::STATUS) & st::DEVICE_NEEDS_RESET, 0);
    assert!(!r.dev.transport().driver_ok());
    // Reset and set up again; the device works.
    r.mem
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    negotiate(&mut r.dev, u64::MAX).unwrap();
    setup_queue(&mut r.dev);
    r.drv = Driver {
        avail_idx: 0,
        used_idx: 0,
    };
    still_works(&mut r);
}

#[test]
fn bad_register_accesses_are_contained() {
    let img = image(8);
    let mut r = rig(Some((open(&img, false), false)));
    let before = r.dev.stats().guest_errors;
    let mut b1 = [0u8; 1];
    r.dev.mmio_read(reg::MAGIC_VALUE, &mut b1);
    assert_eq!(b1, [0]);
    let mut b8 = [0xaau8; 8];
    r.dev.mmio_read(reg::STATUS, &mut b8);
    assert_eq!(b8, [0; 8]);
    r.dev.mmio_read(0xffc_u64 + 0x1000, &mut [0u8; 4]);
    r.dev.mmio_read(reg::CONFIG + 58, &mut [0u8; 4]);
    r.dev.mmio_read(u64::MAX - 2, &mut [0u8; 4]);
    r.dev.mmio_read(0x0c8, &mut [0u8; 4]);
    r.dev.mmio_write(reg::STATUS, &[0xff]);
    r.dev.mmio_write(reg::CONFIG, &[1, 2, 3, 4]);
    r.dev.mmio_write(0x002, &[0u8; 4]);
    wr(&mut r.dev, reg::MAGIC_VALUE, 1);
    wr(&mut r.dev, reg::QUEUE_NOTIFY, 5);
    // Queue reconfiguration while live is refused.
    wr(&mut r.dev, reg::QUEUE_NUM, 8);
    wr(&mut r.dev, reg::QUEUE_DESC_LOW, 0x7);
    // Clearing status bits without reset is refused.
    wr(&mut r.dev, reg::STATUS, st::ACKNOWLEDGE);
    assert!(r.dev.stats().guest_errors >= before + 10);
    assert!(r.dev.transport().driver_ok());
    still_works(&mut r);
}

#[test]
fn queue_rings_outside_memory_are_refused() {
    let mem = new_mem();
    let mut dev = VirtioBlk::new(0, mem, Arc::new(CountIrq::default()));
    negotiate(&mut dev, u64::MAX).unwrap();
    wr(&mut dev, reg::QUEUE_NUM, 16);
    wr(&mut dev, reg::QUEUE_DESC_LOW, (MEM_BYTES - 64) as u32);
    wr(&mut dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
    wr(&mut dev, reg::QUEUE_DEVICE_LOW, USED as u32);
    wr(&mut dev, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut dev, reg::QUEUE_READY), 0);
    // Unaligned and non-power-of-two values are refused.
    wr(&mut dev, reg::QUEUE_NUM, 12);
    wr(&mut dev, reg::QUEUE_DESC_LOW, 0x1008);
    assert!(dev.stats().guest_errors >= 3);
}

fn copy_mem(src: &GuestMem) -> GuestMem {
    let dst = new_mem();
    let mut buf = vec![0u8; MEM_BYTES];
    src.read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.write_slice(&buf, GuestAddress(0)).unwrap();
    dst
}

#[test]
fn snapshot_mid_use_resumes_exactly() {
    let img = image(64);
    let mut r = rig(Some((open(&img, false), false)));
    let data = r.fill(DATA, 4096, 0x42);
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 10, &[(DATA, 4096, false)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    // Two requests made available, the guest was paused before notifying.
    r.post(1, VIRTIO_BLK_T_IN, 10, &[(DATA + 0x8000, 4096, true)]);
    r.post(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(r.dev.quiesce(), 2);
    assert_eq!(r.dev.quiesce(), 0);
    let state = r.dev.save_state();
    assert_eq!(state.transport.queue.next_avail, 3);
    assert_eq!(state.transport.queue.next_used, 3);
    assert_eq!(state.transport.queue.size, QSIZE);
    assert!(state.transport.queue.ready);
    let backing = state.backing.clone().unwrap();
    assert_eq!(backing.size_bytes, 64 * 512);
    assert!(!backing.read_only);
    // Through a serialized form, as the snapshot file and migration carry it.
    let bytes = bincode::serialize(&state).unwrap();
    let state2: VirtioBlkState = bincode::deserialize(&bytes).unwrap();
    assert_eq!(state2, state);
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(
        serde_json::from_str::<VirtioBlkState>(&json).unwrap(),
        state
    );

    // Source goes away (detach closes the disk); the target gets copied memory.
    let mem2 = copy_mem(&r.mem);
    drop(r.dev.detach().unwrap());
    let irq2 = Arc::new(CountIrq::default());
    let disk = Box::new(RawFileDisk::open(&backing.description, false).unwrap());
    let dev2 = VirtioBlk::restore(&state2, mem2.clone(), irq2.clone(), Some(disk)).unwrap();
    let mut r2 = Rig {
        mem: mem2,
        irq: irq2,
        dev: dev2,
        drv: Driver {
            avail_idx: r.drv.avail_idx,
            used_idx: r.drv.used_idx,
        },
    };
    // The completions made before the snapshot are in the copied memory.
    assert_eq!(r2.pop_used(), Some((4, 4096 + 1)));
    assert_eq!(r2.pop_used(), Some((8, 1)));
    assert_eq!(r2.read_guest(DATA + 0x8000, 4096), data);
    assert!(r2.dev.transport().driver_ok());
    assert_eq!(capacity(&mut r2.dev), 64);
    // And the queue continues at the right indices.
    let (s, _) = r2.run(VIRTIO_BLK_T_IN, 10, &[(DATA + 0x10000, 4096, true)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(r2.read_guest(DATA + 0x10000, 4096), data);
    assert_eq!(r2.dev.save_state().transport.queue.next_used, 4);
}

#[test]
fn restore_rejects_inconsistent_state() {
    let img = image(16);
    let r = rig(Some((open(&img, false), false)));
    let state = r.dev.save_state();
    let irq: Arc<dyn IrqLine> = Arc::new(CountIrq::default());
    let err = VirtioBlk::restore(&state, new_mem(), irq.clone(), None).unwrap_err();
    assert!(
        matches!(err, VirtioBlkError::BackingPresence { .. }),
        "{err}"
    );
    let small = image(8);
    let err =
        VirtioBlk::restore(&state, new_mem(), irq.clone(), Some(open(&small, false))).unwrap_err();
    assert!(
        matches!(
            err,
            VirtioBlkError::BackingSize {
                saved_bytes: 8192,
                actual_bytes: 4096,
                ..
            }
        ),
        "{err}"
    );
    let mut bad = state.clone();
    bad.transport.queue.size = 3;
    let err =
        VirtioBlk::restore(&bad, new_mem(), irq.clone(), Some(open(&img, false))).unwrap_err();
    assert!(matches!(err, VirtioBlkError::State { .. }), "{err}");
    let mut bad = state.clone();
    bad.transport.queue.max_size = 1024;
    assert!(VirtioBlk::restore(&bad, new_mem(), irq.clone(), Some(open(&img, false))).is_err());
    let mut bad = state.clone();
    bad.transport.driver_features |= 1 << 40;
    assert!(VirtioBlk::restore(&bad, new_mem(), irq.clone(), Some(open(&img, false))).is_err());
    let mut empty = state.clone();
    empty.backing = None;
    let err =
        VirtioBlk::restore(&empty, new_mem(), irq.clone(), Some(open(&img, false))).unwrap_err();
    assert!(
        matches!(err, VirtioBlkError::BackingPresence { .. }),
        "{err}"
    );
    let mut other = VirtioBlk::new(5, new_mem(), irq);
    let err = other
        .restore_in_place(&state, Some(open(&img, false)))
        .unwrap_err();
    assert!(
        matches!(err, VirtioBlkError::SlotMismatch { slot: 5, saved: 3 }),
        "{err}"
    );
    assert!(serde_json::from_str::<VirtioBlkState>(r#"{"slot":1,"bogus":2}"#).is_err());
}

#[test]
fn attach_detach_from_another_thread_while_guest_does_io() {
    use std::sync::Mutex;
    let img = image(64);
    let spare = image(32);
    let r = rig(Some((open(&img, false), false)));
    let Rig { mem, irq, dev, drv } = r;
    let dev = Arc::new(Mutex::new(dev));
    let plug = {
        let dev = dev.clone();
        let path = spare.path().to_path_buf();
        std::thread::spawn(move || {
            let mut d2 = VirtioBlk::new(4, new_mem(), Arc::new(CountIrq::default()));
            for _ in 0..50 {
                let disk = Box::new(RawFileDisk::open(&path, false).unwrap());
                d2.attach(disk, false).unwrap();
                d2.detach().unwrap();
                // Hot-plug on the busy slot too: detach and re-attach its own disk.
                let mut g = dev.lock().unwrap();
                let disk = g.detach().unwrap();
                g.attach(disk, false).unwrap();
            }
        })
    };
    let mut r = Rig {
        mem,
        irq,
        dev: VirtioBlk::new(7, new_mem(), Arc::new(CountIrq::default())),
        drv,
    };
    let mut ok = 0;
    for i in 0..200u64 {
        let mut g = dev.lock().unwrap();
        std::mem::swap(&mut r.dev, &mut g);
        let (s, _) = r.run(VIRTIO_BLK_T_OUT, i % 64, &[(DATA, 512, false)]);
        std::mem::swap(&mut r.dev, &mut g);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        ok += 1;
    }
    plug.join().unwrap();
    assert_eq!(ok, 200);
    assert!(r.irq.count() >= 100, "config-change interrupts were raised");
}

/// Deterministic fuzzing: random descriptor tables, ring entries and headers. The
/// device must never panic, never write the disk beyond its end, and keep serving.
#[test]
fn random_chains_never_panic() {
    let img = image(16);
    let mut r = rig(Some((open(&img, false), false)));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..2000 {
        for i in 0..QSIZE {
            let v = next();
            let addr = match v % 4 {
                0 => HDR,
                1 => DATA + (v >> 8) % 0x8000,
                2 => STATUS,
                _ => v >> 16,
            };
            let len = match (v >> 4) % 4 {
                0 => 16,
                1 => 512 * ((v >> 20) % 4) as u32,
                2 => 1,
                _ => (v >> 32) as u32,
            };
            let flags = ((v >> 40) % 8) as u16;
            let nxt = ((v >> 48) % 20) as u16;
            write_desc(&r.mem, DESC, i, addr, len, flags, nxt);
        }
        let v = next();
        header(&r, (v % 10) as u32, (v >> 8) % 40);
        let n = 1 + (v >> 32) % 3;
        for _ in 0..n {
            let head = (next() % 18) as u16;
            r.push_avail(head);
        }
        r.notify();
        while r.pop_used().is_some() {}
        if round % 100 == 0 {
            still_works(&mut r);
        }
    }
    assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 16 * 512);
    still_works(&mut r);
}

#[test]
fn state_codec_round_trips_and_rejects_garbage() {
    let img = image(16);
    let mut r = rig(Some((open(&img, true), true)));
    still_works(&mut r);
    let state = r.dev.save_state();
    let bytes = state.encode();
    assert_eq!(VirtioBlkState::decode(&bytes).unwrap(), state);
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        VirtioBlkState::decode(&trailing),
        Err(StateDecodeError::Malformed(_))
    ));
    assert!(matches!(
        VirtioBlkState::decode(&vec![0u8; 70 << 10]),
        Err(StateDecodeError::TooLarge { .. })
    ));
    assert!(VirtioBlkState::decode(&bytes[..bytes.len() / 2]).is_err());
    // A huge string length prefix must not allocate its way to an abort.
    let mut huge = bytes.clone();
    let desc_len_at = bytes.len() - 8 - 1 - state.backing.as_ref().unwrap().description.len() - 8;
    huge[desc_len_at..desc_len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(VirtioBlkState::decode(&huge).is_err());
}

/// Deterministic fuzzing of the state decoder and of restore: mutated encodings never
/// panic; whatever decodes is either restored consistently or refused with an error.
#[test]
fn mutated_states_never_panic() {
    let img = image(16);
    let mut r = rig(Some((open(&img, false), false)));
    still_works(&mut r);
    let bytes = r.dev.save_state().encode();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut restored = 0;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if let Ok(state) = VirtioBlkState::decode(&b) {
            let disk = state.backing.as_ref().map(|_| open(&img, false));
            let irq: Arc<dyn IrqLine> = Arc::new(CountIrq::default());
            if let Ok(mut dev) = VirtioBlk::restore(&state, new_mem(), irq, disk) {
                restored += 1;
                // Whatever was restored must survive guest activity.
                dev.quiesce();
                wr(&mut dev, reg::QUEUE_NOTIFY, 0);
                let _ = rd(&mut dev, reg::STATUS);
            }
        }
    }
    assert!(restored > 0);
}

/// Deterministic fuzzing of the register interface: random accesses of random widths
/// at random offsets, interleaved with random guest memory contents, notifications,
/// hot-plug and quiesce. Nothing may panic and the disk must keep its size.
#[test]
fn random_register_traffic_never_panics() {
    let img = image(16);
    let mut r = rig(Some((open(&img, false), false)));
    let mut x: u64 = 0xdead_beef_cafe_f00d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let v = next();
        let offset = (v >> 8) % 0x180;
        let width = [1usize, 2, 4, 8, 3][(v % 5) as usize];
        match (v >> 40) % 8 {
            0..=2 => {
                let mut b = vec![0u8; width];
                r.dev.mmio_read(offset, &mut b);
            }
            3..=4 => {
                // Mostly well-formed 32-bit writes so the state machine gets deep.
                let val = match (v >> 50) % 4 {
                    0 => 0,
                    1 => 1,
                    2 => (v >> 32) as u32 & 0xff,
                    _ => (v >> 16) as u32,
                };
                wr(&mut r.dev, offset & !3, val);
            }
            5 => {
                let bytes = (next() as u128).to_le_bytes();
                r.dev.mmio_write(offset, &bytes[..width]);
            }
            6 => {
                let addr = next() % (0x4000 - 8);
                r.mem.write_obj(next(), GuestAddress(addr)).unwrap();
                r.notify();
            }
            _ => match r.dev.detach() {
                Ok(d) => r.dev.attach(d, v & 1 == 0).unwrap(),
                Err(_) => {
                    r.dev.attach(open(&img, false), false).unwrap();
                    r.dev.quiesce();
                }
            },
        }
    }
    assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 16 * 512);
    // The device still comes up cleanly for a fresh driver.
    r.mem
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    negotiate(&mut r.dev, u64::MAX).unwrap();
    setup_queue(&mut r.dev);
    r.drv = Driver {
        avail_idx: 0,
        used_idx: 0,
    };
    if r.dev.capacity_sectors() == 0 {
        r.dev.attach(open(&img, false), false).unwrap();
    }
    still_works(&mut r);
}

/// A backend that does no bounds checking of its own and records every access, to prove
/// the device checks sector ranges before the backend is touched.
struct SpyDisk {
    data: Vec<u8>,
    len: u64,
    calls: Arc<std::sync::Mutex<Vec<(u64, usize)>>>,
}
impl DiskBackend for SpyDisk {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push((off, buf.len()));
        let o = off as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push((off, buf.len()));
        let o = off as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "spy".into()
    }
}

#[test]
fn sector_range_is_checked_before_the_backend() {
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    // 8 sectors visible, slack behind them that must never be reached.
    let spy = SpyDisk {
        data: vec![0u8; 64 * 512],
        len: 8 * 512,
        calls: calls.clone(),
    };
    let mut r = rig(Some((Box::new(spy), false)));
    for (sector, sectors) in [
        (8u64, 1u32),
        (7, 2),
        (9, 1),
        (u64::MAX, 1),
        (u64::MAX / 512, 1),
    ] {
        for (t, w) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
            let (s, _) = r.run(t, sector, &[(DATA, sectors * 512, w)]);
            assert_eq!(s, VIRTIO_BLK_S_IOERR, "sector {sector} x{sectors}");
        }
    }
    assert!(
        calls.lock().unwrap().is_empty(),
        "{:?}",
        calls.lock().unwrap()
    );
    let (s, _) = r.run(VIRTIO_BLK_T_OUT, 7, &[(DATA, 512, false)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(*calls.lock().unwrap(), vec![(7 * 512, 512)]);
}
