//! Real network partitions (iptables rules between the agents' loopback addresses, see
//! `cluster_tests::partition`) with VMs running, judged by the checker
//! (`cluster_tests::checker`): from every node's own stamped console journal, no VM ever
//! ran on two nodes at once; every write the test got an OK for is there after the heal;
//! the VM runs somewhere after the heal.
//!
//! The cluster runs with the agent's default timings (heartbeat 100 ms, Down after
//! 1.2 s, lease 0.6 s, elections 400–800 ms). The only timed assertion is the issue's
//! bound: a VM whose owner is cut off runs elsewhere within 3 s of the cut.

use std::time::{Duration, Instant};

use cluster_proto::vms as pb;
use cluster_tests::checker::{now_unix_us, AckedWrites, RunChecker, Writer};
use cluster_tests::partition::Partition;
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{Cluster, Options, WAIT};

/// The bound: a VM whose owner is cut off runs on another node within this of
/// the cut.
const FAILOVER_UNDER_PARTITION_MAX: Duration = Duration::from_secs(3);

/// How often each writer puts a key.
const WRITE_EVERY: Duration = Duration::from_millis(20);

/// Acknowledged writes a scenario waits for before the fault and after the heal.
const WRITES_BEFORE_AND_AFTER: usize = 20;

/// The agent's own default timings (`cluster-agent/src/node/config.rs`).
fn agent_timings() -> Options {
    Options {
        heartbeat_interval_ms: 100,
        down_after_ms: 1_200,
        raft_heartbeat_interval_ms: 100,
        election_timeout_min_ms: 400,
        election_timeout_max_ms: 800,
        ..Options::default()
    }
}

/// A test-guest VM preferring `owner`, restarted first on failover.
fn guest(name: &str, owner: u64) -> pb::VmSpec {
    pb::VmSpec {
        restart_priority: "high".into(),
        preferred_owners: vec![owner],
        ..guest_spec(name, 64, mem_boot())
    }
}

/// A formed cluster of `n` agents with the default timings, with the checker and a
/// writer through every node started once `vms` (name, owner) run.
struct Scene {
    cl: Cluster,
    part: Partition,
    runs: RunChecker,
    writer: Option<Writer>,
    ids: Vec<u64>,
}

impl Scene {
    async fn new(n: u64) -> Scene {
        cluster_tests::require_kvm();
        let mut cl = Cluster::agents(agent_timings());
        let formed = cl.form(n).await;
        cl.check(formed);
        let part = cl.check(Partition::new());
        let ids = cl.ids();
        let runs = RunChecker::start(&cl, &[]);
        Scene {
            cl,
            part,
            runs,
            writer: None,
            ids,
        }
    }

    async fn leader(&self) -> u64 {
        let l = self.cl.wait_leader(&self.ids, WAIT).await;
        self.cl.check(l)
    }

    /// Creates the VMs, waits until each runs on its owner and printed a heartbeat
    /// there, then starts the checker and the writers.
    async fn start_vms(&mut self, vms: &[(&str, u64)]) {
        for (name, owner) in vms {
            let v = self.cl.create_running(*owner, guest(name, *owner)).await;
            assert_eq!(v.owner_id, *owner, "{v:?}");
        }
        let names: Vec<&str> = vms.iter().map(|(n, _)| *n).collect();
        self.runs = RunChecker::start(&self.cl, &names);
        for (name, owner) in vms {
            self.runs
                .wait_line(
                    &self.cl,
                    name,
                    &format!("a heartbeat of {name} on node {owner}"),
                    0,
                    |s| s.node == *owner && s.text.starts_with("HB "),
                )
                .await;
        }
        let writer = Writer::start(&self.cl, &self.ids, "w", WRITE_EVERY);
        writer
            .wait_acked(&self.cl, 0, WRITES_BEFORE_AND_AFTER)
            .await;
        self.writer = Some(writer);
    }

    /// The VM `name` as node `via` sees it once it runs on a node other than `not`.
    async fn wait_moved(&self, via: u64, name: &str, not: u64) -> pb::VmInfo {
        self.cl
            .wait_vm(
                via,
                name,
                &format!("running on a node other than {not}"),
                |v| v.owner_id != not && v.owner_id != 0 && v.runtime == "running",
            )
            .await
    }

    /// Waits until node `node` journaled a heartbeat of `vm` stamped after `after_us`;
    /// returns its stamp.
    async fn heartbeat_on(&self, vm: &str, node: u64, after_us: u64) -> u64 {
        self.runs
            .wait_line(
                &self.cl,
                vm,
                &format!("a heartbeat of {vm} on node {node}"),
                after_us,
                |s| s.node == node && s.text.starts_with("HB "),
            )
            .await
            .at_unix_us
    }

    /// After the heal: every node agrees on a leader and applied a barrier write (so
    /// every node's replica holds every decision taken during the partition), each VM
    /// runs on its recorded owner (a fresh heartbeat there), no VM ran twice, and every
    /// acknowledged write is there.
    async fn check_after_heal(mut self, vms: &[&str]) -> AckedWrites {
        let leader = self.leader().await;
        self.cl.barrier().await;
        let healed_us = now_unix_us();
        for vm in vms {
            let v = self.cl.wait_runtime(leader, vm, "running").await;
            self.heartbeat_on(vm, v.owner_id, healed_us).await;
        }
        if let Some(w) = &self.writer {
            w.wait_acked(&self.cl, w.acked(), WRITES_BEFORE_AND_AFTER)
                .await;
        }
        let runs = self.runs.assert_no_double_run(&self.cl).await;
        for (vm, r) in &runs {
            eprintln!("runs of {vm}: {r:?}");
        }
        let writes = self.writer.take().map(Writer::stop).unwrap_or_default();
        let checked = writes.verify(&self.cl, leader).await;
        eprintln!(
            "{checked} acknowledged writes present after the heal ({} failed or unknown)",
            writes.failed
        );
        assert!(checked > 0, "no write was acknowledged{}", self.cl.logs());
        writes
    }
}

/// The owner of a VM is cut off from both other nodes (as a follower or as the leader);
/// the majority fails the VM over within the bound; the cut heals after the failover
/// (the cut-off node's replica still names it the owner) and the old owner never starts
/// the VM again.
async fn owner_cut_off_healed_after_failover(owner_is_leader: bool) {
    let _serial = cluster_tests::serial().await;
    let mut s = Scene::new(3).await;
    let leader = s.leader().await;
    let owner = if owner_is_leader {
        leader
    } else {
        s.ids.iter().copied().find(|n| *n != leader).unwrap_or(1)
    };
    let witness = s.ids.iter().copied().find(|n| *n != owner).unwrap_or(1);
    s.start_vms(&[("vm-a", owner)]).await;

    let cut = Instant::now();
    let cut_us = now_unix_us();
    s.cl.check(s.part.isolate(owner, &s.ids));
    let moved = s.wait_moved(witness, "vm-a", owner).await;
    let first_us = s.heartbeat_on("vm-a", moved.owner_id, cut_us).await;
    let failover = Duration::from_micros(first_us.saturating_sub(cut_us));
    eprintln!(
        "owner {owner} (leader: {owner_is_leader}) cut off: vm-a ran on node {} {} ms after the cut (record seen after {} ms)",
        moved.owner_id,
        failover.as_millis(),
        cut.elapsed().as_millis()
    );
    assert!(
        failover < FAILOVER_UNDER_PARTITION_MAX,
        "failover took {failover:?}{}",
        s.cl.logs()
    );
    // The cut-off node's own replica still names it the owner: what made it start the
    // VM again at the heal before (issue 15).
    let stale = cluster_tests::vm::get_vm(&mut s.cl.vms(owner).await, "vm-a").await;
    eprintln!(
        "node {owner}'s answer while cut off: {:?}",
        stale.map(|v| v.owner_id)
    );
    s.cl.check(s.part.heal());
    s.check_after_heal(&["vm-a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_owner_cut_off_healed_after_failover() {
    owner_cut_off_healed_after_failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_owner_cut_off_healed_after_failover() {
    owner_cut_off_healed_after_failover(true).await;
}
