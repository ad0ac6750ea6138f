//! End to end: the test guest's polling virtio-net driver (guest/virtio_net.c) against the
//! VMM's virtio-net device on a TAP, through a Linux bridge, with the host side in a network
//! namespace each test creates (and deletes, also on failure). `vmm-node` runs inside the
//! namespace (`ip netns exec`), so it opens its TAP there; the host-side client is
//! `net_support/netprobe.py`, also run inside. Needs root, KVM, iproute2 and python3: the
//! tests fail (never skip) without them.
//!
//! Addresses: the bridge has 10.77.0.1/24 inside the namespace, the guest 10.77.0.2.

mod common;
mod net_support;

use std::sync::Mutex;
use std::time::Duration;

use net_support::*;
use serde_json::json;
use vmm_node::config::NicConfig;
use vmm_node::guest_protocol::{net_cmdline, Workload, WorkloadKind};
use vmm_node::VmConfig;

const HOST_CIDR: &str = "10.77.0.1/24";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const MAC: &str = "52:54:00:77:00:02";
const T: Duration = Duration::from_secs(30);

/// One test at a time: each boots VMs and runs probes on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn net_config(tap: &str, mtu: u16) -> VmConfig {
    let w = Workload {
        hb_ms: 200,
        ..Workload::new(WorkloadKind::Net)
    };
    let mut c = common::test_guest_config(1, 64, &w);
    c.name = "net-test".into();
    c.cmdline = format!("{} {}", c.cmdline, net_cmdline(GUEST_IP.parse().unwrap()));
    c.nics = vec![NicConfig {
        mtu,
        ..NicConfig::new(tap, MAC)
    }];
    c
}

fn net_up(vm: &Vmm) -> String {
    vm.wait_console("the guest's NET up line", T, |l| l.starts_with("NET up"))
}

fn udp_echo(ns: &NetNs, dir: &std::path::Path, size: usize, count: usize) {
    let r = ns.probe(
        dir,
        &[
            "udp",
            GUEST_IP,
            "7",
            &size.to_string(),
            &count.to_string(),
            "5",
        ],
    );
    assert_eq!(r["ok"], true, "UDP echo of {size} bytes x{count}: {r}");
}

/// The latest heartbeat's value of `key`.
fn hb_field(vm: &Vmm, key: &str) -> u64 {
    let line = vm.wait_console("a heartbeat", T, |l| {
        l.starts_with("HB ") && l.contains(" net=")
    });
    field(&line, key).unwrap_or_else(|| panic!("{key} missing in {line}"))
}

#[test]
fn guest_answers_arp_udp_and_icmp_through_the_bridge() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("basic");
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap0", 1500);
    let vm = run_vm(&ns, dir.path(), "vm", &net_config("tap0", 1500));
    let up = net_up(&vm);
    assert!(up.contains(&format!("mac={MAC}")), "{up}");
    assert!(
        up.contains(&format!("ip={GUEST_IP}")) && up.contains("mtu=1500"),
        "{up}"
    );

    let arp = ns.probe(dir.path(), &["arp", "br0", HOST_IP, GUEST_IP, "10"]);
    assert_eq!(arp["ok"], true, "{arp}");
    assert_eq!(arp["mac"], MAC, "{arp}");
    assert_eq!(arp["eth_src"], MAC, "{arp}");

    udp_echo(&ns, dir.path(), 1, 5);
    udp_echo(&ns, dir.path(), 1000, 50);
    udp_echo(&ns, dir.path(), 1472, 20); // a full 1500-byte IP packet
    let icmp = ns.probe(dir.path(), &["icmp", GUEST_IP, "5", "5"]);
    assert_eq!(icmp["ok"], true, "{icmp}");

    // The bridge learned the guest behind its TAP.
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap0"));
    let hb = vm.wait_console("counters", T, |l| {
        field(l, "net_udp").is_some_and(|n| n >= 75) && field(l, "net_icmp").is_some_and(|n| n >= 5)
    });
    assert!(field(&hb, "net_arp").unwrap() >= 1, "{hb}");
    assert_eq!(field(&hb, "net_busy"), Some(0), "{hb}");
    assert_eq!(field(&hb, "net_resets"), Some(0), "{hb}");

    // The TAP disappears under the running VM: the VMM and the guest carry on.
    ns.ip(&["link", "del", "tap0"]);
    let seq = field(&hb, "seq").unwrap();
    vm.wait_console("heartbeats after the TAP was deleted", T, |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= seq + 10)
    });
    assert_eq!(
        vm.ok(json!({"cmd": "status"}))["status"]["state"],
        "running"
    );
}

/// NIC hot add and remove on a running VM: the guest (which polls its NIC slots, there is
/// no hot-plug notification in virtio-mmio) brings a NIC that appeared up and answers on
/// it, notices when it disappears and moves to another one; the bridge learns each NIC
/// behind its own TAP. Bad requests are refused with the reason and change nothing.
#[test]
fn nic_hot_add_and_remove_on_a_running_vm() {
    const MAC2: &str = "52:54:00:77:00:03";
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("hotplug");
    ns.bridge(HOST_CIDR, 1500);
    for t in ["tap0", "tap1", "tap2", "tap3", "tap4"] {
        ns.tap(t, 1500);
    }
    let mut cfg = net_config("tap0", 1500);
    cfg.nics.clear();
    let vm = run_vm(&ns, dir.path(), "vm", &cfg);
    let down = vm.wait_console("NET down (no NIC at boot)", T, |l| {
        l.starts_with("NET down")
    });
    assert!(down.contains("reason="), "{down}");

    // Hot add into the lowest free slot.
    let r = vm.ok(json!({"cmd": "attach-nic", "tap_name": "tap0", "mac": MAC}));
    assert_eq!(r["slot"], 0, "{r}");
    let up = vm.wait_console("NET up in slot 0", T, |l| {
        l.starts_with("NET up") && l.contains("slot=0")
    });
    assert!(up.contains(&format!("mac={MAC}")), "{up}");
    udp_echo(&ns, dir.path(), 1000, 20);
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap0"));

    // A second NIC (slot 1); the guest keeps answering on the first.
    let r = vm.ok(json!({"cmd": "attach-nic", "tap_name": "tap1", "mac": MAC2, "mtu": 1500}));
    assert_eq!(r["slot"], 1, "{r}");
    let st = vm.ok(json!({"cmd": "status"}));
    let nics = st["config"]["nics"].as_array().unwrap().clone();
    assert_eq!(nics.len(), 2, "{st}");
    assert_eq!(nics[1]["mac"], MAC2, "{st}");
    assert_eq!(nics[1]["slot"], 1, "{st}");

    // Refusals: duplicate MAC, TAP in use, unknown MAC, slot taken, no TAP; the NICs stay.
    for (req, want) in [
        (
            json!({"cmd": "attach-nic", "tap_name": "tap2", "mac": MAC}),
            "already used",
        ),
        (
            json!({"cmd": "attach-nic", "tap_name": "tap0", "mac": "52:54:00:77:00:09"}),
            "tap_name tap0",
        ),
        (
            json!({"cmd": "detach-nic", "mac": "52:54:00:77:00:09"}),
            "no NIC with MAC",
        ),
        (
            json!({"cmd": "attach-nic", "tap_name": "tap2", "mac": "52:54:00:77:00:09", "slot": 1}),
            "slot 1",
        ),
        (
            json!({"cmd": "attach-nic", "tap_name": "nosuchtap", "mac": "52:54:00:77:00:09"}),
            "nosuchtap",
        ),
        (
            json!({"cmd": "attach-nic", "tap_name": "tap2", "mac": "52:54:00:77:00:09", "mtu": 20000}),
            "mtu",
        ),
    ] {
        let r = vm.req(req.clone());
        assert_eq!(r["ok"], false, "{req} -> {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(want), "{req}: {e}");
    }
    assert_eq!(
        vm.ok(json!({"cmd": "status"}))["config"]["nics"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A full slot table refuses a fifth NIC.
    vm.ok(json!({"cmd": "attach-nic", "tap_name": "tap2", "mac": "52:54:00:77:00:04"}));
    vm.ok(json!({"cmd": "attach-nic", "tap_name": "tap3", "mac": "52:54:00:77:00:05"}));
    let r = vm.req(json!({"cmd": "attach-nic", "tap_name": "tap4", "mac": "52:54:00:77:00:06"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("every NIC slot"),
        "{r}"
    );
    vm.ok(json!({"cmd": "detach-nic", "mac": "52:54:00:77:00:04"}));
    vm.ok(json!({"cmd": "detach-nic", "mac": "52:54:00:77:00:05"}));

    // Hot remove the NIC in use: the guest notices and moves to slot 1.
    let r = vm.ok(json!({"cmd": "detach-nic", "mac": MAC}));
    assert_eq!(r["tap_name"], "tap0", "{r}");
    vm.wait_console("NET gone from slot 0", T, |l| {
        l.starts_with("NET gone") && l.contains("slot=0")
    });
    let up = vm.wait_console("NET up in slot 1", T, |l| {
        l.starts_with("NET up") && l.contains("slot=1")
    });
    assert!(up.contains(&format!("mac={MAC2}")), "{up}");
    // The host forgets the old neighbour entry, so ARP finds the new MAC.
    ns.ip(&["neigh", "flush", "dev", "br0"]);
    udp_echo(&ns, dir.path(), 1000, 20);
    assert_eq!(ns.fdb_port(MAC2).as_deref(), Some("tap1"));
    let arp = ns.probe(dir.path(), &["arp", "br0", HOST_IP, GUEST_IP, "10"]);
    assert_eq!(arp["mac"], MAC2, "{arp}");
    let st = vm.ok(json!({"cmd": "status"}));
    assert_eq!(st["status"]["state"], "running", "{st}");
    let nics = st["config"]["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 1, "{st}");
    assert_eq!(nics[0]["mac"], MAC2, "{st}");
}

#[test]
fn jumbo_frames_pass_with_mtu_9000() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("jumbo");
    ns.bridge(HOST_CIDR, 9000);
    ns.tap("tap0", 9000);
    let vm = run_vm(&ns, dir.path(), "vm", &net_config("tap0", 9000));
    let up = net_up(&vm);
    assert!(up.contains("mtu=9000"), "{up}");
    // 8972 bytes of payload: a 9000-byte IP packet, one 9014-byte frame each way.
    udp_echo(&ns, dir.path(), 8972, 20);
    udp_echo(&ns, dir.path(), 4000, 20);
    udp_echo(&ns, dir.path(), 64, 20);
    let icmp = ns.probe(dir.path(), &["icmp", GUEST_IP, "3", "5"]);
    assert_eq!(icmp["ok"], true, "{icmp}");
}

#[test]
fn snapshot_restore_keeps_the_nic_working_and_announces_it() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("snap");
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap0", 1500);
    let snap = dir.path().join("snap");
    let mut vm = run_vm(&ns, dir.path(), "a", &net_config("tap0", 1500));
    net_up(&vm);
    udp_echo(&ns, dir.path(), 500, 10);
    vm.ok(json!({"cmd": "snapshot", "dir": snap}));
    vm.ok(json!({"cmd": "stop"}));
    assert!(vm.wait_exit(T).success());
    drop(vm);

    // Listen for the announcement on the TAP before the restored VM resumes.
    let stop = dir.path().join("capture.stop");
    let mut cap = ns.spawn_probe(
        dir.path(),
        &[
            "capture",
            "tap0",
            "0x8035",
            MAC,
            stop.to_str().unwrap(),
            "60",
        ],
    );
    let vm = spawn_vmm(
        &ns,
        dir.path(),
        "b",
        &["restore", "--snapshot", snap.to_str().unwrap()],
    );
    cap.wait_line(|l| l == "SEEN 3", T);
    let frames = cap.finish(&stop)["frames"].as_array().unwrap().clone();
    assert_eq!(frames.len(), 3, "{frames:?}");
    for f in &frames {
        assert_eq!(f["dst"], "ff:ff:ff:ff:ff:ff", "{f}");
        assert_eq!(f["op"], 3, "RARP reverse request: {f}");
    }
    // The restored guest answers; it was not re-initialised (same NIC state).
    udp_echo(&ns, dir.path(), 500, 20);
    let hb = vm.wait_console("counters after restore", T, |l| {
        field(l, "net_udp").is_some_and(|n| n >= 30)
    });
    assert_eq!(field(&hb, "net_resets"), Some(0), "{hb}");
    assert_eq!(
        vm.console().matches("NET up").count(),
        0,
        "restore must not reboot the guest"
    );
}

/// Source on tap1, target on tap2 (same bridge, same namespace), migration over loopback
/// inside the namespace.
struct Pair {
    src: Vmm,
    dst: Vmm,
    addr: std::net::SocketAddr,
}

fn pair(ns: &NetNs, dir: &std::path::Path) -> Pair {
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap1", 1500);
    ns.tap("tap2", 1500);
    let src = run_vm(ns, dir, "src", &net_config("tap1", 1500));
    net_up(&src);
    let (dst, addr) = spawn_target(ns, dir, "dst", &["--nic-tap", "tap2"]);
    Pair { src, dst, addr }
}

fn migrate(p: &Pair) -> serde_json::Value {
    let r = p.src.req(json!({
        "cmd": "migrate",
        "addr": p.addr.to_string(),
        "max_downtime_ms": 100,
        "deadline_ms": 60_000
    }));
    assert_eq!(r["ok"], true, "migration failed: {r}");
    r
}

/// With no traffic, nothing but the target's announcement can teach the bridge that the
/// guest moved: the FDB points at the target's TAP right after the resume.
#[test]
fn quiet_live_migration_moves_the_mac_by_announcement() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("quiet");
    let mut p = pair(&ns, dir.path());
    udp_echo(&ns, dir.path(), 100, 5);
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap1"));
    // A heartbeat that counts all five echoes: what the guest sent before the migration.
    let hb = p.src.wait_console("the echoes counted", T, |l| {
        field(l, "net_udp").is_some_and(|n| n >= 5)
    });
    let tx_before = field(&hb, "net_tx").unwrap();

    let stop = dir.path().join("capture.stop");
    let mut cap = ns.spawn_probe(
        dir.path(),
        &[
            "capture",
            "tap2",
            "0x8035",
            MAC,
            stop.to_str().unwrap(),
            "60",
        ],
    );
    migrate(&p);
    wait_target_running(&mut p.dst);
    cap.wait_line(|l| l == "SEEN 1", T);
    assert_eq!(
        ns.fdb_port(MAC).as_deref(),
        Some("tap2"),
        "the bridge did not learn the target's port from the announcement"
    );
    // The guest itself sent nothing since (so the FDB entry came from the announcement).
    let hb = p.dst.wait_console("a target heartbeat", T, |l| {
        l.starts_with("HB ") && l.contains(" net=")
    });
    assert_eq!(field(&hb, "net_tx"), Some(tx_before), "{hb}");
    cap.wait_line(|l| l == "SEEN 3", T);
    let frames = cap.finish(&stop)["frames"].as_array().unwrap().clone();
    assert_eq!(frames.len(), 3, "{frames:?}");
    // And the guest answers on the target.
    udp_echo(&ns, dir.path(), 1000, 20);
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap2"));
    assert!(p.src.wait_exit(T).success());
}

/// A 1 kHz UDP echo stream runs through a live migration: echoes resume on the target,
/// and nothing sent after the resume is lost.
#[test]
fn live_migration_under_a_1khz_echo_stream() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("stream");
    let mut p = pair(&ns, dir.path());
    let stop = dir.path().join("stream.stop");
    let cap_stop = dir.path().join("capture.stop");
    let mut cap = ns.spawn_probe(
        dir.path(),
        &[
            "capture",
            "tap2",
            "0x8035",
            MAC,
            cap_stop.to_str().unwrap(),
            "120",
        ],
    );
    let stream = ns.spawn_probe(
        dir.path(),
        &[
            "stream",
            GUEST_IP,
            "7",
            "1000",
            stop.to_str().unwrap(),
            "120",
        ],
    );
    // Let the stream run on the source first.
    let before = hb_field(&p.src, "net_udp");
    p.src.wait_console("echoes on the source", T, |l| {
        field(l, "net_udp").is_some_and(|n| n >= before + 300)
    });
    let r = migrate(&p);
    wait_target_running(&mut p.dst);
    cap.wait_line(|l| l == "SEEN 1", T);
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap2"));
    // Echoes go on from the target.
    let first = hb_field(&p.dst, "net_udp");
    p.dst.wait_console("echoes on the target", T, |l| {
        field(l, "net_udp").is_some_and(|n| n >= first + 1000)
    });
    let res = stream.finish(&stop);
    let _ = cap.finish(&cap_stop);
    eprintln!(
        "echo stream across the migration: {} sent, {} lost, longest silence {} ms (from unix {}), \
         longest loss run {}; memory blackout {} us",
        res["sent"],
        res["lost"],
        res["longest_silence_ms"],
        res["longest_silence_start_unix"],
        res["longest_loss_run"],
        r["stats"]["blackout"]["total_us"]
    );
    eprintln!("migration stats: {}\nstream: {res}", r["stats"]);
    let sent = res["sent"].as_u64().unwrap();
    let received = res["received"].as_u64().unwrap();
    assert!(received >= 1300, "{res}");
    // Every loss is in the blackout: one run of consecutive sequence numbers.
    let lost = res["lost"].as_u64().unwrap();
    let run = res["longest_loss_run"].as_u64().unwrap();
    assert_eq!(lost, run, "losses outside the switchover: {res}");
    assert!(lost < sent / 4, "{res}");
}

/// Frames that reach a NIC's TAP while its VM is paused (a guest whose vCPU is starved
/// before a migration's pause, or the blackout before the final state is taken) are carried
/// with the NIC's saved state, the state a live migration sends too: the VM restored on
/// another TAP of the bridge answers every one of them, exactly once, after the source's
/// process (and with it everything still queued on its TAP) is gone. Without the carry-over
/// they die with the source's TAP. (A live migration needs a running source, so the state
/// is taken by a snapshot of the paused VM here; both save the same `VmState`.)
#[test]
fn frames_queued_at_a_paused_vm_are_answered_where_its_state_is_restored() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("carry");
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap1", 1500);
    ns.tap("tap2", 1500);
    let snap = dir.path().join("snap");
    let mut src = run_vm(&ns, dir.path(), "src", &net_config("tap1", 1500));
    net_up(&src);
    udp_echo(&ns, dir.path(), 100, 5);
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap1"));
    src.ok(json!({"cmd": "pause"}));
    const COUNT: usize = 50;
    let stop = dir.path().join("burst.stop");
    let mut burst = ns.spawn_probe(
        dir.path(),
        &[
            "burst",
            GUEST_IP,
            "7",
            &COUNT.to_string(),
            stop.to_str().unwrap(),
            "120",
        ],
    );
    burst.wait_line(|l| l.starts_with("SENT "), T);
    // The bridge sent them all to the paused VM's TAP.
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap1"));
    src.ok(json!({"cmd": "snapshot", "dir": snap, "resume": false}));
    src.ok(json!({"cmd": "stop"}));
    assert!(src.wait_exit(T).success());
    drop(src);
    let _dst = spawn_vmm(
        &ns,
        dir.path(),
        "dst",
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--nic-tap",
            "tap2",
        ],
    );
    // The probe ends by itself once every request was answered (or after 120 s).
    let line = burst.wait_line(|l| l.starts_with('{'), Duration::from_secs(130));
    let res: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(res["received"], COUNT, "{res}");
    assert_eq!(res["duplicates"], 0, "{res}");
    assert_eq!(ns.fdb_port(MAC).as_deref(), Some("tap2"));
}

#[test]
fn bad_nic_config_is_refused_with_the_field_named() {
    let _g = serial();
    common::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("bad");
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap0", 1500);
    let run = |name: &str, cfg: &VmConfig| {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(cfg).unwrap()).unwrap();
        run_failing(&ns, &["run", "--config", path.to_str().unwrap()])
    };
    let mut c = net_config("tap0", 1500);
    c.nics[0].mac = "52:54:00:77:00".into();
    let e = run("mac", &c);
    assert!(
        e.contains("nics[0].mac") && e.contains("is not a MAC address"),
        "{e}"
    );
    c.nics[0].mac = "01:00:5e:00:00:01".into();
    let e = run("mcast", &c);
    assert!(e.contains("nics[0].mac") && e.contains("unicast"), "{e}");
    let mut c = net_config("tap0", 10000);
    let e = run("mtu", &c);
    assert!(
        e.contains("nics[0].mtu 10000 is out of range (68..=9000)"),
        "{e}"
    );
    c.nics[0].mtu = 1500;
    c.nics.push(NicConfig::new("tap1", MAC));
    let e = run("dup", &c);
    assert!(
        e.contains("nics[1].mac") && e.contains("already used by nics[0]"),
        "{e}"
    );
    let c = net_config("nosuchtap", 1500);
    let e = run("missing", &c);
    assert!(
        e.contains("TAP device nosuchtap does not exist in this network namespace"),
        "{e}"
    );
    // A TAP another process holds is refused too, naming it.
    let _holder = run_vm(&ns, dir.path(), "holder", &net_config("tap0", 1500));
    let e = run("busy", &net_config("tap0", 1500));
    assert!(
        e.contains("TAP device tap0") && e.contains("TUNSETIFF"),
        "{e}"
    );
}

/// A target whose TAP does not exist refuses the VM at setup, naming the TAP; the source
/// keeps running and answering.
#[test]
fn migration_to_a_target_without_its_tap_is_refused() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("notap");
    ns.bridge(HOST_CIDR, 1500);
    ns.tap("tap1", 1500);
    let src = run_vm(&ns, dir.path(), "src", &net_config("tap1", 1500));
    net_up(&src);
    let (_dst, addr) = spawn_target(&ns, dir.path(), "dst", &["--nic-tap", "tap9"]);
    let r = src.req(json!({"cmd": "migrate", "addr": addr.to_string()}));
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("TAP device tap9 does not exist"), "{e}");
    assert_eq!(
        src.ok(json!({"cmd": "status"}))["status"]["state"],
        "running"
    );
    udp_echo(&ns, dir.path(), 200, 10);
}
