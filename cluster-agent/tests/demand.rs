//! Demand-driven balancing with real agents and real test guests (issue 17's report):
//! CPU-busy guests crowded on one node, measured by their owner (vCPU run + wait time,
//! touched memory), reported with the heartbeats, shown by the API and the metrics, and
//! spread by the even policy; not moved while the gain does not beat the migration cost;
//! and left alone over many balancer rounds once spread (no ping-pong).

use cluster_proto::EnumName;
use std::net::SocketAddr;

use cluster_proto::drain as dpb;
use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, mem_boot, vm_name};
use cluster_tests::{http_get, Cluster, WAIT};

fn free_port(ip: [u8; 4]) -> SocketAddr {
    cluster_tests::free_port(ip).unwrap_or_else(|e| panic!("{e}"))
}

async fn jobs(cl: &Cluster, via: u64) -> Result<Vec<dpb::JobInfo>, tonic::Status> {
    let mut d = cl.drains(via).await;
    d.list_jobs(dpb::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs)
}

async fn plan(cl: &Cluster, via: u64, mode: &str) -> dpb::PlanBalanceResponse {
    cl.drains(via)
        .await
        .plan_balance(dpb::PlanBalanceRequest {
            mode: dpb::BalanceMode::from_name(mode).map_or(99, |m| m as i32),
            aggressiveness: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("plan: {e}{}", cl.logs()))
        .into_inner()
}

async fn set_policy(cl: &Cluster, via: u64, mode: &str, cost_bp_per_s: u32) {
    cl.drains(via)
        .await
        .set_policy(dpb::SetPolicyRequest {
            policy: Some(dpb::PolicySpec {
                mode: dpb::BalanceMode::from_name(mode).map_or(99, |m| m as i32),
                aggressiveness: dpb::Aggressiveness::from_name("high").map_or(99, |a| a as i32),
                interval: Some(cluster_proto::times::duration_from_ms(1000)),
                min_dwell: Some(cluster_proto::times::duration_from_ms(300_000)),
                migration_cost_bp_per_s: Some(cost_bp_per_s),
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_guests_crowded_on_one_node_are_measured_and_spread_once() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let mut metrics = Vec::new();
    // Four logical CPUs per node (faked, so the host's size does not matter): four busy
    // one-vCPU guests saturate node 1 while nodes 2 and 3 idle.
    for id in 1..=3u64 {
        let a = free_port([127, 0, 1, id as u8]);
        let added = cl.add_node_with(
            id,
            &format!(
                "metrics_addr = \"{a}\"\n[facts_override]\nlogical_cpus = 4\nmemory_bytes = 4294967296\n"
            ),
        );
        cl.check(added);
        metrics.push(a);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    // Four guests that keep their vCPU busy (the `mem` workload never sleeps) on node 1,
    // one that sleeps between heartbeats (`idle`) on node 3.
    let busy: Vec<String> = (0..4).map(|i| format!("busy{i}")).collect();
    let mut c = cl.vms(1).await;
    for n in &busy {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(pb::VmSpec {
                preferred_owners: vec![1],
                ..guest_spec(n, 512, mem_boot())
            }),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create {n}: {e}{}", cl.logs()));
    }
    let idle_boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Idle as i32,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    c.create_vm(pb::CreateVmRequest {
        spec: Some(pb::VmSpec {
            preferred_owners: vec![3],
            ..guest_spec("calm", 128, idle_boot)
        }),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create calm: {e}{}", cl.logs()));

    // Measured: every VM's owner reports it (through the heartbeats; node 2 has no VM and
    // learns it from them). A busy guest's run + wait time is one whole vCPU whatever the
    // host's speed or load (it is always runnable); the idle one sleeps most of the time,
    // so it runs little (its wait for a CPU after each wake-up depends on the host's load).
    let demand = |v: &pb::VmInfo| v.demand.as_ref().map(|d| d.cpu_demand_millicores);
    let ran = |v: &pb::VmInfo| v.demand.as_ref().map(|d| d.cpu_run_millicores);
    let all = cl
        .wait_until(
            "every VM measured, seen from node 2",
            WAIT,
            || cl.read_vms(2),
            |all: &Vec<pb::VmInfo>| {
                all.len() == 5
                    && all.iter().all(|v| {
                        v.runtime().name() == "running"
                            && match vm_name(v) {
                                "calm" => v.owner_id == 3 && ran(v).is_some_and(|d| d < 500),
                                // A busy guest fills an 8 MiB working set: resident on
                                // its host once it has written all of it.
                                _ => {
                                    v.owner_id == 1
                                        && demand(v).is_some_and(|d| d >= 700)
                                        && v.demand.is_some_and(|d| d.memory_touched_mib >= 8)
                                }
                            }
                    })
            },
        )
        .await;
    for v in &all {
        let d = v.demand.unwrap_or_default();
        assert!(d.cpu_run_millicores <= d.cpu_demand_millicores, "{v:?}");
    }
    let nodes = cl.check(cl.nodes(2).await);
    let n1 = nodes.iter().find(|n| n.node_id == 1).and_then(|n| n.demand);
    assert!(
        n1.is_some_and(|d| d.vms == 4 && d.cpu_demand_millicores >= 2800),
        "{nodes:?}"
    );
    // Node 1's metrics show the same figures.
    let (_, body) = http_get(metrics[0], "/metrics");
    for n in &busy {
        let v = cluster_tests::metric_sample(
            &body,
            &format!("cluster_vm_cpu_demand_millicores{{node=\"1\",vm=\"{n}\"}}"),
        );
        assert!(v.is_some_and(|v| v > 0.0), "{n}: {v:?}\n{body}");
    }
    assert!(
        cluster_tests::metric_sample(&body, "cluster_node_cpu_demand_millicores{node=\"1\"}")
            .is_some()
    );

    // Memory alone (what the balancer saw before) is a few percent on every node; by
    // demand node 1 is saturated. With a cost no gain can beat, the dry run moves nothing
    // and says why.
    set_policy(&cl, 2, "none", 10_000).await;
    let p = plan(&cl, 2, "even").await;
    assert!(p.moves.is_empty(), "{p:?}");
    assert_eq!(p.stop_code(), dpb::BalanceStop::GainBelowCost, "{p:?}");
    assert!(p.stopped.contains("costs"), "{p:?}");
    // At the default cost it moves two busy guests off node 1, each step explained.
    set_policy(&cl, 2, "none", 100).await;
    let p = plan(&cl, 2, "even").await;
    assert_eq!(p.moves.len(), 2, "{p:?}");
    assert!(p
        .moves
        .iter()
        .all(|m| m.from_node_id == 1 && m.to_node_id != 1 && busy.contains(&m.vm)));
    assert!(!p.steps.is_empty());
    assert!(p.steps.iter().all(|s| s.gain_bp > s.cost_bp));
    assert!(p.spread_after_bp < p.spread_before_bp, "{p:?}");

    // The even policy spreads them: one balance job; then the balancer keeps looking and
    // moves nothing more.
    set_policy(&cl, 2, "even", 100).await;
    let spread = |all: &Vec<pb::VmInfo>| {
        let on = |n| {
            all.iter()
                .filter(|v| v.owner_id == n && vm_name(v) != "calm")
                .count()
        };
        on(1) == 2
            && on(2) == 1
            && on(3) == 1
            && all
                .iter()
                .all(|v| v.runtime().name() == "running" && v.migrating_to == 0)
    };
    cl.wait_until("busy guests spread 2/1/1", WAIT, || cl.read_vms(2), spread)
        .await;
    cl.wait_until(
        "balance job finished",
        WAIT,
        || jobs(&cl, 2),
        |jobs: &Vec<dpb::JobInfo>| jobs.iter().all(|j| j.status().name() != "running"),
    )
    .await;
    let leader = cl
        .wait_leader(&[1, 2, 3], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rounds = |addr: SocketAddr| {
        let (_, body) = http_get(addr, "/metrics");
        cluster_tests::metric_sample(
            &body,
            &format!("cluster_balance_rounds_total{{node=\"{leader}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let maddr = metrics[leader as usize - 1];
    let seen = rounds(maddr);
    // Five more looks at the measured (changing) demand.
    cl.wait_until(
        "five more balancer rounds",
        WAIT,
        || async { Ok::<f64, String>(rounds(maddr)) },
        |r: &f64| *r >= seen + 5.0,
    )
    .await;
    cl.barrier().await;
    let all = cl.list_vms(2).await;
    assert!(spread(&all), "{all:?}");
    let balance_jobs: Vec<dpb::JobInfo> = jobs(&cl, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|j| j.kind().name() == "balance")
        .collect();
    assert_eq!(balance_jobs.len(), 1, "{balance_jobs:?}");
    assert_eq!(balance_jobs[0].moves.len(), 2, "{balance_jobs:?}");
}
