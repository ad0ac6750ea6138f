//! VM networking through the cluster, with real agents run inside a network namespace the
//! test creates (bridge `br-lan` with 10.78.0.1/24, the agents' TAPs, the UDP probe): a VM
//! with a NIC answers UDP echo; a live and a quick migration keep it answering from the
//! target and remove the source's TAP; a failover restart keeps the MAC; a duplicate MAC is refused
//! with the VM that has it named; a node without the VM's network is refused by
//! `migrate --to` and explained by why-not. Nothing touches the root namespace's interfaces.

use cluster_proto::EnumName;
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
            ..Default::default()
        }],
        ..guest_spec(
            name,
            32,
            pb::TestGuestBoot {
                workload: cluster_proto::vms::Workload::Net as i32,
                heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
                net_ip: GUEST_IP.into(),
                ..Default::default()
            },
        )
    }
}

/// The address (`link/ether`) of interface `name` in the namespace.
fn link_mac(ns: &NetNs, name: &str) -> Option<String> {
    let out = ns.ip(&["-o", "link", "show", "dev", name]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = text.split_whitespace().skip_while(|x| *x != "link/ether");
    w.nth(1).map(str::to_owned)
}

/// Waits until 5 UDP echoes in a row come back from the guest through the bridge.
fn wait_echo(ns: &NetNs, dir: &std::path::Path, what: &str) {
    wait_echo_at(ns, dir, GUEST_IP, 64, what);
}

/// Waits until 5 UDP echoes of `size` bytes in a row come back from `ip`, sent with DF
/// (IP_PMTUDISC_DO: never fragmented, refused by the sender if its route's MTU is smaller).
fn wait_echo_at(ns: &NetNs, dir: &std::path::Path, ip: &str, size: usize, what: &str) {
    let size = size.to_string();
    Wait::new(WAIT)
        .poll(Duration::from_millis(200))
        .until_blocking(
            what,
            || Ok::<_, String>(ns.probe(dir, &["udp", ip, "7", &size, "5", "2", "df"])),
            |r| r["ok"] == true,
        )
        .unwrap_or_else(|e| panic!("{e}{}", net_post_mortem(ns, dir)));
}

/// What a failed echo wait prints: the bridge's ports and neighbours, and the tail of
/// every VM worker's log below the test's directory.
fn net_post_mortem(ns: &NetNs, dir: &std::path::Path) -> String {
    let show = |args: &[&str]| String::from_utf8_lossy(&ns.ip(args).stdout).into_owned();
    let mut out = format!(
        "\n--- links ---\n{}--- neighbours ---\n{}",
        show(&["-o", "link"]),
        show(&["neigh"])
    );
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "worker.log") {
                out.push_str(&format!(
                    "--- {} ---\n{}\n",
                    p.display(),
                    cluster_agent::vmhost::worker::log_tail(&d, 15)
                ));
            }
        }
    }
    out
}

/// `net_spec` with another guest address and the NIC's MTU.
fn mtu_spec(name: &str, ip: &str, mtu: Option<u32>) -> pb::VmSpec {
    let mut s = net_spec(name, "");
    s.nics[0].mtu = mtu;
    if let Some(pb::vm_spec::Boot::TestGuest(g)) = s.boot.as_mut() {
        g.net_ip = ip.into();
    }
    s
}

/// UDP payload of the jumbo echo: 8928-byte IP packets, unfragmented (DF).
const JUMBO: usize = 8900;

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
    // The host's side of a VM port has no address, not even an IPv6 link-local one.
    let addrs = ns.ip(&["-o", "addr", "show", "dev", &tap1]);
    assert!(
        addrs.status.success() && addrs.stdout.is_empty(),
        "TAP {tap1} has addresses: {}",
        String::from_utf8_lossy(&addrs.stdout)
    );
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
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime().name() == "running",
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
            |v| v.owner_id == 1 && v.migrating_to == 0 && v.runtime().name() == "running",
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
            |v| v.owner_id == 2 && v.runtime().name() == "running",
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
            ..Default::default()
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
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime().name() == "running",
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
    assert!(v.spec.clone().unwrap_or_default().nics.is_empty());
    assert_eq!(v.runtime().name(), "running");
}

/// NIC MTU through the cluster: a VM created with `mtu = 9000` gets a 9000-byte TAP on the
/// bridge and answers 8900-byte UDP echoes sent unfragmented (DF); a VM with the default
/// (1500) does not pass them (the bridge drops a frame larger than the port's MTU: the
/// 8900-byte request goes unanswered while a small request sent right after it is
/// answered); the MTU stays through a live migration (the target's TAP has it) and a NIC
/// hot-added with `mtu = 9000` passes jumbo frames; MTUs out of 68..=9000 are refused at
/// create and at hot add with the NIC and the value named. The bridge's own MTU is set to
/// 9000 by the test (as an administrator would): otherwise it follows its smallest port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_mtu_9000_passes_jumbo_frames_through_the_cluster() {
    const JUMBO_IP: &str = "10.78.0.2";
    const SMALL_IP: &str = "10.78.0.3";
    let _serial = cluster_tests::serial().await;
    let ns = Arc::new(NetNs::new("vmmtu"));
    ns.bridge("br-lan", "10.78.0.1/24");
    ns.ip(&["link", "set", "br-lan", "mtu", "9000"]);
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

    // Out-of-range MTUs are refused with the NIC and the value named; nothing is created.
    for bad in [67, 9001] {
        expect_code(
            vms.create_vm(pb::CreateVmRequest {
                spec: Some(mtu_spec("bad", "10.78.0.9", Some(bad))),
                start: false,
            })
            .await,
            Code::InvalidArgument,
            &format!("NIC 0 on network lan: MTU {bad} is out of range (68..=9000)"),
        );
    }
    assert!(
        get_vm(&mut vms, "bad").await.is_err(),
        "a refused VM exists"
    );

    for (name, ip, mtu) in [("jumbo", JUMBO_IP, Some(9000)), ("small", SMALL_IP, None)] {
        let mut spec = mtu_spec(name, ip, mtu);
        spec.preferred_owners = vec![1];
        vms.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}{}", cl.logs()));
    }
    let jumbo = cl.wait_runtime(2, "jumbo", "running").await;
    let small = cl.wait_runtime(2, "small", "running").await;
    assert_eq!((jumbo.owner_id, small.owner_id), (1, 1));
    assert_eq!(
        jumbo.spec.clone().unwrap_or_default().nics[0].mtu,
        Some(9000)
    );
    assert_eq!(small.spec.clone().unwrap_or_default().nics[0].mtu, None);
    let (jtap, stap) = (jumbo.nic_taps[0].clone(), small.nic_taps[0].clone());
    assert_eq!(ns.link_mtu(&jtap), Some(9000), "the jumbo NIC's TAP");
    assert_eq!(ns.link_mtu(&stap), Some(1500), "the default NIC's TAP");
    assert_eq!(
        ns.link_mtu("br-lan"),
        Some(9000),
        "the bridge keeps the MTU set on it"
    );

    wait_echo_at(
        &ns,
        &dir,
        JUMBO_IP,
        JUMBO,
        "8900-byte UDP echo from the 9000-MTU NIC",
    );
    wait_echo_at(
        &ns,
        &dir,
        SMALL_IP,
        1400,
        "1400-byte UDP echo from the 1500-MTU NIC",
    );
    // The 1500-byte NIC: the small fence sent after the jumbo request is answered, the
    // jumbo request is not (the guest answers in order; the bridge dropped it).
    let r = ns.probe(&dir, &["fenced", SMALL_IP, "7", &JUMBO.to_string(), "10"]);
    assert_eq!(
        r["fence"], true,
        "the small request after the jumbo one: {r}"
    );
    assert_eq!(r["big"], false, "a jumbo frame passed a 1500-MTU NIC: {r}");
    // And the 9000-byte NIC answers the same exchange in full.
    let r = ns.probe(&dir, &["fenced", JUMBO_IP, "7", &JUMBO.to_string(), "10"]);
    assert_eq!(
        (&r["fence"], &r["big"]),
        (&true.into(), &true.into()),
        "{r}"
    );

    // Hot add refuses a bad MTU (the VM keeps its one NIC).
    let attach = |mtu: Option<u32>| pb::AttachNicRequest {
        vm: "small".into(),
        nic: Some(pb::NicSpec {
            network: "lan".into(),
            mtu,
            ..Default::default()
        }),
    };
    expect_code(
        vms.attach_nic(attach(Some(20_000))).await,
        Code::InvalidArgument,
        "on network lan: MTU 20000 is out of range (68..=9000)",
    );
    let v = get_vm(&mut vms, "small")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.spec.unwrap_or_default().nics.len(), 1);

    // Live migration keeps the MTU: node 2's TAP has it and jumbo echoes pass from there.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "jumbo".into(),
        to_node_id: 2,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate jumbo: {e}{}", cl.logs()));
    let v = Wait::new(WAIT)
        .until(
            "jumbo running on node 2",
            || async { get_vm(&mut cl.vms(2).await, "jumbo").await },
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime().name() == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    assert_eq!(v.spec.unwrap_or_default().nics[0].mtu, Some(9000));
    assert_eq!(ns.link_mtu(&v.nic_taps[0]), Some(9000), "node 2's TAP");
    wait_echo_at(
        &ns,
        &dir,
        JUMBO_IP,
        JUMBO,
        "8900-byte UDP echo after the migration",
    );

    // Hot add with mtu = 9000: replace the small VM's NIC; the guest moves to the new one.
    let old_mac = small.spec.unwrap_or_default().nics[0].mac.clone();
    let v = vms
        .attach_nic(attach(Some(9000)))
        .await
        .unwrap_or_else(|e| panic!("attach: {e}{}", cl.logs()))
        .into_inner()
        .vm
        .unwrap_or_default();
    let nic = v.spec.clone().unwrap_or_default().nics[1].clone();
    assert_eq!(nic.mtu, Some(9000), "{nic:?}");
    vms.detach_nic(pb::DetachNicRequest {
        vm: "small".into(),
        mac: old_mac,
    })
    .await
    .unwrap_or_else(|e| panic!("detach: {e}{}", cl.logs()));
    let tap = cluster_agent::state::vm_spec::nic_tap_name(1, &nic.mac);
    assert_eq!(ns.link_mtu(&tap), Some(9000), "the hot-added NIC's TAP");
    // The host forgets the old MAC of the guest's address (ARP finds the new NIC).
    ns.ip(&["neigh", "flush", "dev", "br-lan"]);
    wait_echo_at(
        &ns,
        &dir,
        SMALL_IP,
        JUMBO,
        "8900-byte UDP echo from the hot-added NIC",
    );
}

/// The test through the cluster: a 1 kHz UDP echo stream from the namespace to a
/// VM that the cluster live-migrates to another node. A watcher sees every frame entering
/// the target's TAP (named before it exists): the first frame from the VM's MAC there is
/// the RARP announcement, and no request reaches that TAP before it (the bridge sends them
/// to the source's port until it learns otherwise), so the bridge learned the new port
/// from the announcement; the FDB then points at the target's TAP. Echoes resume from the
/// target (1000 replies enter through its TAP), and no request sent after the first reply
/// from the target is lost. Lost echoes and the longest silence are printed beside the
/// migration record's blackout (no timing assertions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_under_a_1khz_echo_stream_through_the_cluster() {
    let _serial = cluster_tests::serial().await;
    let ns = Arc::new(NetNs::new("vmstream"));
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
    let mut spec = net_spec("stream", "");
    spec.preferred_owners = vec![1];
    vms.create_vm(pb::CreateVmRequest {
        spec: Some(spec),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create stream: {e}{}", cl.logs()));
    let v = cl.wait_runtime(2, "stream", "running").await;
    assert_eq!(v.owner_id, 1);
    let mac = v.spec.clone().unwrap_or_default().nics[0].mac.clone();
    let tap1 = v.nic_taps[0].clone();
    let tap2 = cluster_agent::state::vm_spec::nic_tap_name(2, &mac);
    wait_echo(&ns, &dir, "UDP echo from the VM on node 1");
    // The TAP's own address is derived from the NIC's MAC, and so is the address of the
    // bridge (which follows its lowest port): the same before and after the migration.
    let tap_mac = cluster_agent::vmhost::nics::tap_mac(&mac);
    assert_eq!(link_mac(&ns, &tap1), tap_mac);
    let bridge_mac = link_mac(&ns, "br-lan");

    let watch_stop = dir.join("migwatch.stop");
    let stream_stop = dir.join("stream.stop");
    let mut watch = ns.spawn_probe(
        &dir,
        &[
            "migwatch",
            &mac,
            &tap2,
            watch_stop.to_str().unwrap_or_default(),
            "600",
            &tap1,
        ],
    );
    let mut stream = ns.spawn_probe(
        &dir,
        &[
            "stream",
            GUEST_IP,
            "7",
            "1000",
            stream_stop.to_str().unwrap_or_default(),
            "600",
        ],
    );
    // Echoes flow from the source first.
    stream.wait_line(|l| l == "RX 1000", WAIT);
    assert_eq!(ns.fdb_port("br-lan", &mac).as_deref(), Some(tap1.as_str()));

    vms.migrate_vm(pb::MigrateVmRequest {
        name: "stream".into(),
        to_node_id: 2,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate stream: {e}{}", cl.logs()));
    Wait::new(WAIT)
        .until(
            "stream running on node 2",
            || async { get_vm(&mut cl.vms(2).await, "stream").await },
            |v| v.owner_id == 2 && v.migrating_to == 0 && v.runtime().name() == "running",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    // The first frame from the VM's MAC that entered the target's TAP: the announcement.
    let first = watch.wait_line(|l| l.starts_with("FIRST "), WAIT);
    assert_eq!(
        first, "FIRST 0x8035",
        "the bridge learned the target's port from something other than the announcement"
    );
    assert_eq!(
        ns.fdb_port("br-lan", &mac).as_deref(),
        Some(tap2.as_str()),
        "the bridge's FDB after the migration"
    );
    // Echoes resume from the target: replies enter through its TAP.
    watch.wait_line(|l| l == "TAP_IPV4 1000", WAIT);
    let res = stream.finish(&stream_stop);
    let w = watch.finish(&watch_stop);
    let rec = Wait::new(WAIT)
        .until(
            "the migration record ended",
            || async {
                cl.migrations(2)
                    .await
                    .list_migrations(cluster_proto::migrations::ListMigrationsRequest {
                        vm: "stream".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| {
                        r.into_inner()
                            .migrations
                            .last()
                            .cloned()
                            .unwrap_or_default()
                    })
            },
            |m| m.state().name() != "running" && m.state != 0,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The source's TAP is gone; had the bridge taken its address, it changed now (and
    // the replies in flight to its old address were dropped: the losses once seen here).
    Wait::new(WAIT)
        .poll(Duration::from_millis(20))
        .until_blocking(
            "the source's TAP deleted",
            || Ok::<_, String>(ns.has_link(&tap1)),
            |has| !has,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(link_mac(&ns, &tap2), tap_mac);
    assert_eq!(
        link_mac(&ns, "br-lan"),
        bridge_mac,
        "the bridge's address changed across the migration"
    );
    let blackout_us = rec.stats.as_ref().map(|s| {
        cluster_proto::times::duration_us(s.blackout.as_ref().unwrap_or(&Default::default()))
            .unwrap_or(0)
    });
    eprintln!(
        "1 kHz echo stream across a cluster live migration: {} sent, {} lost, longest silence {} ms, \
         longest loss run {}; migration {} blackout {:?} us; target TAP: {} announcements, \
         {} IPv4 frames, watcher drops {}",
        res["sent"],
        res["lost"],
        res["longest_silence_ms"],
        res["longest_loss_run"],
        rec.id,
        blackout_us,
        w["rarp"],
        w["ipv4"],
        w["drops"]
    );
    assert_eq!(rec.state().name(), "succeeded", "{rec:?}");
    assert_eq!(rec.target_node_id, 2);
    assert!(w["rarp"].as_u64().unwrap_or(0) >= 1, "{w}");
    // The target's worker announced the NIC as the paused source's state arrived, before
    // the resume (not only at it).
    let worker_dir = cl.check(cl.spec(2)).data_dir.join("vms").join("stream");
    let worker_log = cluster_agent::vmhost::worker::log_tail(&worker_dir, 5000);
    assert!(
        worker_log.contains("nic announced before the resume"),
        "no early announcement in the target worker's log: {worker_log}"
    );
    // Nothing sent after the first reply from the target is lost.
    let resumed = w["first_ipv4"]["t"]
        .as_f64()
        .unwrap_or_else(|| panic!("no reply entered the target's TAP: {w}"));
    let lost_after: Vec<f64> = res["lost_sent_unix"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_f64()).collect())
        .unwrap_or_default();
    assert_eq!(
        lost_after.len() as u64,
        res["lost"].as_u64().unwrap_or(u64::MAX),
        "{res}"
    );
    let after: Vec<&f64> = lost_after.iter().filter(|t| **t > resumed).collect();
    if !after.is_empty() {
        let stats = ns.ip(&["-s", "-s", "link", "show", "dev", &tap2]);
        eprintln!(
            "losses (ms after the first target reply): {:?}\nlost seqs {}\nfirst target reply {}\nframes entering the source's TAP after the first on the target's: {}\n{}",
            lost_after.iter().map(|t| ((t - resumed) * 1e3).round()).collect::<Vec<_>>(),
            res["lost_seqs"],
            w["first_ipv4"],
            w["src_after"],
            String::from_utf8_lossy(&stats.stdout)
        );
    }
    assert!(
        after.is_empty(),
        "{} requests sent after the first reply from the target were lost (first reply at unix {resumed}): {after:?}",
        after.len()
    );
    assert!(res["received"].as_u64().unwrap_or(0) >= 2000, "{res}");
    let v = get_vm(&mut vms, "stream")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.owner_id, 2);
}
