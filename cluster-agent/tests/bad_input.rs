//! Bad input gives a clear error and never destroys existing state.

use std::time::Duration;

use cluster_tests::{Cluster, HarnessError, Options};

macro_rules! must {
    ($c:ident, $e:expr $(,)?) => {{
        let r = $e;
        $c.check(r)
    }};
}

fn rpc_error<T: std::fmt::Debug>(r: Result<T, HarnessError>) -> tonic::Status {
    match r {
        Err(HarnessError::Rpc { status, .. }) => status,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn malformed_config_is_refused_naming_the_key() {
    let mut c = Cluster::agents(Options::default());
    let cases = [
        ("bogus_key = 1", "bogus_key"),
        ("[facts_override]\ncpu_vendr = \"x\"", "cpu_vendr"),
        ("rpc_timeout_ms = 1", "`rpc_timeout_ms`"),
    ];
    for (i, (extra, key)) in cases.iter().enumerate() {
        let id = 10 + i as u64;
        must!(c, c.add_node_with(id, extra).map(|_| ()));
        let (ok, out) = must!(c, c.run_to_exit(id, Duration::from_secs(20)));
        assert!(!ok, "agent accepted {extra:?}");
        assert!(
            out.contains(key),
            "error for {extra:?} does not name {key}: {out}"
        );
        assert!(
            !must!(c, c.spec(id).cloned()).data_dir.exists(),
            "a refused config must not create the data dir"
        );
    }
    // Duplicate keys and type errors are TOML errors naming the key too.
    must!(c, c.add_node_with(20, "node_id = 21").map(|_| ()));
    let (ok, out) = must!(c, c.run_to_exit(20, Duration::from_secs(20)));
    assert!(!ok && out.contains("node_id"), "{out}");
    // Invalid values from the file.
    let spec = must!(c, c.add_node(30));
    let text = std::fs::read_to_string(&spec.config_path).unwrap_or_default();
    std::fs::write(
        &spec.config_path,
        text.replace(&spec.migration_addr.to_string(), "not-an-address"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(30, Duration::from_secs(20)));
    assert!(
        !ok && out.contains("`migration_addr`") && out.contains("not-an-address"),
        "{out}"
    );
    // A misspelt crash point (fault tests) is refused rather than silently ignored.
    must!(c, c.add_node(31).map(|_| ()));
    must!(
        c,
        c.set_env(31, "CLUSTER_AGENT_CRASH_AT", "migrate-out-after-switchovr")
    );
    let (ok, out) = must!(c, c.run_to_exit(31, Duration::from_secs(20)));
    assert!(
        !ok && out.contains("CLUSTER_AGENT_CRASH_AT")
            && out.contains("migrate-out-after-switchovr")
            && out.contains("migrate-out-after-switchover"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_unreachable_join_and_duplicate_id_are_refused() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(2).await;
    must!(c, r);

    // Unknown node id.
    let mut cl = must!(c, c.client(2).await);
    let s = cl
        .get_node(cluster_proto::management::GetNodeRequest { node_id: 99 })
        .await
        .err()
        .unwrap_or_else(|| panic!("node 99 was found"));
    assert_eq!(s.code(), tonic::Code::NotFound);
    assert!(
        s.message().contains("unknown node id 99"),
        "{}",
        s.message()
    );
    let s = rpc_error(c.leave(2, 99).await);
    assert_eq!(s.code(), tonic::Code::NotFound);
    assert!(s.message().contains("99"), "{}", s.message());

    // Join through an address where nothing listens.
    must!(c, c.add_node(3));
    must!(c, c.start(3).await);
    let s = rpc_error(c.join_addr(3, "127.0.1.250:9").await);
    assert_eq!(s.code(), tonic::Code::Unavailable);
    assert!(
        s.message()
            .contains("cannot reach join address 127.0.1.250:9"),
        "{}",
        s.message()
    );
    let s3 = must!(c, c.status(3).await);
    assert!(!s3.initialized);
    let s = rpc_error(c.join_addr(3, "nonsense").await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    // ...and the agent can still join properly afterwards.
    let j = must!(c, c.join(3, 1).await);
    assert_eq!(j.voter_count, 3);
    // Joining twice is refused by the agent itself.
    let s = rpc_error(c.join(3, 1).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(s.message().contains("already a member"), "{}", s.message());

    // A second agent claiming node id 2 (other addresses, fresh data dir).
    let mut other = Cluster::agents(Options::default());
    must!(other, other.add_node(2).map(|_| ()));
    must!(other, other.start(2).await);
    let via = must!(c, c.spec(1).map(|s| s.mgmt_addr.to_string()));
    let s = rpc_error(other.join_addr(2, &via).await);
    assert_eq!(s.code(), tonic::Code::AlreadyExists, "{}", s.message());
    assert!(
        s.message().contains("node id 2 is already used"),
        "{}",
        s.message()
    );
    let st = must!(c, c.status(1).await);
    assert_eq!(st.voter_ids.len(), 3, "membership must be unchanged");
    let n2 = must!(c, c.nodes(1).await);
    let spec2 = must!(c, c.spec(2).cloned());
    assert!(n2
        .iter()
        .any(|n| n.node_id == 2 && n.mgmt_addr == spec2.mgmt_addr.to_string()));
    // Leaving the last voter is refused (on a separate one-node cluster).
    let mut solo = Cluster::agents(Options::default());
    let r = solo.form(1).await;
    must!(solo, r);
    let s = rpc_error(solo.leave(1, 1).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(s.message().contains("last voter"), "{}", s.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_missing_data_dir_is_refused_and_left_untouched() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    must!(c, r);
    must!(c, c.put(1, "precious", "data").await);
    let spec = must!(c, c.spec(3).cloned());
    // Let node 3 apply the write before stopping it.
    let v = c
        .wait_for(3, "replication", Duration::from_secs(5), || async {
            c.get(3, "precious").await
        })
        .await;
    must!(c, v);
    must!(c, c.stop(3));

    // 1. Corrupted identity marker.
    let marker = spec.data_dir.join("identity.json");
    let good = std::fs::read(&marker).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&marker, b"{ garbage").unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(3, Duration::from_secs(20)));
    assert!(!ok, "agent started with a corrupted marker");
    assert!(
        out.contains("identity.json is corrupted") && out.contains("left untouched"),
        "{out}"
    );
    assert_eq!(std::fs::read(&marker).unwrap_or_default(), b"{ garbage");
    std::fs::write(&marker, &good).unwrap_or_else(|e| panic!("{e}"));

    // 2. Missing RocksDB store.
    let store = spec.data_dir.join("raft");
    let moved = c.dir().join("moved-store");
    std::fs::rename(&store, &moved).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(3, Duration::from_secs(20)));
    assert!(!ok);
    assert!(
        out.contains("Raft store") && out.contains("is missing"),
        "{out}"
    );
    assert!(
        !store.exists(),
        "the agent must not recreate a missing store"
    );
    std::fs::rename(&moved, &store).unwrap_or_else(|e| panic!("{e}"));

    // 3. Corrupted RocksDB CURRENT file.
    let current = store.join("CURRENT");
    let good_current = std::fs::read(&current).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&current, b"MANIFEST-999999\n").unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(3, Duration::from_secs(20)));
    assert!(!ok);
    assert!(out.contains("cannot be opened"), "{out}");
    assert_eq!(
        std::fs::read(&current).unwrap_or_default(),
        b"MANIFEST-999999\n"
    );
    std::fs::write(&current, &good_current).unwrap_or_else(|e| panic!("{e}"));

    // 4. The data dir of node 3 used with another node id: first with node 3's
    // certificate (refused: it names another node), then with a certificate of node 4
    // (refused: the data dir belongs to node 3).
    let cfg = std::fs::read_to_string(&spec.config_path).unwrap_or_default();
    std::fs::write(&spec.config_path, cfg.replace("node_id = 3", "node_id = 4"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(3, Duration::from_secs(20)));
    assert!(!ok);
    assert!(
        out.contains("names node 3, but this agent is node 4"),
        "{out}"
    );
    let tls4 = c.dir().join("node-4-tls");
    cluster_tests::pki::pki().issue_node(
        4,
        &[spec.mgmt_addr.ip(), spec.migration_addr.ip()],
        &tls4,
        false,
    );
    let tls3 = format!("tls_dir = \"{}\"", spec.tls_dir.display());
    assert!(cfg.contains(&tls3), "{cfg}");
    std::fs::write(
        &spec.config_path,
        cfg.replace("node_id = 3", "node_id = 4")
            .replace(&tls3, &format!("tls_dir = \"{}\"", tls4.display())),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(3, Duration::from_secs(20)));
    assert!(!ok);
    assert!(
        out.contains("belongs to node 3") && out.contains("node 4"),
        "{out}"
    );
    std::fs::write(&spec.config_path, cfg).unwrap_or_else(|e| panic!("{e}"));

    // 5. A foreign, non-empty directory.
    let foreign = c.dir().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(foreign.join("keep.me"), b"x").unwrap_or_else(|e| panic!("{e}"));
    must!(c, c.add_node_with(9, "").map(|_| ()));
    let spec9 = must!(c, c.spec(9).cloned());
    let cfg9 = std::fs::read_to_string(&spec9.config_path).unwrap_or_default();
    std::fs::write(
        &spec9.config_path,
        cfg9.replace(
            &format!("data_dir = \"{}\"", spec9.data_dir.display()),
            &format!("data_dir = \"{}\"", foreign.display()),
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = must!(c, c.run_to_exit(9, Duration::from_secs(20)));
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(
        std::fs::read(foreign.join("keep.me")).unwrap_or_default(),
        b"x"
    );

    // After the repairs node 3 starts and still has everything.
    must!(c, c.start(3).await);
    assert_eq!(
        must!(c, c.get(3, "precious").await).as_deref(),
        Some("data")
    );
    let s = must!(c, c.status(3).await);
    assert_eq!(s.voter_ids.len(), 3);
}
