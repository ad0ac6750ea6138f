//! Cost of the fence check per write, against an unfenced `pwrite` of the same file.
//!
//! Usage: `csv-fence-bench [--writes N] [--rounds R] [--block-bytes B] [--dir PATH]`
//!
//! Each round times N writes of B bytes at pseudo-random block offsets of a 64 MiB
//! sparse image (page cache, no fsync) four ways, interleaved so drift hits all alike:
//! - `unfenced`: `FileExt::write_all_at` on a plain `File` (the baseline);
//! - `fenced`: `FencedDisk::write_at` (one `stat` of the fence record per write);
//! - `fenced, at most every 1 ms`: the same with `FenceCheck::AtMostEvery`;
//! - `check only`: `FencedDisk::check_fence` alone;
//! - `re-read record`: open + read + decode + close of the record, the design the
//!   cached check avoids;
//! - `pread held record`: `pread` of the 36-byte record on a held descriptor plus
//!   decode, the in-place-update design (not used: it cannot see a record replaced by
//!   rename, and an in-place update is not crash-atomic);
//! - `null syscall`: `getpid`, the floor any per-write check by syscall pays here.
//!
//! It also prints lock-table `apply` throughput (acquire + release pairs).
//! Prints the median over rounds, in ns per operation.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use csv_volume::fence::{
    fence_path, read_fence_record, write_fence_record, FenceRecord, FENCE_RECORD_LEN_BYTES,
};
use csv_volume::{
    ApplyContext, DiskName, FenceCheck, FencedDisk, FencingToken, LockCommand, LockMode, LockTable,
};

const DISK_SIZE_BYTES: u64 = 64 << 20;

struct Args {
    writes: usize,
    rounds: usize,
    block_bytes: usize,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        writes: 50_000,
        rounds: 7,
        block_bytes: 4096,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--writes" => args.writes = value()?.parse().map_err(|e| format!("--writes: {e}"))?,
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--block-bytes" => {
                args.block_bytes = value()?
                    .parse()
                    .map_err(|e| format!("--block-bytes: {e}"))?
            }
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.writes == 0 || args.rounds == 0 {
        return Err("--writes and --rounds must be positive".into());
    }
    if args.block_bytes == 0 || args.block_bytes as u64 > DISK_SIZE_BYTES {
        return Err(format!("--block-bytes must be in 1..={DISK_SIZE_BYTES}"));
    }
    Ok(args)
}

/// Offsets from a small LCG: deterministic, spread over the image.
fn offsets(n: usize, block_bytes: usize) -> Vec<u64> {
    let blocks = DISK_SIZE_BYTES / block_bytes as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % blocks) * block_bytes as u64
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_ns_per_op(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("csv-fence-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("csv-fence-bench: {e}");
        let mut source = std::error::Error::source(&*e);
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("csv-fence-bench-{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    let result = bench(args, &dir);
    std::fs::remove_dir_all(&dir)?;
    result
}

fn bench(args: &Args, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let plain_path = dir.join("plain.img");
    let fenced_path = dir.join("fenced.img");
    let lazy_path = dir.join("lazy.img");
    for p in [&plain_path, &fenced_path, &lazy_path] {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)?
            .set_len(DISK_SIZE_BYTES)?;
    }
    let token = FencingToken(42);
    let record = FenceRecord {
        token,
        node: 1,
        mode: LockMode::Exclusive,
        term: 1,
    };
    write_fence_record(&fenced_path, &record)?;
    write_fence_record(&lazy_path, &record)?;
    let plain = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&plain_path)?;
    let mut fenced = FencedDisk::open(&fenced_path, None, 1, token, LockMode::Exclusive)?;
    let mut lazy = FencedDisk::open(&lazy_path, None, 1, token, LockMode::Exclusive)?;
    lazy.set_fence_check(FenceCheck::AtMostEvery {
        max_staleness: std::time::Duration::from_millis(1),
    });

    let offs = offsets(args.writes, args.block_bytes);
    let buf = vec![0x5Au8; args.block_bytes];
    let held_record = std::fs::File::open(fence_path(&fenced_path))?;
    let mut pread_ns = Vec::new();
    let (mut unfenced_ns, mut fenced_ns, mut lazy_ns, mut check_ns, mut reread_ns, mut null_ns) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    // Warm the page cache for all images.
    for &o in &offs {
        plain.write_all_at(&buf, o)?;
        fenced.write_at(&buf, o)?;
        lazy.write_at(&buf, o)?;
    }
    let mut failed: Option<std::io::Error> = None;
    for _ in 0..args.rounds {
        unfenced_ns.push(time_ns_per_op(args.writes, |i| {
            if let Err(e) = plain.write_all_at(&buf, offs[i]) {
                failed.get_or_insert(e);
            }
        }));
        fenced_ns.push(time_ns_per_op(args.writes, |i| {
            if let Err(e) = fenced.write_at(&buf, offs[i]) {
                failed.get_or_insert(e);
            }
        }));
        lazy_ns.push(time_ns_per_op(args.writes, |i| {
            if let Err(e) = lazy.write_at(&buf, offs[i]) {
                failed.get_or_insert(e);
            }
        }));
        pread_ns.push(time_ns_per_op(args.writes, |_| {
            let mut rec = [0u8; FENCE_RECORD_LEN_BYTES];
            let decoded = held_record
                .read_exact_at(&mut rec, 0)
                .map_err(std::io::Error::other)
                .and_then(|()| FenceRecord::decode(&rec).map_err(std::io::Error::other));
            match decoded {
                Ok(r) => {
                    black_box(r);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }));
        null_ns.push(time_ns_per_op(args.writes, |_| {
            black_box(std::process::id());
        }));
        check_ns.push(time_ns_per_op(args.writes, |_| {
            if let Err(e) = fenced.check_fence() {
                failed.get_or_insert(std::io::Error::other(e));
            }
        }));
        reread_ns.push(time_ns_per_op(args.writes, |_| {
            match read_fence_record(&fenced_path) {
                Ok(r) => {
                    black_box(r);
                }
                Err(e) => {
                    failed.get_or_insert(std::io::Error::other(e));
                }
            }
        }));
    }
    if let Some(e) = failed {
        return Err(e.into());
    }

    let (u, f, l, c, r, z) = (
        median(unfenced_ns),
        median(fenced_ns),
        median(lazy_ns),
        median(check_ns),
        median(reread_ns),
        median(null_ns),
    );
    println!(
        "csv-fence-bench: {} writes x {} rounds, {}-byte blocks, 64 MiB image in {}",
        args.writes,
        args.rounds,
        args.block_bytes,
        dir.display()
    );
    println!("unfenced pwrite (baseline)   {u:>9.0} ns/write");
    println!(
        "FencedDisk::write_at         {f:>9.0} ns/write  ({:+.0} ns, {:+.1}% vs baseline)",
        f - u,
        (f - u) / u * 100.0
    );
    println!(
        "  ..check at most every 1 ms  {l:>9.0} ns/write  ({:+.0} ns, {:+.1}% vs baseline)",
        l - u,
        (l - u) / u * 100.0
    );
    println!("fence check alone (stat)     {c:>9.0} ns/check");
    println!(
        "pread held record + decode   {:>9.0} ns/check  (alternative, not used)",
        median(pread_ns)
    );
    println!("null syscall (getpid)        {z:>9.0} ns/call");
    println!(
        "re-read record (open+read)   {r:>9.0} ns/check  ({:.1}x the cached check)",
        r / c
    );

    // Lock table apply throughput: acquire + release on 1000 disks.
    let disks: Vec<DiskName> = (0..1000)
        .map(|i| DiskName::parse(&format!("vol/vm{i}/root.img")))
        .collect::<Result<_, _>>()?;
    let mut table = LockTable::new();
    let mut index = 0u64;
    let down = BTreeSet::new();
    let mut apply_ns = Vec::new();
    for _ in 0..args.rounds {
        let n = disks.len() * 2;
        apply_ns.push(time_ns_per_op(n, |i| {
            index += 1;
            let disk = disks[i / 2].clone();
            let cmd = if i % 2 == 0 {
                LockCommand::Acquire {
                    disk,
                    node: 1,
                    mode: LockMode::Exclusive,
                }
            } else {
                LockCommand::Release { disk, node: 1 }
            };
            let ctx = ApplyContext {
                log_index: index,
                term: 1,
                down_nodes: down.clone(),
            };
            black_box(table.apply(cmd, &ctx).is_ok());
        }));
    }
    println!(
        "LockTable::apply             {:>9.0} ns/command (acquire/release pairs over 1000 disks)",
        median(apply_ns)
    );
    Ok(())
}
