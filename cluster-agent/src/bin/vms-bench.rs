//! Figures for the VM control path that do not need processes: applying VM commands in
//! the replicated state machine and placing VMs with the scheduler, each against a
//! baseline measured in the same run.
//!
//! Run: `cargo run -p cluster-agent --release --features test-hooks --bin vms-bench` (debug
//! works, slower; the feature brings the cluster-state fixtures it builds on).

use std::time::Instant;

use cluster_agent::control::placement;
use cluster_agent::state::fixtures;
use cluster_agent::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
use cluster_agent::state::vms::VmCommand;
use cluster_agent::state::{ClusterState, Command};

const NODES: u64 = 16;
const VMS: u64 = 400;

fn cluster() -> ClusterState {
    fixtures::cluster(NODES, |_| fixtures::amd(64, 512 << 30))
}

fn spec(i: u64) -> VmSpec {
    let mut s = VmSpec::test_guest(
        &format!("vm-{i}"),
        2,
        1024,
        TestWorkload::new(WorkloadName::Idle),
    );
    s.anti_affinity.insert(format!("class-{}", i % 8));
    s
}

fn main() {
    // Baseline: replicated key/value writes through the same apply.
    let mut s = cluster();
    let t = Instant::now();
    for i in 0..VMS {
        s.apply(&Command::PutKv {
            key: format!("k{i}"),
            value: "v".into(),
        });
    }
    let kv_us = t.elapsed().as_secs_f64() * 1e6 / VMS as f64;

    // Place + commit VMs one by one, as the leader does.
    let mut s = cluster();
    let mut place_us = 0.0;
    let mut apply_us = 0.0;
    let mut snapshot_us = 0.0;
    for i in 0..VMS {
        let sp = spec(i);
        let t = Instant::now();
        let snap = placement::snapshot(&s);
        snapshot_us += t.elapsed().as_secs_f64() * 1e6;
        drop(snap);
        let t = Instant::now();
        let owner = match placement::place(&s, &Default::default(), &sp) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("vms-bench: placement failed at VM {i}: {e}");
                std::process::exit(1);
            }
        };
        place_us += t.elapsed().as_secs_f64() * 1e6;
        let t = Instant::now();
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec: sp,
            owner: Some(owner),
            at_unix_ms: 2,
        }));
        apply_us += t.elapsed().as_secs_f64() * 1e6;
    }
    let n = VMS as f64;
    let mut per_node = vec![0u64; NODES as usize + 1];
    for v in s.vms.values() {
        if let Some(o) = v.owner {
            per_node[o as usize] += 1;
        }
    }
    let (min, max) = per_node[1..]
        .iter()
        .fold((u64::MAX, 0), |(a, b), &c| (a.min(c), b.max(c)));
    println!("vms-bench: {NODES} nodes, {VMS} VMs placed one by one");
    println!("  apply PutKv (baseline)          {kv_us:8.1} us/command");
    println!(
        "  apply CreateVm                  {:8.1} us/command",
        apply_us / n
    );
    println!(
        "  state -> scheduler snapshot     {:8.1} us/call (mean over growing state)",
        snapshot_us / n
    );
    println!(
        "  placement (snapshot + place)    {:8.1} us/call (mean over growing state)",
        place_us / n
    );
    println!("  VMs per node after placement    min {min} max {max}");
}
