//! Rotation of the cluster CA (issue 12) with real agents and real TLS: during the
//! transition both CAs' certificates work on the management and peer planes and writes
//! commit; the members renew from the new CA (the non-rotating issuer fetches the new CA
//! key over the peer plane); the finish is refused while a member still has an old-CA
//! certificate and, once done, an old-CA user certificate is refused with a clear error
//! while the cluster goes on; an agent restarted afterwards starts from consistent files;
//! live migrations work during the transition and after the finish.
//!
//! Needs `clusterctl` built beside the agent (`cargo build -p ctl`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster_proto::management::management_service_client::ManagementServiceClient;
use cluster_proto::management::{self as pb};
use cluster_proto::pki::{self, Issued, Role, TlsDir, TlsMaterial};
use cluster_tests::pki::{endpoint_as, pki as test_pki};
use cluster_tests::Wait;
use cluster_tests::{Cluster, Options};

fn material(d: &TlsDir) -> TlsMaterial {
    d.load()
        .unwrap_or_else(|e| panic!("credentials in {}: {e}", d.0.display()))
}

async fn mgmt(
    addr: SocketAddr,
    who: &TlsMaterial,
) -> Result<ManagementServiceClient<tonic::transport::Channel>, String> {
    endpoint_as(addr, Some(who))
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map(ManagementServiceClient::new)
        .map_err(|e| format!("{e:?}"))
}

/// A put through node `addr` as `who`.
async fn put_as(addr: SocketAddr, who: &TlsMaterial, key: &str) -> Result<(), String> {
    let mut c = mgmt(addr, who).await?;
    c.put_kv(pb::PutKvRequest {
        key: key.into(),
        value: "v".into(),
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

async fn get_ca(c: &Cluster, id: u64) -> Result<pb::CaInfo, String> {
    let mut cl = c.client(id).await.map_err(|e| e.to_string())?;
    cl.get_ca(pb::GetCaRequest {})
        .await
        .map(|r| r.into_inner().ca.unwrap_or_default())
        .map_err(|s| s.message().to_owned())
}

/// A user certificate issued by the cluster (its current issuing CA) through `addr`.
async fn new_user(
    addr: SocketAddr,
    as_: &TlsMaterial,
    name: &str,
    role: pb::UserRole,
) -> TlsMaterial {
    let (key_pem, csr_pem) = pki::new_key_and_request().unwrap_or_else(|e| panic!("csr: {e}"));
    let r = mgmt(addr, as_)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
        .issue_certificate(pb::IssueCertificateRequest {
            csr_pem,
            user_name: name.into(),
            role: role as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("issue a user certificate: {s:?}"))
        .into_inner();
    TlsMaterial {
        ca_pem: r.ca_pem,
        cert_pem: r.cert_pem,
        key_pem,
    }
}

fn issuer_of(cert_pem: &str, bundle: &str) -> Option<String> {
    pki::issuer_in(&pki::certificates_der(cert_pem)[0], bundle)
}

/// Node `id` may issue certificates too (a copy of the CA key, like node 1).
fn make_issuer(c: &Cluster, id: u64) {
    let spec = c.spec(id).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(
        TlsDir(test_pki().ca_dir()).ca_key(),
        TlsDir(spec.tls_dir.clone()).ca_key(),
    )
    .unwrap_or_else(|e| panic!("copying the CA key: {e}"));
}

/// The transition held open (members renew only in an hour): the old and the new CA's
/// certificates both work, on the management plane (old node certificates, a new user
/// certificate) and on the peer plane (a node that joins now gets a new-CA certificate
/// while the others keep theirs); the finish is refused and names the members that still
/// have old-CA certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_ca_rotation_both_cas_work_and_the_finish_waits_for_the_members() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let formed = c.form(3).await;
    c.check(formed);
    let old_admin = material(&test_pki().admin());
    let n1 = c
        .spec(1)
        .map(|s| s.mgmt_addr)
        .unwrap_or_else(|e| panic!("{e}"));

    let ca = c
        .client(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .rotate_ca(pb::RotateCaRequest {
            renew_after: Some(cluster_proto::prost_types::Duration {
                seconds: 3_600,
                nanos: 0,
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("rotate: {s:?}"))
        .into_inner()
        .ca
        .unwrap_or_default();
    assert!(!ca.previous_fingerprint.is_empty(), "{ca:?}");
    assert_eq!(pki::certificates_der(&ca.bundle_pem).len(), 2);
    // A second rotation waits for the finish.
    let again = c
        .client(2)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .rotate_ca(pb::RotateCaRequest { renew_after: None })
        .await
        .expect_err("a second rotation");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");

    // Every member writes the bundle to its ca.pem (and trusts it).
    for id in 1..=3 {
        let path = TlsDir(c.spec(id).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone()).ca_cert();
        c.check(
            Wait::new(Duration::from_secs(20))
                .until_blocking(
                    &format!("node {id} writes the trust bundle"),
                    || pki::read_pem_file(&path).map_err(|e| e.to_string()),
                    |text| pki::certificates_der(text).len() == 2,
                )
                .map(|_| ()),
        );
        let s = c.status(id).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.previous_ca_fingerprint, ca.previous_fingerprint);
        assert_eq!(s.ca_fingerprint, ca.current_fingerprint);
    }
    // Old certificates everywhere still work; a user certificate of the new CA too.
    let mut old_with_bundle = old_admin.clone();
    old_with_bundle.ca_pem = ca.bundle_pem.clone();
    put_as(n1, &old_admin, "old-admin")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let new_admin = new_user(n1, &old_admin, "ca-new-admin", pb::UserRole::Admin).await;
    assert_eq!(
        issuer_of(&new_admin.cert_pem, &ca.bundle_pem).as_deref(),
        Some(ca.current_fingerprint.as_str())
    );
    assert_eq!(
        pki::certificates_der(&new_admin.ca_pem).len(),
        2,
        "IssueCertificate answers the bundle"
    );
    for id in 1..=3 {
        let addr = c
            .spec(id)
            .map(|s| s.mgmt_addr)
            .unwrap_or_else(|e| panic!("{e}"));
        put_as(addr, &new_admin, &format!("new-admin-{id}"))
            .await
            .unwrap_or_else(|e| {
                panic!("a new-CA user on node {id} (old-CA node certificate): {e}")
            });
    }

    // A node joining now gets its certificate from the new CA: the peer plane is mixed.
    let token = c
        .client(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .create_join_token(pb::CreateJoinTokenRequest { ttl: None })
        .await
        .unwrap_or_else(|s| panic!("token: {s:?}"))
        .into_inner()
        .token;
    let spec4 = c.add_node(4).unwrap_or_else(|e| panic!("{e}"));
    let (key_pem, csr_pem) = pki::new_key_and_request().unwrap_or_else(|e| panic!("{e}"));
    let ips = [spec4.mgmt_addr.ip(), spec4.migration_addr.ip()];
    let mut anon = ManagementServiceClient::new(
        endpoint_as(n1, None)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let issued = anon
        .issue_certificate(pb::IssueCertificateRequest {
            csr_pem,
            join_token: token,
            node_id: 4,
            ips: ips.iter().map(ToString::to_string).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("join certificate: {s:?}"))
        .into_inner();
    TlsDir(spec4.tls_dir.clone())
        .store(
            &issued.ca_pem,
            &Issued {
                cert_pem: issued.cert_pem.clone(),
                key_pem,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        issuer_of(&issued.cert_pem, &ca.bundle_pem).as_deref(),
        Some(ca.current_fingerprint.as_str())
    );
    // Node 4's certificate is of the new CA: the harness's clients need the bundle.
    c.set_client(Some(old_with_bundle.clone()));
    c.start(4).await.unwrap_or_else(|e| panic!("{e}"));
    c.join(4, 1)
        .await
        .unwrap_or_else(|e| panic!("node 4 joins: {e}"));
    // Writes through node 4 are forwarded to the leader, and node 4 applies the others'.
    let n4 = spec4.mgmt_addr;
    put_as(n4, &old_with_bundle, "via-4")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    put_as(n1, &old_admin, "via-1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.check(
        c.wait_for(
            4,
            "apply a write made through node 1",
            Duration::from_secs(20),
            || c.get(4, "via-1"),
        )
        .await,
    );
    let ca4 = c.check(
        Wait::new(Duration::from_secs(20))
            .until(
                "node 4 reports its new-CA certificate",
                || get_ca(&c, 1),
                |ca: &pb::CaInfo| {
                    ca.nodes
                        .iter()
                        .any(|n| n.node_id == 4 && n.ca_fingerprint == ca.current_fingerprint)
                },
            )
            .await,
    );
    assert!(ca4
        .nodes
        .iter()
        .filter(|n| n.node_id != 4)
        .all(|n| n.ca_fingerprint == ca4.previous_fingerprint));

    // The finish waits for members 1, 2 and 3.
    let e = c
        .client(4)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .finish_ca_rotation(pb::FinishCaRotationRequest {})
        .await
        .expect_err("finish with old node certificates");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("node(s) 1, 2, 3"), "{}", e.message());
    c.barrier().await;
}

/// The whole rotation: rotate, every member renews from the new CA (node 2, an issuer
/// too, fetches the new CA key), writes commit all along, finish, an old-CA user
/// certificate is refused with a clear error, and a restarted agent rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_replaces_the_old_one_everywhere() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    for id in 1..=3 {
        c.add_node(id).unwrap_or_else(|e| panic!("{e}"));
    }
    make_issuer(&c, 2);
    let formed = c.form(3).await;
    c.check(formed);
    let old_admin = material(&test_pki().admin());
    let old_viewer = material(&test_pki().user("ca-old-viewer", Role::Viewer));
    let n3 = c
        .spec(3)
        .map(|s| s.mgmt_addr)
        .unwrap_or_else(|e| panic!("{e}"));

    // A writer on one long-lived connection all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writer_client = mgmt(n3, &old_admin).await.unwrap_or_else(|e| panic!("{e}"));
    let writer = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = writer_client
                    .put_kv(pb::PutKvRequest {
                        key: format!("w{i}"),
                        value: "x".into(),
                    })
                    .await;
                match r {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(s) => {
                        eprintln!("write w{i} at {:?}: {s:?}", std::time::SystemTime::now());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Rotate with clusterctl, which writes the bundle for the clients.
    let ctl = cluster_tests::locate_binary("clusterctl", "ctl").unwrap_or_else(|e| panic!("{e}"));
    let bundle_path = c.dir().join("bundle.pem");
    let n1 = c
        .spec(1)
        .map(|s| s.mgmt_addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = |args: &[&str], env: &[(&str, std::path::PathBuf)]| {
        let out = std::process::Command::new(&ctl)
            .args(["-e", &n1.to_string()])
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .output()
            .unwrap_or_else(|e| panic!("running clusterctl: {e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admin_env = test_pki().admin_env();
    let (code, out, err) = run(
        &[
            "cluster",
            "ca",
            "rotate",
            "--bundle-out",
            &bundle_path.to_string_lossy(),
        ],
        &admin_env,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("The new CA"), "{out}");
    let bundle = pki::read_pem_file(&bundle_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pki::certificates_der(&bundle).len(), 2, "{bundle}");
    // The harness's clients trust the bundle from now on (the members renew at once).
    let mut old_admin_bundle = old_admin.clone();
    old_admin_bundle.ca_pem = bundle.clone();
    c.set_client(Some(old_admin_bundle.clone()));
    let ca = get_ca(&c, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let new_ca_pem = pki::certificate_by_fingerprint(&bundle, &ca.current_fingerprint)
        .unwrap_or_else(|| panic!("the bundle holds the new CA"));

    // Every member renews from the new CA and reports it; node 2 holds the new CA key.
    let ca = c.check(
        Wait::new(Duration::from_secs(60))
            .until(
                "every member reports a node certificate of the new CA",
                || get_ca(&c, 1),
                |ca: &pb::CaInfo| {
                    ca.nodes.len() == 3
                        && ca
                            .nodes
                            .iter()
                            .all(|n| n.ca_fingerprint == ca.current_fingerprint)
                },
            )
            .await,
    );
    for id in 1..=3 {
        let d = TlsDir(c.spec(id).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
        let m = material(&d);
        assert_eq!(
            issuer_of(&m.cert_pem, &bundle).as_deref(),
            Some(ca.current_fingerprint.as_str()),
            "node {id}'s cert.pem"
        );
        assert_eq!(
            pki::certificates_der(&m.ca_pem).len(),
            2,
            "node {id}'s ca.pem"
        );
    }
    for id in [1, 2] {
        let d = TlsDir(c.spec(id).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
        let ca_key = c.check(Wait::new(Duration::from_secs(20)).until_blocking(
            &format!("node {id} holds the new CA key"),
            || {
                pki::read_pem_file(&d.ca_key())
                    .and_then(|k| pki::Ca::load(&new_ca_pem, &k))
                    .map(|ca| ca.fingerprint())
                    .map_err(|e| e.to_string())
            },
            |fp| fp == &ca.current_fingerprint,
        ));
        assert_eq!(ca_key, ca.current_fingerprint);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.ca_key())
                .unwrap_or_else(|e| panic!("{e}"))
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "node {id}'s ca.key");
    }
    // During the transition: old-CA user certificates (with the bundle as CA file) and
    // new ones work on every node; a client still trusting only the old CA cannot check
    // the renewed agents.
    let mut old_viewer_bundle = old_viewer.clone();
    old_viewer_bundle.ca_pem = bundle.clone();
    let new_admin = new_user(n1, &old_admin_bundle, "ca-new-admin-2", pb::UserRole::Admin).await;
    for id in 1..=3 {
        let addr = c
            .spec(id)
            .map(|s| s.mgmt_addr)
            .unwrap_or_else(|e| panic!("{e}"));
        put_as(addr, &old_admin_bundle, &format!("old-{id}"))
            .await
            .unwrap_or_else(|e| panic!("old admin on node {id}: {e}"));
        put_as(addr, &new_admin, &format!("new-{id}"))
            .await
            .unwrap_or_else(|e| panic!("new admin on node {id}: {e}"));
        let mut v = mgmt(addr, &old_viewer_bundle)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        v.list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap_or_else(|s| panic!("old viewer on node {id}: {s:?}"));
    }
    let stale = put_as(n1, &old_admin, "stale-trust")
        .await
        .expect_err("old CA file only");
    assert!(stale.contains("UnknownIssuer"), "{stale}");

    // Every write of the old admin's long-lived connection committed through the rotation
    // and the renewals (its certificate is refused once the rotation is finished).
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "writes failed on the long-lived connection"
    );
    assert!(done.load(Ordering::Relaxed) > 0);

    // Finish.
    let bundle_env: Vec<(&str, std::path::PathBuf)> = admin_env
        .iter()
        .map(|(k, v)| {
            if *k == "CLUSTERCTL_CA" {
                (*k, bundle_path.clone())
            } else {
                (*k, v.clone())
            }
        })
        .collect();
    let (code, out, err) = run(&["cluster", "ca", "finish"], &bundle_env);
    assert_eq!(code, Some(0), "{out}{err}");
    // The old admin certificate is refused from now on, with a clear error.
    let (code, out, err) = c.check(Wait::new(Duration::from_secs(20)).until_blocking(
        "the old CA's certificates are refused",
        || Ok::<_, String>(run(&["cluster", "status"], &bundle_env)),
        |(code, _, _)| *code != Some(0),
    ));
    assert_eq!(code, Some(4), "refused by the cluster: {out}{err}");
    assert!(
        err.contains("issued by the cluster's old CA") && err.contains("no longer trusted"),
        "{err}"
    );
    // The cluster goes on with the new CA only.
    let new_ca_only = TlsMaterial {
        ca_pem: new_ca_pem.clone(),
        ..new_admin.clone()
    };
    c.set_client(Some(new_ca_only.clone()));
    for id in 1..=3 {
        let d = TlsDir(c.spec(id).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
        c.check(
            Wait::new(Duration::from_secs(20))
                .until_blocking(
                    &format!("node {id} drops the old CA from its ca.pem"),
                    || pki::read_pem_file(&d.ca_cert()).map_err(|e| e.to_string()),
                    |text| pki::certificates_der(text).len() == 1,
                )
                .map(|_| ()),
        );
        let addr = c
            .spec(id)
            .map(|s| s.mgmt_addr)
            .unwrap_or_else(|e| panic!("{e}"));
        put_as(addr, &new_ca_only, &format!("after-{id}"))
            .await
            .unwrap_or_else(|e| panic!("node {id} after the finish: {e}"));
        for who in [&old_admin_bundle, &old_viewer_bundle] {
            let e = put_as(addr, who, "refused")
                .await
                .expect_err("old CA after finish");
            assert!(
                e.starts_with("Unauthenticated") && e.contains("old CA"),
                "{e}"
            );
        }
        let s = c.status(id).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(s.previous_ca_fingerprint.is_empty(), "{s:?}");
    }

    // An agent restarted afterwards starts from its files and rejoins.
    assert!(c.stop(2).unwrap_or_else(|e| panic!("{e}")));
    c.start(2)
        .await
        .unwrap_or_else(|e| panic!("node 2 restarts: {e}"));
    put_as(n1, &new_ca_only, "after-restart")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.check(
        c.wait_for(
            2,
            "apply a write after its restart",
            Duration::from_secs(30),
            || c.get(2, "after-restart"),
        )
        .await,
    );
    let d2 = TlsDir(c.spec(2).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
    let leftovers: Vec<_> = std::fs::read_dir(&d2.0)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ca.key.") || n.ends_with(".tmp") || n.ends_with(".next"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let d1 = TlsDir(c.spec(1).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
    assert!(!d1.pending_ca_key(&ca.current_fingerprint).exists());
    c.barrier().await;
}

/// Node `to` runs `name` after a live migration from its owner that succeeded.
async fn migrate(c: &Cluster, name: &str, to: u64) {
    let mut vm = c.vms(to).await;
    vm.migrate_vm(cluster_proto::vms::MigrateVmRequest {
        name: name.into(),
        to_node_id: to,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate {name} to node {to}: {e}{}", c.logs()));
    let started = std::time::Instant::now();
    cluster_tests::vm::try_wait_migrated(&mut vm, name, to, started, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{name} to node {to}: {e}{}", c.logs()));
}

/// Live migrations (mutual TLS on the migration plane, VM workers) work with the members'
/// renewed new-CA certificates while both CAs are trusted, and after the finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migrations_work_across_a_ca_rotation() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::vm_agents();
    let formed = c.form(2).await;
    c.check(formed);
    let v = c
        .create_running(
            1,
            cluster_tests::vm::guest_spec("rot", 64, cluster_tests::vm::mem_boot()),
        )
        .await;
    let (from, to) = (v.owner_id, 3 - v.owner_id);
    let old_admin = material(&test_pki().admin());
    let n1 = c
        .spec(1)
        .map(|s| s.mgmt_addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let ca = mgmt(n1, &old_admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .rotate_ca(pb::RotateCaRequest { renew_after: None })
        .await
        .unwrap_or_else(|s| panic!("rotate: {s:?}"))
        .into_inner()
        .ca
        .unwrap_or_default();
    let mut old_with_bundle = old_admin.clone();
    old_with_bundle.ca_pem = ca.bundle_pem.clone();
    c.set_client(Some(old_with_bundle.clone()));
    c.check(
        Wait::new(Duration::from_secs(60))
            .until(
                "both members report a new-CA certificate",
                || get_ca(&c, 1),
                |ca: &pb::CaInfo| {
                    ca.nodes.len() == 2
                        && ca
                            .nodes
                            .iter()
                            .all(|n| n.ca_fingerprint == ca.current_fingerprint)
                },
            )
            .await
            .map(|_| ()),
    );
    // During the transition, with renewed certificates.
    migrate(&c, "rot", to).await;
    // After the finish (new CA only).
    let new_admin = new_user(n1, &old_with_bundle, "ca-mig-admin", pb::UserRole::Admin).await;
    c.set_client(Some(TlsMaterial {
        ca_pem: pki::certificate_by_fingerprint(&ca.bundle_pem, &ca.current_fingerprint)
            .unwrap_or_else(|| panic!("the new CA")),
        ..new_admin.clone()
    }));
    mgmt(n1, &new_admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .finish_ca_rotation(pb::FinishCaRotationRequest {})
        .await
        .unwrap_or_else(|s| panic!("finish: {s:?}"));
    for id in [1, 2] {
        let d = TlsDir(c.spec(id).unwrap_or_else(|e| panic!("{e}")).tls_dir.clone());
        c.check(
            Wait::new(Duration::from_secs(20))
                .until_blocking(
                    &format!("node {id} drops the old CA"),
                    || pki::read_pem_file(&d.ca_cert()).map_err(|e| e.to_string()),
                    |text| pki::certificates_der(text).len() == 1,
                )
                .map(|_| ()),
        );
    }
    migrate(&c, "rot", from).await;
    c.barrier().await;
}
