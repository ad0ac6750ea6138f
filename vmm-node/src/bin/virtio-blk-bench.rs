//! virtio-blk benchmark: prints figures, each next to a baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p vmm-node --bin virtio-blk-bench [-- --seconds 2]
//! ```
//!
//! 1. Device path, host side: requests posted as real descriptor chains in guest memory
//!    and served through `QueueNotify` (no VM), against direct `pread`/`pwrite` of the
//!    same sizes on the same image file (page cache warm).
//! 2. Guest path: the test guest's polling driver (disk workload: 64 KiB write, flush,
//!    64 KiB read + verify per pass) on a real KVM VM, against the same pass done by the
//!    host directly on a file.
//! 3. Hot-plug: time `attach` and `detach` (which flushes) hold the slot's lock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use vm_memory::{Bytes, GuestAddress};
use vmm_node::devices::virtio::blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vmm_node::devices::virtio::mmio::{reg, status};
use vmm_node::devices::virtio::{slot_irq, slot_mmio_base, VirtioBlk, SLOT_MMIO_SIZE_BYTES};
use vmm_node::devices::{IrqLine, MmioDevice};
use vmm_node::disk::{DiskBackend, RawFileDisk};
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::{GuestMem, Vm, VmConfig};

const IMAGE_BYTES: u64 = 64 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const STATUS_BYTE: u64 = 0x5000;
const DATA: u64 = 0x10_0000;

/// Counts MMIO accesses and the time the device spends serving them.
struct Timed {
    inner: Arc<Mutex<VirtioBlk>>,
    accesses: Arc<std::sync::atomic::AtomicU64>,
    nanos: Arc<std::sync::atomic::AtomicU64>,
}

impl Timed {
    fn account(&self, t: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        self.accesses.fetch_add(1, Relaxed);
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
    }
}

impl MmioDevice for Timed {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let t = Instant::now();
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mmio_read(offset, data);
        self.account(t);
    }
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let t = Instant::now();
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mmio_write(offset, data);
        self.account(t);
    }
}

struct NoIrq;
impl IrqLine for NoIrq {
    fn trigger(&self) {}
}

fn wr(dev: &mut VirtioBlk, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

/// Minimal driver: one request at a time, descriptors 0..3.
struct HostDriver {
    mem: GuestMem,
    dev: VirtioBlk,
    avail_idx: u16,
}

impl HostDriver {
    fn new(disk: Box<dyn DiskBackend>) -> anyhow::Result<Self> {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
        let mut dev = VirtioBlk::new(0, mem.clone(), Arc::new(NoIrq));
        dev.attach(disk, false)?;
        let s = status::ACKNOWLEDGE | status::DRIVER;
        wr(&mut dev, reg::STATUS, s);
        wr(&mut dev, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut dev, reg::DRIVER_FEATURES, 1);
        wr(&mut dev, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut dev, reg::DRIVER_FEATURES, 1 << 9);
        wr(&mut dev, reg::STATUS, s | status::FEATURES_OK);
        wr(&mut dev, reg::QUEUE_NUM, u32::from(QSIZE));
        wr(&mut dev, reg::QUEUE_DESC_LOW, DESC as u32);
        wr(&mut dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        wr(&mut dev, reg::QUEUE_DEVICE_LOW, USED as u32);
        wr(&mut dev, reg::QUEUE_READY, 1);
        wr(
            &mut dev,
            reg::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        anyhow::ensure!(dev.transport().driver_ok(), "driver setup failed");
        Ok(Self {
            mem,
            dev,
            avail_idx: 0,
        })
    }

    fn desc(&self, idx: u64, addr: u64, len: u32, flags: u16, next: u16) -> anyhow::Result<()> {
        let at = DESC + idx * 16;
        self.mem.write_obj(addr, GuestAddress(at))?;
        self.mem.write_obj(len, GuestAddress(at + 8))?;
        self.mem.write_obj(flags, GuestAddress(at + 12))?;
        self.mem.write_obj(next, GuestAddress(at + 14))?;
        Ok(())
    }

    fn request(&mut self, req_type: u32, sector: u64, len: u32) -> anyhow::Result<()> {
        self.mem.write_obj(req_type, GuestAddress(HDR))?;
        self.mem.write_obj(sector, GuestAddress(HDR + 8))?;
        self.desc(0, HDR, 16, 1, 1)?;
        if len > 0 {
            let flags = if req_type == VIRTIO_BLK_T_IN {
                1 | 2
            } else {
                1
            };
            self.desc(1, DATA, len, flags, 2)?;
            self.desc(2, STATUS_BYTE, 1, 2, 0)?;
        } else {
            self.desc(1, STATUS_BYTE, 1, 2, 0)?;
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))?;
        wr(&mut self.dev, reg::QUEUE_NOTIFY, 0);
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2))?;
        anyhow::ensure!(used == self.avail_idx, "request not completed");
        let st: u8 = self.mem.read_obj(GuestAddress(STATUS_BYTE))?;
        anyhow::ensure!(st == VIRTIO_BLK_S_OK, "request failed with status {st}");
        Ok(())
    }
}

/// Alternating measurement rounds per row.
const ROUNDS: u32 = 5;

fn median(mut v: Vec<f64>) -> f64 {
    vmm_node::bench_stats::median(&mut v).unwrap_or(f64::NAN)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run `op` for `dur`; returns operations per second.
fn rate(dur: Duration, mut op: impl FnMut(u64) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        op(n)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn device_path(img: &std::path::Path, dur: Duration) -> anyhow::Result<()> {
    println!(
        "== device path (host-side driver, no VM) vs direct pread/pwrite, {IMAGE_BYTES} B image, median of {ROUNDS} alternating rounds"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>10} {:>12} {:>16}",
        "op", "device op/s", "direct op/s", "MB/s dev", "ratio", "overhead ns/op"
    );
    let mut drv = HostDriver::new(Box::new(RawFileDisk::open(img, false)?))?;
    let mut direct = RawFileDisk::open(img, false)?;
    let mut buf = vec![0u8; 1 << 20];
    let sectors = IMAGE_BYTES / 512;
    for (name, len, write, random) in [
        ("4 KiB random read", 4096u32, false, true),
        ("4 KiB random write", 4096, true, true),
        ("64 KiB seq read", 65536, false, false),
        ("64 KiB seq write", 65536, true, false),
        ("1 MiB seq read", 1 << 20, false, false),
    ] {
        let per = u64::from(len) / 512;
        let mut rng = Rng(0x1234_5678);
        let mut pick = move |n: u64| {
            if random {
                (rng.next() % (sectors / per)) * per
            } else {
                (n * per) % (sectors - per + 1)
            }
        };
        let t = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let mut rng2 = Rng(0x1234_5678);
        let mut pick2 = move |n: u64| {
            if random {
                (rng2.next() % (sectors / per)) * per
            } else {
                (n * per) % (sectors - per + 1)
            }
        };
        let b = &mut buf[..len as usize];
        // Alternate device and direct rounds so both see the same machine load and
        // page-cache state; report the median round of each.
        let (mut dev_rates, mut direct_rates) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            dev_rates.push(rate(dur / ROUNDS, |n| drv.request(t, pick(n), len))?);
            direct_rates.push(rate(dur / ROUNDS, |n| {
                let off = pick2(n) * 512;
                if write {
                    direct.write_at(b, off)?
                } else {
                    direct.read_at(b, off)?
                }
                Ok(())
            })?);
        }
        let (dev_rate, direct_rate) = (median(dev_rates), median(direct_rates));
        let overhead_ns = (1.0 / dev_rate - 1.0 / direct_rate) * 1e9;
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>10.1} {:>12.2} {:>16.0}",
            name,
            dev_rate,
            direct_rate,
            dev_rate * f64::from(len) / 1e6,
            dev_rate / direct_rate,
            overhead_ns
        );
    }
    // Write back what the write rows dirtied, so both flush rows start clean.
    direct.flush()?;
    let (mut dev_rates, mut direct_rates) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        dev_rates.push(rate(dur / ROUNDS, |_| {
            drv.request(VIRTIO_BLK_T_FLUSH, 0, 0)
        })?);
        direct_rates.push(rate(dur / ROUNDS, |_| Ok(direct.flush()?))?);
    }
    let (dev_flush, direct_flush) = (median(dev_rates), median(direct_rates));
    println!(
        "{:<22} {:>12.0} {:>12.0} {:>10} {:>12.2} {:>16.0}",
        "flush (fdatasync)",
        dev_flush,
        direct_flush,
        "-",
        dev_flush / direct_flush,
        (1.0 / dev_flush - 1.0 / direct_flush) * 1e9
    );
    Ok(())
}

fn guest_path(dir: &std::path::Path, dur: Duration) -> anyhow::Result<()> {
    println!("== guest path: test guest's polling driver on a KVM VM vs the same pass on the host");
    let img = dir.join("guest.img");
    std::fs::File::create(&img)?.set_len(1 << 20)?;
    let mut cfg = VmConfig::new(1, 64, vmm_node::test_guest::PATH);
    cfg.cmdline = Workload::new(WorkloadKind::Disk).cmdline();
    let vm = Vm::create(cfg).context("create VM")?;
    let accesses = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let nanos = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut slots = Vec::new();
    for i in 0..8 {
        let dev = Arc::new(Mutex::new(VirtioBlk::new(
            i as u8,
            vm.memory().clone(),
            vm.irq_line(slot_irq(i))?,
        )));
        let bus: Arc<Mutex<dyn MmioDevice>> = Arc::new(Mutex::new(Timed {
            inner: dev.clone(),
            accesses: accesses.clone(),
            nanos: nanos.clone(),
        }));
        vm.register_mmio_device(slot_mmio_base(i), SLOT_MMIO_SIZE_BYTES, bus)?;
        slots.push(dev);
    }
    slots[0]
        .lock()
        .map_err(|_| anyhow::anyhow!("slot lock poisoned"))?
        .attach(Box::new(RawFileDisk::open(&img, false)?), false)?;
    let passes = |vm: &Vm| -> u64 {
        heartbeats(&vm.console().text())
            .last()
            .and_then(|h| h.fields.get("disk_passes").and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    vm.start()?;
    let warm = Instant::now();
    while passes(&vm) < 1 {
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(30),
            "guest never passed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    use std::sync::atomic::Ordering::Relaxed;
    let (p0, t0) = (passes(&vm), Instant::now());
    let (a0, n0) = (accesses.load(Relaxed), nanos.load(Relaxed));
    std::thread::sleep(dur.max(Duration::from_secs(2)));
    let (p1, t1) = (passes(&vm), Instant::now());
    let (a1, n1) = (accesses.load(Relaxed), nanos.load(Relaxed));
    vm.pause()?;
    let stats = slots[0]
        .lock()
        .map_err(|_| anyhow::anyhow!("slot lock poisoned"))?
        .stats();
    vm.destroy()?;
    let passes_done = (p1 - p0).max(1);
    let device_us_per_pass = (n1 - n0) as f64 / 1e3 / passes_done as f64;
    let exits_per_pass = (a1 - a0) as f64 / passes_done as f64;

    let mut d = RawFileDisk::open(&img, false)?;
    let mut buf = vec![0x5au8; 64 << 10];
    let host_pps = rate(dur, |_| {
        d.write_at(&buf, 0)?;
        d.flush()?;
        d.read_at(&mut buf, 0)?;
        Ok(())
    })?;
    println!(
        "guest passes/s {:.1} (paced: one pass per 100 ms heartbeat, by design of the workload)",
        (p1 - p0) as f64 / (t1 - t0).as_secs_f64()
    );
    println!(
        "per pass (slot probe + 64 KiB write + flush + 64 KiB read): {exits_per_pass:.0} MMIO exits, \
         {device_us_per_pass:.0} us inside the device; host doing the same directly: {:.0} us",
        1e6 / host_pps
    );
    println!("device stats {stats:?}");
    Ok(())
}

fn hotplug(img: &std::path::Path) -> anyhow::Result<()> {
    println!("== hot-plug: lock hold time of attach / detach (detach includes fdatasync)");
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let mut dev = VirtioBlk::new(0, mem, Arc::new(NoIrq));
    let rounds = 200u32;
    let (mut attach, mut open, mut detach) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        let disk = Box::new(RawFileDisk::open(img, false)?);
        open += t.elapsed();
        let t = Instant::now();
        dev.attach(disk, false)?;
        attach += t.elapsed();
        let t = Instant::now();
        drop(dev.detach()?);
        detach += t.elapsed();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(rounds);
    println!(
        "open image {:.1} us (baseline, outside the lock), attach {:.1} us, detach {:.1} us",
        us(open),
        us(attach),
        us(detach)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut seconds = 1.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds must be a number")?
            }
            other => anyhow::bail!("unknown argument {other:?} (usage: [--seconds S])"),
        }
    }
    let dur = Duration::from_secs_f64(seconds);
    let dir = std::env::temp_dir().join(format!("virtio-blk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("bench.img");
    std::fs::write(&img, vec![0u8; IMAGE_BYTES as usize])?;
    let result = device_path(&img, dur)
        .and_then(|()| hotplug(&img))
        .and_then(|()| guest_path(&dir, dur));
    std::fs::remove_dir_all(&dir)?;
    result
}
