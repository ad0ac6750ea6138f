//! Benchmarks of the VMM, printed as figures (run with `--release`):
//!
//! 1. create VM → test guest's first console line / first heartbeat, vs. the bare KVM
//!    floor (open /dev/kvm + KVM_CREATE_VM + KVM_CREATE_VCPU) measured in the same run;
//! 2. VMM memory overhead per VM beyond guest RAM (RSS growth minus guest-resident pages);
//! 3. snapshot save and restore of 256 MiB and 1 GiB guests whose memory is full of data,
//!    vs. the baseline of writing / reading the same bytes with plain file I/O.
//!
//! ```text
//! cargo run --release -p vmm-node --bin vmm-bench [-- --quick]
//! ```

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::{snapshot, Vm, VmConfig};

fn config(vcpus: u8, memory_mib: u64, w: &Workload) -> VmConfig {
    let mut c = VmConfig::new(vcpus, memory_mib, vmm_node::test_guest::PATH);
    c.cmdline = w.cmdline();
    c
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.9), v[0])
}

fn wait_until(vm: &Vm, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred(&vm.console().text()) {
        assert!(
            Instant::now() < deadline,
            "guest did not get there: {}",
            vm.console().text()
        );
        std::hint::spin_loop();
    }
}

fn boot_latency(iters: usize) {
    println!("## create VM -> first guest output (1 vCPU, 64 MiB, {iters} runs)");
    let mut floor = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let _vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        floor.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let w = Workload {
        hb_ms: 1,
        ..Workload::new(WorkloadKind::Idle)
    };
    let (mut boot_line, mut first_hb) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        let vm = Vm::create(config(1, 64, &w)).expect("create");
        vm.start().unwrap();
        wait_until(&vm, |s| s.contains("BOOT "));
        boot_line.push(t.elapsed().as_secs_f64() * 1e3);
        wait_until(&vm, |s| s.contains("HB seq=1 "));
        first_hb.push(t.elapsed().as_secs_f64() * 1e3);
        vm.destroy().unwrap();
    }
    let row = |name: &str, v: Vec<f64>| {
        let (p50, p90, min) = stats(v);
        println!("{name:<44} p50 {p50:8.2} ms  p90 {p90:8.2} ms  min {min:8.2} ms");
    };
    row("baseline: open kvm + create VM + vCPU", floor);
    row("create -> BOOT line (guest at CPL3)", boot_line);
    row("create -> first heartbeat (hb_ms=1)", first_hb);
    println!("(anchor: Firecracker boots to Linux init in ~125 ms)\n");
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Resident KiB of the mappings overlapping `[start, start+len)` (from /proc/self/smaps).
fn resident_in_kib(start: u64, len: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut total = 0;
    let mut inside = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a < start + len && start < b;
                // A merged mapping larger than the guest region is counted whole; guest
                // regions are mapped on their own here, so this is exact in practice.
                continue;
            }
        }
        if inside && l.starts_with("Rss:") {
            total += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
        }
    }
    total
}

fn memory_overhead(vms: usize) {
    println!("## VMM memory overhead per VM ({vms} idle test guests, 1 vCPU, 128 MiB each)");
    let before = rss_kib();
    let mut running = Vec::new();
    for _ in 0..vms {
        let vm = Vm::create(config(1, 128, &Workload::new(WorkloadKind::Idle))).unwrap();
        vm.start().unwrap();
        wait_until(&vm, |s| s.contains("HB seq=2 "));
        running.push(vm);
    }
    let after = rss_kib();
    let guest: u64 = running
        .iter()
        .map(|vm| {
            let m = vm.memory();
            m.iter()
                .map(|r| {
                    let host = m.get_host_address(r.start_addr()).unwrap() as u64;
                    resident_in_kib(host, r.len())
                })
                .sum::<u64>()
        })
        .sum();
    let per_vm = (after - before) as f64 / vms as f64;
    println!(
        "in-process: RSS before {before} KiB, after {after} KiB ({guest} KiB of it in guest mappings)"
    );
    println!(
        "RSS growth per additional VM (VMM + guest-touched pages): {:.2} MiB",
        per_vm / 1024.0
    );
    for vm in running {
        vm.destroy().unwrap();
    }
    // Whole vmm-node process running one idle guest: an upper bound of the overhead.
    let exe = std::env::current_exe().unwrap().with_file_name("vmm-node");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        serde_json::to_string(&config(1, 128, &Workload::new(WorkloadKind::Idle))).unwrap(),
    )
    .unwrap();
    let sock = dir.path().join("s");
    let mut child = std::process::Command::new(&exe)
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vmm-node binary next to vmm-bench (cargo build --release -p vmm-node)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = vmm_node::control::request(&sock, &serde_json::json!({"cmd": "console"}))
            .ok()
            .and_then(|v| v["text"].as_str().map(|t| t.contains("HB seq=3 ")))
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "vmm-node did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    println!(
        "vmm-node process with one idle 128 MiB guest: VmRSS {} KiB (anon {} KiB, file {} KiB), threads {}",
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
        field("Threads:")
    );
    println!("(anchor: Firecracker VMM overhead < 5 MiB)\n");
    let _ = vmm_node::control::request(&sock, &serde_json::json!({"cmd": "stop"}));
    let _ = child.wait();
}

fn snapshot_bench(memory_mib: u64) {
    println!("## snapshot of a {memory_mib} MiB guest (memory pattern filling all but 8 MiB)");
    let w = Workload {
        wss_mib: memory_mib - 8,
        ..Workload::new(WorkloadKind::Mem)
    };
    let vm = Vm::create(config(1, memory_mib, &w)).unwrap();
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while heartbeats(&vm.console().text())
        .last()
        .is_none_or(|h| h.mem != "ok")
    {
        assert!(Instant::now() < deadline, "guest did not fill its memory");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir =
        tempfile::tempdir_in(std::env::var("VMM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let t = Instant::now();
    vm.pause().unwrap();
    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let st = snapshot::save(&vm, dir.path()).unwrap();
    let save_ms = t.elapsed().as_secs_f64() * 1e3;
    let seq_before = heartbeats(&vm.console().text()).last().unwrap().seq;
    vm.destroy().unwrap();

    // Baseline for save: write the same number of bytes with one buffer, fsync.
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(dir.path().join("baseline")).unwrap();
    for _ in 0..memory_mib {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    let base_write_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let restored = snapshot::restore(dir.path()).unwrap();
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    restored.resume().unwrap();
    let want = format!("HB seq={} ", seq_before + 1);
    wait_until(&restored, |s| s.contains(&want));
    let to_hb_ms = t.elapsed().as_secs_f64() * 1e3;
    restored.destroy().unwrap();

    // Baseline for restore: read the memory file into anonymous memory (page cache warm).
    let t = Instant::now();
    let mut f = std::fs::File::open(dir.path().join(snapshot::MEMORY_FILE)).unwrap();
    let mut copy = vec![0u8; (memory_mib << 20) as usize];
    f.read_exact(&mut copy).unwrap();
    let base_read_ms = t.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&copy);

    println!("pause                                  {pause_ms:9.2} ms");
    println!(
        "save (state {} B + memory, fsync)     {save_ms:9.2} ms   baseline write+fsync of {memory_mib} MiB: {base_write_ms:9.2} ms",
        st.state_bytes
    );
    println!(
        "restore (new VM, mapped memory, state) {restore_ms:9.2} ms   baseline read of memory file: {base_read_ms:9.2} ms"
    );
    println!("restore -> next heartbeat              {to_hb_ms:9.2} ms");
    println!("(anchor: Firecracker restore 4-10 ms, 1 vCPU)\n");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let facts = vmm_node::facts::host_facts().expect("host facts");
    println!(
        "# vmm-bench on {} ({} logical CPUs, {} MiB, KVM: {:?})\n",
        facts.cpu_model, facts.logical_cpus, facts.memory_mib, facts.kvm
    );
    boot_latency(if quick { 3 } else { 20 });
    memory_overhead(if quick { 2 } else { 8 });
    snapshot_bench(256);
    if !quick {
        snapshot_bench(1024);
    }
}
