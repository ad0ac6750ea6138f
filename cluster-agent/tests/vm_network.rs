//! VM networking through the cluster, with real agents run inside a network namespace the
//! test creates (bridge `br-lan` with 10.78.0.1/24, the agents' TAPs, the UDP probe): a VM
//! with a NIC answers UDP echo; a live and a quick migration keep it answering from the
//! target and remove the source's TAP; a failover restart keeps the MAC; a duplicate MAC is refused
//! with the VM that has it named; a node without the VM's network is refused by
//! `migrate --to` and explained by why-not. Nothing touches the root namespace's interfaces.

use std::sync::Arc;
use std::time::Duration;

use cluster_proto::vms as pb;
use cluster_tests::netns::NetNs;
use cluster_tests::vm::{cpu_vendor_toml, expect_code, get_vm, guest_spec};
use cluster_tests::wait::Wait;
use cluster_tests::{Cluster, WAIT};
use tonic::Code;

const GUEST_IP: &str = "10.78.0.2";
const LAN: &str = "[[networks]]\nname = \"lan\"\nbridge = \"br-lan\"\n";

fn net_spec(name: &str, mac: &str) -> pb::VmSpec {
    pb::VmSpec {
        nics: vec![pb::NicSpec {
            network: "lan".into(),
            mac: mac.into(),
            slot: None,
        }],
        ..guest_spec(
            name,
            32,
            pb::TestGuestBoot {
                workload: "net".into(),
                hb_ms: 100,
                net_ip: GUEST_IP.into(),
                ..Default::default()
            },
        )
    }
}

/// Waits until 5 UDP echoes in a row come back from the guest through the bridge.
fn wait_echo(ns: &NetNs, dir: &std::path::Path, what: &str) {
    Wait::new(WAIT)
        .poll(Duration::from_millis(200))
        .until_blocking(
            what,
            || Ok::<_, String>(ns.probe(dir, &["udp", GUEST_IP, "7", "64", "5", "2"])),
            |r| r["ok"] == true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_answers_moves_with_live_migration_keeps_its_mac_on_failover() {
    let _serial = cluster_tests::serial().await;
    let ns = Arc::new(NetNs::new("vmnet"));
    ns.bridge("br-lan", "10.78.0.1/24");
    let mut cl = Cluster::vm_agents();
    cl.set_netns(ns.clone());
    let vendor = cpu_vendor_toml("GenuineIntel");
    let (_, volume) = cl.shared_volume();
    for (id, nets) in [(1, LAN), (2, LAN), (3, "")] {
        let added = cl.add_node_with(id, &format!("{vendor}{volume}{nets}"));
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let dir = cl.dir().to_path_buf();
    // Each node registered its networks.
    let nodes = cl.check(cl.nodes(3).await);
    let nets = |id: u64| -> Vec<(String, String)> {
        nodes
            .iter()
            .filter(|n| n.node_id == id)
            .flat_map(|n| {
                n.networks
                    .iter()
                    .map(|v| (v.name.clone(), v.bridge.clone()))
            })
            .collect()
    };
    assert_eq!(nets(1), vec![("lan".to_string(), "br-lan".to_string())]);
    assert!(nets(3).is_empty());

    // Placed on a node with the network; the MAC is generated, the TAP is on the bridge.
    let mut vms = cl.vms(3).await;
    let mut spec = net_spec("web", "");
    spec.preferred_owners = vec![1];
    vms.create_vm(pb::CreateVmRequest {
        spec: Some(spec),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create web: {e}{}", cl.logs()));
    let v = cl.wait_runtime(3, "web", "running").await;
    assert_eq!(v.owner_id, 1);
    let mac = v.spec.clone().unwrap_or_default().nics[0].mac.clone();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let tap1 = v.nic_taps[0].clone();
    assert!(ns.has_link(&tap1), "TAP {tap1} exists on node 1's side");
    wait_echo(&ns, &dir, "UDP echo from the VM on node 1");

    // A duplicate MAC is refused with the VM that has it named.
    expect_code(
        vms.create_vm(pb::CreateVmRequest {
            spec: Some(net_spec("dup", &mac.to_uppercase())),
            start: false,
        })
        .await,
        Code::AlreadyExists,
        "\"web\"",
    );

    // Node 3 has no `lan`: refused by migrate --to and explained by why-not.
    let why = vms
        .why_not(pb::WhyNotRequest {
            vm: "web".into(),
            node_id: 3,
        })
        .await
        .unwrap_or_else(|e| panic!("why-not: {e}"))
        .into_inner()
        .reasons;
    assert!(
        why.iter()
            .any(|r| r.contains("network") && r.contains("lan")),
        "{why:?}"
    );
    let refused = vms
        .migrate_vm(pb::MigrateVmRequest {
            name: "web".into(),
            to_node_id: 3,
            ..Default::default()
        })
        .await;
    assert!(
        refused.as_ref().is_err_and(|s| s.message().contains("lan")),
        "{refused:?}"
    );

    // Live migration to node 2: the echo answers from there, node 1's TAP is gone.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "web".into(),
        to_node_id: 2,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate web: {e}{}", cl.logs()));
    let v = Wait::new(WAIT)
        .until(
            "web running on node 2",
            || async { get_vm(&mut cl.vms(3).await, "web").await },
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    let tap2 = v.nic_taps[0].clone();
    assert_ne!(tap1, tap2);
    assert!(ns.has_link(&tap2), "TAP {tap2} on node 2's side");
    Wait::new(WAIT)
        .until_blocking(
            "node 1's TAP removed after the switchover",
            || Ok::<_, String>(ns.has_link(&tap1)),
            |present| !present,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    wait_echo(&ns, &dir, "UDP echo from the VM on node 2");

    // Quick migration back to node 1: saved, restored on node 1's own TAP.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "web".into(),
        to_node_id: 1,
        quick: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("quick-migrate web: {e}{}", cl.logs()));
    Wait::new(WAIT)
        .until(
            "web running on node 1 after the quick migration",
            || async { get_vm(&mut cl.vms(3).await, "web").await },
            |v| v.owner_id == 1 && v.migrating_to == 0 && v.runtime == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    Wait::new(WAIT)
        .until_blocking(
            "node 2's TAP removed after the quick migration",
            || Ok::<_, String>(ns.has_link(&tap2)),
            |present| !present,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ns.has_link(&tap1), "TAP {tap1} recreated on node 1");
    wait_echo(&ns, &dir, "UDP echo from the VM quick-migrated to node 1");

    // Failover: node 1 dies, node 2 (the only other node with `lan`) restarts the VM with
    // the same MAC.
    let killed = cl.kill9(1);
    cl.check(killed);
    let v = Wait::new(Duration::from_secs(120))
        .until(
            "web restarted on node 2",
            || async { get_vm(&mut cl.vms(3).await, "web").await },
            |v| v.owner_id == 2 && v.runtime == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    assert_eq!(v.spec.unwrap_or_default().nics[0].mac, mac);
    wait_echo(&ns, &dir, "UDP echo from the VM restarted on node 2");
}

/// NIC hot add and remove through the cluster: committed first (MAC generated, unique in
/// the cluster, lowest free slot), then the owner creates the TAP on the network's bridge
/// and adds the NIC to the running VM, whose guest brings it up and answers on it. A live
/// migration carries the hot-added NIC (same MAC, same slot) to the target. Refusals: a
/// network missing on the VM's node (named), a MAC another VM has, an unknown MAC, a full
/// slot table. Detach removes the NIC and its TAP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_hot_add_and_remove_through_the_cluster() {
    let _serial = cluster_tests::serial().await;
    let ns = Arc::new(NetNs::new("vmnic"));
    ns.bridge("br-lan", "10.78.0.1/24");
    let mut cl = Cluster::vm_agents();
    cl.set_netns(ns.clone());
    let vendor = cpu_vendor_toml("GenuineIntel");
    let (_, volume) = cl.shared_volume();
    for id in [1, 2] {
        let added = cl.add_node_with(id, &format!("{vendor}{volume}{LAN}"));
        cl.check(added);
    }
    let formed = cl.form(2).await;
    cl.check(formed);
    let dir = cl.dir().to_path_buf();
    let mut vms = cl.vms(2).await;

    // A VM without NICs (its guest has an address but no NIC yet), and one with a NIC.
    let mut spec = net_spec("hot", "");
    spec.nics.clear();
    spec.preferred_owners = vec![1];
    vms.create_vm(pb::CreateVmRequest {
        spec: Some(spec),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create hot: {e}{}", cl.logs()));
    let mut other = net_spec("other", "52:54:00:78:00:09");
    other.preferred_owners = vec![2];
    // Another guest address so the two never answer for each other.
    if let Some(pb::vm_spec::Boot::TestGuest(g)) = other.boot.as_mut() {
        g.net_ip = "10.78.0.9".into();
    }
    vms.create_vm(pb::CreateVmRequest {
        spec: Some(other),
        start: false,
    })
    .await
    .unwrap_or_else(|e| panic!("create other: {e}{}", cl.logs()));
    let v = cl.wait_runtime(2, "hot", "running").await;
    assert_eq!(v.owner_id, 1);

    let attach = |network: &str, mac: &str| pb::AttachNicRequest {
        vm: "hot".into(),
        nic: Some(pb::NicSpec {
            network: network.into(),
            mac: mac.into(),
            slot: None,
        }),
    };
    // Refusals change nothing.
    expect_code(
        vms.attach_nic(attach("dmz", "")).await,
        Code::FailedPrecondition,
        "network \"dmz\" is not configured on node 1",
    );
    expect_code(
        vms.attach_nic(attach("lan", "52:54:00:78:00:09")).await,
        Code::AlreadyExists,
        "\"other\"",
    );
    expect_code(
        vms.detach_nic(pb::DetachNicRequest {
            vm: "hot".into(),
            mac: "52:54:00:78:00:aa".into(),
        })
        .await,
        Code::NotFound,
        "no NIC with MAC",
    );

    // Hot add: MAC generated, slot 0, TAP on the bridge, the guest answers.
    let v = vms
        .attach_nic(attach("lan", ""))
        .await
        .unwrap_or_else(|e| panic!("attach: {e}{}", cl.logs()))
        .into_inner()
        .vm
        .unwrap_or_default();
    let nic = v.spec.clone().unwrap_or_default().nics[0].clone();
    assert!(nic.mac.starts_with("52:54:00:"), "{nic:?}");
    assert_eq!(nic.slot, Some(0));
    let tap1 = v.nic_taps[0].clone();
    wait_echo(&ns, &dir, "UDP echo from the hot-added NIC");
    assert!(ns.has_link(&tap1), "TAP {tap1} on node 1's side");

    // Live migration carries the hot-added NIC: same MAC, the guest answers from node 2.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "hot".into(),
        to_node_id: 2,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate hot: {e}{}", cl.logs()));
    let v = Wait::new(WAIT)
        .until(
            "hot running on node 2",
            || async { get_vm(&mut cl.vms(2).await, "hot").await },
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    assert_eq!(v.spec.clone().unwrap_or_default().nics[0].mac, nic.mac);
    let tap2 = v.nic_taps[0].clone();
    assert!(ns.has_link(&tap2), "TAP {tap2} on node 2's side");
    Wait::new(WAIT)
        .until_blocking(
            "node 1's TAP removed after the switchover",
            || Ok::<_, String>(ns.has_link(&tap1)),
            |present| !present,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    wait_echo(&ns, &dir, "UDP echo from the migrated hot-added NIC");

    // Fill the slot table: three more NICs, then a fifth is refused.
    let mut macs = vec![nic.mac.clone()];
    for _ in 0..3 {
        let v = vms
            .attach_nic(attach("lan", ""))
            .await
            .unwrap_or_else(|e| panic!("attach: {e}"))
            .into_inner()
            .vm
            .unwrap_or_default();
        macs.push(
            v.spec
                .unwrap_or_default()
                .nics
                .last()
                .cloned()
                .unwrap_or_default()
                .mac,
        );
    }
    expect_code(
        vms.attach_nic(attach("lan", "")).await,
        Code::FailedPrecondition,
        "already has 4 NICs",
    );

    // Detach every NIC: the records empty, the TAPs go away on node 2.
    for mac in &macs {
        vms.detach_nic(pb::DetachNicRequest {
            vm: "hot".into(),
            mac: mac.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("detach {mac}: {e}"));
    }
    let taps: Vec<String> = macs
        .iter()
        .map(|m| cluster_agent::state::vm_spec::nic_tap_name(2, m))
        .collect();
    Wait::new(WAIT)
        .until_blocking(
            "every hot-removed NIC's TAP deleted on node 2",
            || Ok::<_, String>(taps.iter().filter(|t| ns.has_link(t)).count()),
            |n| *n == 0,
        )
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    let v = get_vm(&mut cl.vms(2).await, "hot")
        .await
        .unwrap_or_else(|e| panic!("get hot: {e}"));
    assert!(v.spec.unwrap_or_default().nics.is_empty());
    assert_eq!(v.runtime, "running");
}
