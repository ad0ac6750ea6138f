//! Live and quick migration benchmark: prints figures, compares with a raw TCP loopback
//! baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p vmm-node --features test-pki --bin migration-bench -- [--memory-mib 1024]
//!     [--repeats 5] [--connections 4] [--max-downtime-ms 50] [--cases idle,full,50,200,1000]
//!     [--transports plaintext,tls,tls-rustls] [--each]
//! ```
//! Cases: `idle` (idle guest), `full` (memory filled with a pattern: measures throughput),
//! `N` (256 MiB working set dirtied at N MB/s). Every case runs over each transport, the
//! repeats interleaved (plaintext, TLS, plaintext, ...) so both see the same machine; TLS
//! uses a throwaway CA (`migration::test_pki`, hence the feature).

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::migration::adapter::{LocalFactory, LocalSource};
use vmm_node::migration::convergence::ConvergenceConfig;
use vmm_node::migration::seam::NoHandoff;
use vmm_node::migration::source::{migrate, CancelToken, MigrateOptions};
use vmm_node::migration::stats::MigrationStats;
use vmm_node::migration::target::{receive_one, ReceiveOptions};
use vmm_node::migration::tls::{AllowAll, MigrationTls, Transport};
use vmm_node::{Vm, VmConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    #[arg(long, default_value = "idle,full,50,200,1000")]
    cases: String,
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Transports to compare: plaintext, tls, tls-rustls (rustls' record layer).
    #[arg(long, default_value = "plaintext,tls")]
    transports: String,
    /// Print every migration's blackout split, not only the medians.
    #[arg(long)]
    each: bool,
}

/// A TLS configuration from a throwaway CA, with a certificate for the loopback address
/// the bench listens on (both ends present it).
fn bench_tls() -> anyhow::Result<MigrationTls> {
    let ca = vmm_node::migration::test_pki::TestCa::new("migration-bench CA");
    let node = ca.node("bench-node", &["127.0.2.1".parse()?]);
    Ok(MigrationTls::from_pem(
        ca.ca_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )?)
}

/// Name of a transport in the output: `plain`, `tls` (the engine's record layer after
/// rustls' handshake) or `tls-rustls` (rustls' own record layer, the fallback).
fn transport_name(t: &Transport) -> &'static str {
    match t {
        Transport::Plaintext => "plain",
        Transport::Tls(c) if c.client.enable_secret_extraction => "tls",
        Transport::Tls(_) => "tls-rustls",
    }
}

fn workload(case: &str, memory_mib: u64) -> anyhow::Result<Workload> {
    Ok(match case {
        "idle" => Workload::new(WorkloadKind::Idle),
        "full" => Workload {
            wss_mib: memory_mib * 3 / 4,
            ..Workload::new(WorkloadKind::Mem)
        },
        rate => Workload {
            wss_mib: 256,
            rate_mbps: rate
                .parse()
                .context("case must be idle, full or a rate in MB/s")?,
            ..Workload::new(WorkloadKind::Dirty)
        },
    })
}

fn start_guest(args: &Args, w: &Workload) -> anyhow::Result<Vm> {
    let mut cfg = VmConfig::new(args.vcpus, args.memory_mib, vmm_node::test_guest::PATH);
    cfg.cmdline = w.cmdline();
    cfg.name = "bench".into();
    let vm = Vm::create(cfg)?;
    vm.start()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hb = heartbeats(&vm.console().text());
        let ready = hb.len() >= 2
            && hb
                .last()
                .is_some_and(|h| w.kind != WorkloadKind::Mem || h.mem == "ok");
        if ready {
            return Ok(vm);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "guest did not get ready: {:?}",
            hb.last()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn live_once(args: &Args, w: &Workload, transport: &Transport) -> anyhow::Result<MigrationStats> {
    let vm = Arc::new(start_guest(args, w)?);
    let listener = TcpListener::bind("127.0.2.1:0")?;
    let addr = listener.local_addr()?;
    let ropts = ReceiveOptions::new(transport.clone(), Arc::new(AllowAll));
    let target = std::thread::spawn(move || -> anyhow::Result<Arc<Vm>> {
        let f = LocalFactory::default();
        let r = receive_one(&listener, &f, &NoHandoff, &ropts)?;
        let vm = f.last_vm().context("target VM gone")?;
        drop(r);
        Ok(vm)
    });
    let opts = MigrateOptions {
        connections: args.connections,
        convergence: ConvergenceConfig {
            max_downtime: Duration::from_millis(args.max_downtime_ms),
            deadline: Duration::from_secs(120),
            throttle: true,
        },
        ..MigrateOptions::new(transport.clone())
    };
    let stats = migrate(
        &LocalSource::new(vm.clone()),
        addr,
        &opts,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    );
    let tvm = target
        .join()
        .map_err(|_| anyhow::anyhow!("target thread panicked"))?;
    let stats = stats?;
    let tvm = tvm?;
    anyhow::ensure!(stats.receipt_matches(), "memory receipts differ");
    // The guest continues on the target.
    let n = heartbeats(&tvm.console().text()).len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeats(&tvm.console().text()).len() < n + 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "guest did not continue on the target"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.stop()?;
    tvm.stop()?;
    Ok(stats)
}

fn quick_once(args: &Args, w: &Workload) -> anyhow::Result<(u64, u64)> {
    let vm = start_guest(args, w)?;
    let dir = tempfile_dir()?;
    let s = vmm_node::migration::quick::save(&vm, &dir)?;
    vm.destroy()?;
    let (vm2, r) = vmm_node::migration::quick::restore(&dir)?;
    let n = heartbeats(&vm2.console().text()).len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeats(&vm2.console().text()).len() < n + 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "guest did not continue after quick migration"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm2.destroy()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((s.pause_us + s.save_us, r.restore_us + r.resume_us))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("migration-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Raw TCP loopback throughput with `n` connections moving `total` bytes in 4 MiB writes.
fn raw_tcp_bytes_per_s(n: usize, total: u64) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.2.1:0")?;
    let addr = l.local_addr()?;
    let per = total / n as u64;
    let recv = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut hs = Vec::new();
        for _ in 0..n {
            let (mut s, _) = l.accept()?;
            hs.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 4 << 20];
                let mut got = 0u64;
                while got < per {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k as u64,
                    }
                }
            }));
        }
        for h in hs {
            let _ = h.join();
        }
        Ok(())
    });
    let t = Instant::now();
    let senders: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                let buf = vec![0x5au8; 4 << 20];
                let mut sent = 0u64;
                while sent < per {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                Ok(())
            })
        })
        .collect();
    for s in senders {
        s.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    recv.join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// The rate at which `threads` threads populate fresh guest memory (`memory_mib`, split
/// into one contiguous share per thread, written a 4 KiB page at a time as the target's
/// receivers do): the other half of the machine's limit for a migration's throughput,
/// beside raw TCP. Median of `repeats`, each into a newly allocated memory. Bytes/s.
fn populate_bytes_per_s(threads: usize, memory_mib: u64, repeats: usize) -> anyhow::Result<f64> {
    use vm_memory::{Bytes, GuestAddress};
    let threads = threads.max(1) as u64;
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let mem = vmm_node::memory::allocate(memory_mib << 20)?;
        let map = vmm_node::migration::transport::PageMap::from_memory(&mem);
        let pages = map.total_pages() as u64;
        let share = pages.div_ceil(threads);
        let t = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    let (mem, map) = (&mem, &map);
                    s.spawn(move || -> anyhow::Result<()> {
                        let page = [0x5au8; 4096];
                        for i in k * share..((k + 1) * share).min(pages) {
                            let gpa = map.gpa_of(i as usize).context("page")?;
                            mem.write_slice(&page, GuestAddress(gpa))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("populate thread panicked"))??;
            }
            Ok(())
        })?;
        rates.push(((memory_mib << 20) as f64 / t.elapsed().as_secs_f64()) as u64);
    }
    Ok(pct(&mut rates, 0.5) as f64)
}

/// The memory transport alone (no guest competing for the CPUs): a fully populated
/// `memory_mib` guest memory moved into a fresh one over `n` connections. Bytes/s on the wire.
/// The memory transport alone over each of `transports`, `repeats` times interleaved;
/// the median of each.
fn transport_bytes_per_s(
    n: usize,
    memory_mib: u64,
    transports: &[Transport],
    repeats: usize,
) -> anyhow::Result<Vec<(f64, f64)>> {
    use vm_memory::{Bytes, GuestAddress};
    use vmm_node::migration::transport::*;
    let src = vmm_node::memory::allocate(memory_mib << 20)?;
    let dst = vmm_node::memory::allocate(memory_mib << 20)?;
    let map = PageMap::from_memory(&src);
    let mut page = vec![0u8; 4096];
    for i in 0..map.total_pages() {
        for (j, b) in page.iter_mut().enumerate() {
            *b = (i ^ j) as u8 | 1;
        }
        src.write_slice(&page, GuestAddress(map.gpa_of(i).context("page")?))?;
    }
    // Where a page's CPU time goes (single thread, whole memory).
    {
        let t = Instant::now();
        for i in 0..map.total_pages() {
            src.read_slice(&mut page, GuestAddress(map.gpa_of(i).context("page")?))?;
        }
        let read = t.elapsed();
        let t = Instant::now();
        for i in 0..map.total_pages() {
            dst.write_slice(&page, GuestAddress(map.gpa_of(i).context("page")?))?;
        }
        let write = t.elapsed();
        let t = Instant::now();
        for i in 0..map.total_pages() {
            dst.write_slice(&page, GuestAddress(map.gpa_of(i).context("page")?))?;
        }
        let rewrite = t.elapsed();
        let gb = (memory_mib << 20) as f64 / 1e9;
        println!(
            "per-pass single-thread rates over {memory_mib} MiB: read_slice {:.0} MB/s, write_slice into fresh memory {:.0} MB/s, again {:.0} MB/s",
            gb * 1e3 / read.as_secs_f64(),
            gb * 1e3 / write.as_secs_f64(),
            gb * 1e3 / rewrite.as_secs_f64()
        );
    }
    let mut runs: Vec<(Vec<u64>, Vec<u64>)> = transports
        .iter()
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    for _ in 0..repeats.max(1) {
        for (t, out) in transports.iter().zip(runs.iter_mut()) {
            let (rate, cpu_s_per_gb) = transport_once(n, memory_mib, &src, &map, t)?;
            out.0.push(rate as u64);
            out.1.push((cpu_s_per_gb * 1e3) as u64);
        }
    }
    Ok(runs
        .iter_mut()
        .map(|(r, c)| (pct(r, 0.5) as f64, pct(c, 0.5) as f64 / 1e3))
        .collect())
}

/// Single-thread rates of the engine's record layer alone with the suite a bench
/// connection negotiates: sealing and opening 256 MiB in 256 KiB batches, and a plain copy
/// of the same batches (what a copy costs next to the AEAD).
fn record_layer_rates(tls: &MigrationTls) -> anyhow::Result<()> {
    use vmm_node::migration::record::{Opened, Opener, Sealer, SEAL_BATCH_BYTES};
    let (suite, secrets) = handshake_in_memory(tls)?;
    let mut sealer = Sealer::new(0, &secrets)?;
    let mut opener = Opener::new(0, &secrets)?;
    let plain = vec![0x5au8; SEAL_BATCH_BYTES];
    let total = 256usize << 20;
    let mut wire = Vec::with_capacity(SEAL_BATCH_BYTES + (64 << 10));
    let mut copy = vec![0u8; SEAL_BATCH_BYTES];
    // Thread CPU time, not wall time: other processes' load does not inflate it.
    let (mut seal_t, mut open_t) = (Duration::ZERO, Duration::ZERO);
    let t0 = thread_cpu();
    for _ in 0..total / SEAL_BATCH_BYTES {
        copy.copy_from_slice(std::hint::black_box(&plain));
        std::hint::black_box(&mut copy);
    }
    let copy_t = thread_cpu() - t0;
    for _ in 0..total / SEAL_BATCH_BYTES {
        wire.clear();
        let t = thread_cpu();
        sealer.seal(&plain, &mut wire)?;
        seal_t += thread_cpu() - t;
        let t = thread_cpu();
        let mut at = 0;
        while at < wire.len() {
            match opener.open(&mut wire[at..])? {
                Opened::Data { used, .. } => at += used,
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        open_t += thread_cpu() - t;
    }
    let mbs = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    println!(
        "record layer alone, one thread's CPU time, {suite:?}, 256 KiB batches: seal {:.0} MB/s ({:.3} s per GB), open {:.0} MB/s ({:.3} s per GB); copy {:.0} MB/s",
        mbs(seal_t),
        seal_t.as_secs_f64() / (total as f64 / 1e9),
        mbs(open_t),
        open_t.as_secs_f64() / (total as f64 / 1e9),
        mbs(copy_t)
    );
    Ok(())
}

/// A client and a server handshake in memory with the bench's configuration: the suite
/// they agree on and the client's sending secrets.
fn handshake_in_memory(
    tls: &MigrationTls,
) -> anyhow::Result<(rustls::CipherSuite, rustls::ConnectionTrafficSecrets)> {
    let name =
        rustls::pki_types::ServerName::IpAddress("127.0.2.1".parse::<std::net::IpAddr>()?.into());
    let mut client: rustls::Connection =
        rustls::ClientConnection::new(tls.client.clone(), name)?.into();
    let mut server: rustls::Connection = rustls::ServerConnection::new(tls.server.clone())?.into();
    fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        while from.wants_write() {
            buf.clear();
            from.write_tls(&mut buf)?;
            to.read_tls(&mut buf.as_slice())?;
            to.process_new_packets()?;
        }
        Ok(())
    }
    while client.is_handshaking() || server.is_handshaking() {
        pass(&mut client, &mut server)?;
        pass(&mut server, &mut client)?;
    }
    let suite = client
        .negotiated_cipher_suite()
        .context("no cipher suite")?
        .suite();
    let secrets = client.dangerous_extract_secrets()?;
    Ok((suite, secrets.tx.1))
}

/// CPU time the calling thread has used so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given, which lives on this stack.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) this process has used so far, all threads.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given, which lives on this stack.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One transfer of the memory transport alone: (bytes/s on the wire, CPU seconds of both
/// ends together per GB moved — unlike the rate, not inflated by other processes' load).
fn transport_once(
    n: usize,
    memory_mib: u64,
    src: &vmm_node::GuestMem,
    map: &vmm_node::migration::transport::PageMap,
    transport: &Transport,
) -> anyhow::Result<(f64, f64)> {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::sync_channel;
    use vmm_node::migration::conn::Conn;
    use vmm_node::migration::transport::*;
    let dst = vmm_node::memory::allocate(memory_mib << 20)?;
    let l = TcpListener::bind("127.0.2.1:0")?;
    let addr = l.local_addr()?;
    let t2 = transport.clone();
    let acceptor = std::thread::spawn(move || -> anyhow::Result<Vec<Conn>> {
        let mut v = Vec::new();
        for _ in 0..n {
            let deadline = Instant::now() + Duration::from_secs(10);
            v.push(Conn::accept(l.accept()?.0, &t2, deadline)?);
        }
        Ok(v)
    });
    let t = Duration::from_secs(10);
    let conns: Vec<Conn> = (0..n)
        .map(|_| Conn::connect(transport, None, addr, t, t))
        .collect::<Result<_, _>>()?;
    let accepted = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
    let send_h = PageHashes::new_zeroed(map.total_pages());
    let recv_h = PageHashes::new_zeroed(map.total_pages());
    let (tx, rx) = sync_channel::<DataEvent>(4 * n);
    let cancel = AtomicBool::new(false);
    let heard = LastHeard::default();
    let (sent, secs, cpu) = std::thread::scope(|s| -> anyhow::Result<(u64, f64, f64)> {
        for (i, c) in accepted.into_iter().enumerate() {
            let (tx, dst, h, heard) = (tx.clone(), &dst, &recv_h, &heard);
            s.spawn(move || receive_data_connection(c, i, dst, map, h, &tx, heard));
        }
        drop(tx);
        let t = Instant::now();
        let cpu0 = process_cpu();
        let mut sender = MemorySender::new(conns);
        let r = sender.send_round(
            src,
            map,
            &send_h,
            &DirtyPages::all(map.total_pages()),
            0,
            &cancel,
        )?;
        for _ in 0..n {
            match rx.recv()? {
                DataEvent::RoundEnd { .. } => {}
                other => anyhow::bail!("transport failed: {other:?}"),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = (process_cpu() - cpu0).as_secs_f64();
        sender.finish()?;
        Ok((r.wire_bytes, secs, cpu))
    })?;
    anyhow::ensure!(
        send_h.digest() == recv_h.digest(),
        "transport receipts differ"
    );
    Ok((sent as f64 / secs, cpu / (sent as f64 / 1e9)))
}

/// One case's line; `limit`: the machine's limit for a migration's throughput (round 0's
/// rate is printed as a fraction of it).
fn print_case(name: &str, runs: &[MigrationStats], limit: f64, qs: &mut [u64], qr: &mut [u64]) {
    let mut totals: Vec<u64> = runs.iter().map(|s| s.total_us / 1000).collect();
    let mut blackouts: Vec<u64> = runs.iter().map(|s| s.blackout.total_us).collect();
    let mut rounds: Vec<u64> = runs.iter().map(|s| s.rounds.len() as u64).collect();
    let ratio: f64 = runs
        .iter()
        .map(|s| s.wire_bytes as f64 / s.guest_bytes as f64)
        .sum::<f64>()
        / runs.len() as f64;
    let r0_best = runs
        .iter()
        .map(|s| {
            let first = &s.rounds[0];
            first.wire_bytes as f64 / (first.duration_us.max(1) as f64 / 1e6)
        })
        .fold(0.0, f64::max);
    let throttle = runs
        .iter()
        .map(|s| s.max_throttle_percent)
        .max()
        .unwrap_or(0);
    println!(
        "{:<14} {:>9} {:>9} {:>10} {:>10} {:>7.3} {:>9.0} {:>9.2} {:>7}% {:>9}ms {:>9}ms",
        name,
        pct(&mut totals, 0.5),
        pct(&mut rounds, 0.5),
        pct(&mut blackouts.clone(), 0.5),
        pct(&mut blackouts, 0.99),
        ratio,
        r0_best / 1e6,
        r0_best / limit,
        throttle,
        pct(qs, 0.5),
        pct(qr, 0.5),
    );
    let med = |f: fn(&vmm_node::migration::stats::Blackout) -> u64| {
        let mut v: Vec<u64> = runs.iter().map(|s| f(&s.blackout)).collect();
        pct(&mut v, 0.5)
    };
    println!(
        "               blackout p50 split: final-copy {} us (pause {}, dirty log {}, send {}, ack {}), state {} us, handoff {} us, resume {} us",
        med(|b| b.final_copy_us),
        med(|b| b.pause_us),
        med(|b| b.dirty_log_us),
        med(|b| b.final_send_us),
        med(|b| b.final_ack_us),
        med(|b| b.state_us),
        med(|b| b.handoff_us),
        med(|b| b.resume_us)
    );
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    vmm_node::bench_stats::percentile(v, p).unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let raw = raw_tcp_bytes_per_s(args.connections, 2 << 30)?;
    println!(
        "raw TCP loopback, {} connections, 4 MiB writes: {:.0} MB/s",
        args.connections,
        raw / 1e6
    );
    let populate = populate_bytes_per_s(args.connections, args.memory_mib, 3)?;
    let limit = raw.min(populate);
    println!(
        "populating fresh guest memory, {} threads, {} MiB, median of 3: {:.0} MB/s; the machine's limit for a migration (the smaller of raw TCP and populating): {:.0} MB/s",
        args.connections,
        args.memory_mib,
        populate / 1e6,
        limit / 1e6
    );
    let tls = bench_tls()?;
    let transports: Vec<Transport> = args
        .transports
        .split(',')
        .map(|t| match t {
            "plaintext" | "plain" => Ok(Transport::Plaintext),
            "tls" => Ok(Transport::Tls(tls.clone())),
            "tls-rustls" => Ok(Transport::Tls(tls.with_rustls_records())),
            other => anyhow::bail!("unknown transport {other} (plaintext, tls, tls-rustls)"),
        })
        .collect::<anyhow::Result<_>>()?;
    if transports.iter().any(|t| t.is_tls()) {
        record_layer_rates(&tls)?;
    }
    let tr = transport_bytes_per_s(args.connections, args.memory_mib, &transports, args.repeats)?;
    for (t, (tr, cpu)) in transports.iter().zip(&tr) {
        println!(
            "memory transport alone ({}), {} MiB fully populated, {} connections, median of {}: {:.0} MB/s = {:.2} x raw TCP = {:.2} x the limit, CPU {:.3} s per GB (both ends)",
            transport_name(t),
            args.memory_mib,
            args.connections,
            args.repeats,
            tr / 1e6,
            tr / raw,
            tr / limit,
            cpu
        );
    }
    println!(
        "guest {} MiB, {} vCPUs, {} connections, max downtime {} ms, {} repeats",
        args.memory_mib, args.vcpus, args.connections, args.max_downtime_ms, args.repeats
    );
    println!(
        "{:<14} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:>8} {:>11} {:>11}",
        "case",
        "total_ms",
        "rounds",
        "blk_p50us",
        "blk_p99us",
        "sent/gb",
        "r0_MB/s",
        "r0/limit",
        "throttle",
        "quick_save",
        "quick_rest"
    );
    for case in args.cases.split(',').filter(|c| !c.is_empty()) {
        let w = workload(case, args.memory_mib)?;
        let mut runs: Vec<Vec<MigrationStats>> = transports.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.repeats {
            for (t, out) in transports.iter().zip(runs.iter_mut()) {
                let s = live_once(&args, &w, t)
                    .with_context(|| format!("case {case} over {}", transport_name(t)))?;
                if args.each {
                    let b = &s.blackout;
                    println!(
                        "  {case}/{}: blackout {} us = final-copy {} (pause {}, dirty log {}, send {}, ack {}) + state {} + handoff {} + resume {}",
                        transport_name(t), b.total_us, b.final_copy_us, b.pause_us, b.dirty_log_us,
                        b.final_send_us, b.final_ack_us, b.state_us, b.handoff_us, b.resume_us
                    );
                }
                out.push(s);
            }
        }
        let (mut qs, mut qr) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.min(3) {
            let (s, r) = quick_once(&args, &w)?;
            qs.push(s / 1000);
            qr.push(r / 1000);
        }
        for (t, stats) in transports.iter().zip(&runs) {
            print_case(
                &format!("{case}/{}", transport_name(t)),
                stats,
                limit,
                &mut qs,
                &mut qr,
            );
        }
    }
    Ok(())
}
