//! clusterctl and trust: contexts instead of flags, the offline PKI commands, a new host
//! joining with a join token, users created online with a role, and clear errors for a
//! wrong CA, a missing certificate and a missing role.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

use cluster_tests::{Cluster, Options};

/// clusterctl with only the environment given (no harness credentials, no config file
/// unless `env` names one).
fn bare(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    for k in [
        "CLUSTERCTL_ENDPOINT",
        "CLUSTERCTL_CA",
        "CLUSTERCTL_CERT",
        "CLUSTERCTL_KEY",
        "CLUSTERCTL_CONFIG",
        "CLUSTERCTL_CONTEXT",
    ] {
        c.env_remove(k);
    }
    // Never the config of the machine's user (e.g. the context local-cluster.sh wrote).
    c.env("CLUSTERCTL_CONFIG", "/nonexistent/clusterctl/config.toml");
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run clusterctl: {e}"))
}

fn ok_out(o: &Output) -> String {
    let (out, err) = text(o);
    assert!(o.status.success(), "stdout {out}\nstderr {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_bootstraps_joins_with_a_token_and_adds_a_viewer() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(2).await;
    c.check(r);
    let ep1 = endpoint(&c, 1);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = dir.path().join("config.toml");
    let pki = cluster_tests::pki::pki();
    let admin = pki.admin();
    let env = [("CLUSTERCTL_CONFIG", cfg.as_path())];

    // A context makes flags unnecessary.
    ok_out(&bare(
        &[
            "config",
            "add-context",
            "test",
            "--endpoints",
            &ep1,
            "--ca",
            &admin.ca_cert().display().to_string(),
            "--cert",
            &admin.cert().display().to_string(),
            "--key",
            &admin.key().display().to_string(),
            "--current",
        ],
        &env,
    ));
    assert!(ok_out(&bare(&["config", "get-contexts"], &env)).contains("* test"));
    assert!(ok_out(&bare(&["node", "list"], &env)).contains("node-2"));

    // A new host: a join token, its certificate made with it, its agent joins.
    let token = ok_out(&bare(&["cluster", "token", "create", "--ttl", "10m"], &env));
    let token = token.trim();
    let r = c.add_node(3);
    let spec3 = c.check(r);
    std::fs::remove_dir_all(&spec3.tls_dir).unwrap_or_else(|e| panic!("{e}"));
    let ca = admin.ca_cert();
    let join = |token: &str, node: &str| {
        bare(
            &[
                "pki",
                "join",
                "--token",
                token,
                "--node-id",
                node,
                "--ip",
                &spec3.mgmt_addr.ip().to_string(),
                "--ip",
                &spec3.migration_addr.ip().to_string(),
                "--out",
                &spec3.tls_dir.display().to_string(),
                "--endpoint",
                &ep1,
                "--ca",
                &ca.display().to_string(),
            ],
            &[],
        )
    };
    assert!(ok_out(&join(token, "3")).contains("node 3: certificate issued"));
    let shown = ok_out(&bare(
        &[
            "pki",
            "show",
            &spec3.tls_dir.join("cert.pem").display().to_string(),
        ],
        &[],
    ));
    assert!(shown.starts_with("node 3, valid from "), "{shown}");
    // A year-long certificate: its expiry in UTC and the time left.
    assert!(
        shown.contains(" UTC (") && shown.contains(" s left; unix time "),
        "{shown}"
    );
    let r = c.start(3).await;
    c.check(r);
    ok_out(&ctl(&endpoint(&c, 3), &["cluster", "join", "--via", &ep1]));
    // The token was good once (another new node cannot use it again).
    let o = join(token, "4");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("already used by node 3"), "{err}");

    // An admin creates a viewer online; the viewer reads and is refused a change.
    let olga = dir.path().join("olga");
    ok_out(&bare(
        &[
            "user",
            "create",
            "olga",
            "--role",
            "viewer",
            "--out",
            &olga.display().to_string(),
        ],
        &env,
    ));
    let as_olga = |args: &[&str]| {
        let mut all = vec![
            "--cert".to_string(),
            olga.join("cert.pem").display().to_string(),
            "--key".to_string(),
            olga.join("key.pem").display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        bare(&all, &env)
    };
    assert!(ok_out(&as_olga(&["node", "list"])).contains("node-3"));
    let o = as_olga(&["kv", "put", "k", "v"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("user \"olga\" has role viewer; PutKv needs role admin"),
        "{err}"
    );

    // No certificate: a sentence saying what to give.
    let o = bare(
        &[
            "--endpoint",
            &ep1,
            "--ca",
            &ca.display().to_string(),
            "node",
            "list",
        ],
        &[],
    );
    let (_, err) = text(&o);
    assert!(err.contains("needs a client certificate"), "{err}");
    // No CA at all.
    let o = bare(
        &["--endpoint", &ep1, "node", "list"],
        &[("CLUSTERCTL_CONFIG", Path::new("/nonexistent/cfg"))],
    );
    let (_, err) = text(&o);
    assert!(err.contains("no cluster CA certificate"), "{err}");
    // The wrong CA: another cluster's.
    let other = dir.path().join("other-ca");
    ok_out(&bare(
        &["pki", "create-ca", "--dir", &other.display().to_string()],
        &[],
    ));
    let o = bare(
        &[
            "--endpoint",
            &ep1,
            "--ca",
            &other.join("ca.pem").display().to_string(),
            "--cert",
            &admin.cert().display().to_string(),
            "--key",
            &admin.key().display().to_string(),
            "node",
            "list",
        ],
        &[],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not signed by a CA in"), "{err}");
    // create-ca never overwrites a CA.
    let o = bare(
        &["pki", "create-ca", "--dir", &other.display().to_string()],
        &[],
    );
    assert!(text(&o).1.contains("already holds a CA"));
}

/// clusterctl at `ep` as the holder of the credentials in `d`.
fn as_holder(d: &cluster_proto::pki::TlsDir, ep: &str, args: &[&str]) -> Output {
    let mut all = vec!["--endpoint", ep];
    all.extend_from_slice(args);
    let (ca, cert, key) = (d.ca_cert(), d.cert(), d.key());
    bare(
        &all,
        &[
            ("CLUSTERCTL_CA", ca.as_path()),
            ("CLUSTERCTL_CERT", cert.as_path()),
            ("CLUSTERCTL_KEY", key.as_path()),
        ],
    )
}

/// clusterctl's stderr of a refused command (exit code 4).
fn refused_err(o: &Output) -> String {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(4), "stdout {out}\nstderr {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_certificate_is_refused_on_every_node_and_others_keep_working() {
    use cluster_proto::pki::Role;
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    c.check(r);
    let eps: Vec<String> = (1..=3).map(|id| endpoint(&c, id)).collect();
    let pki = cluster_tests::pki::pki();
    let admin = pki.admin();
    let rita = pki.user("rita", Role::Viewer);
    let sam = pki.user("sam", Role::Viewer);
    let ada = pki.user("ada", Role::Admin);

    // Before: everyone works.
    for ep in &eps {
        assert!(ok_out(&as_holder(&rita, ep, &["node", "list"])).contains("node-3"));
    }
    ok_out(&as_holder(&ada, &eps[0], &["kv", "put", "before", "1"]));

    // A viewer cannot revoke, nor list the revocations; sam keeps working.
    let err = refused_err(&as_holder(&rita, &eps[1], &["user", "revoke", "sam"]));
    assert!(
        err.contains("user \"rita\" has role viewer; RevokeCertificate needs role admin"),
        "{err}"
    );
    let err = refused_err(&as_holder(&rita, &eps[1], &["user", "list-revoked"]));
    assert!(err.contains("needs role admin"), "{err}");
    ok_out(&as_holder(&sam, &eps[0], &["node", "list"]));

    // An admin revokes every certificate of rita (through node 2, a follower or not).
    let out = ok_out(&as_holder(&admin, &eps[1], &["user", "revoke", "rita"]));
    assert!(out.contains("every certificate of user \"rita\""), "{out}");
    // Every node has applied it once the barrier write is applied everywhere.
    c.barrier().await;
    for ep in &eps {
        for args in [&["node", "list"][..], &["kv", "get", "before"]] {
            let err = refused_err(&as_holder(&rita, ep, args));
            assert!(
                err.contains("this client certificate was revoked")
                    && err.contains("every certificate of user \"rita\" was revoked at")
                    && err.contains("by user \"admin\" (admin)"),
                "{ep}: {err}"
            );
        }
        // The others are untouched.
        assert!(ok_out(&as_holder(&sam, ep, &["node", "list"])).contains("node-3"));
        ok_out(&as_holder(&ada, ep, &["kv", "get", "before"]));
    }

    // Twice: a clear answer, nothing new in the list.
    let err = refused_err(&as_holder(&admin, &eps[2], &["user", "revoke", "rita"]));
    assert!(
        err.contains("every certificate of user \"rita\" is already revoked"),
        "{err}"
    );

    // One certificate by its file: ada's admin certificate; ada is refused, the
    // harness's admin (another certificate) is not.
    let ada_cert = ada.cert().display().to_string();
    let out = ok_out(&as_holder(
        &admin,
        &eps[0],
        &["user", "revoke", "--cert-file", &ada_cert],
    ));
    assert!(out.contains("of user \"ada\" (admin)"), "{out}");
    c.barrier().await;
    for ep in &eps {
        let err = refused_err(&as_holder(&ada, ep, &["kv", "put", "after", "1"]));
        assert!(err.contains("this client certificate was revoked"), "{err}");
    }
    assert_eq!(
        c.get(1, "after").await.unwrap_or_else(|e| panic!("{e}")),
        None
    );
    let err = refused_err(&as_holder(
        &admin,
        &eps[0],
        &["user", "revoke", "--cert-file", &ada_cert],
    ));
    assert!(err.contains("is already revoked"), "{err}");
    // A node's certificate is not revoked this way.
    let node3 = c.check(c.spec(3)).tls_dir.join("cert.pem");
    let err = refused_err(&as_holder(
        &admin,
        &eps[0],
        &[
            "user",
            "revoke",
            "--cert-file",
            &node3.display().to_string(),
        ],
    ));
    assert!(err.contains("node 3's certificate"), "{err}");

    // The list, in order, with who revoked.
    let listed = ok_out(&as_holder(&admin, &eps[2], &["user", "list-revoked"]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        lines[1].starts_with("rita") && lines[1].contains("(every certificate)"),
        "{listed}"
    );
    assert!(
        lines[2].starts_with("ada") && lines[2].contains("sha256:"),
        "{listed}"
    );
    let events = ok_out(&as_holder(&admin, &eps[0], &["events"]));
    assert_eq!(events.matches("certificate_revoked").count(), 2, "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_show_reports_the_migration_plane_and_the_certificate_expiry() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.add_node(1);
    c.check(r);
    let r = c.add_node_with(2, "migration_insecure_plaintext = true\n");
    c.check(r);
    let r = c.form(2).await;
    c.check(r);
    let ep = endpoint(&c, 1);
    for (id, plane) in [
        (1u64, "tls (mutual, node certificates)"),
        (
            2,
            "PLAINTEXT, unauthenticated (migration_insecure_plaintext)",
        ),
    ] {
        let shown = ok(&ep, &["node", "show", &id.to_string()]);
        let line = shown
            .lines()
            .find(|l| l.starts_with("migration plane"))
            .unwrap_or_else(|| panic!("{shown}"));
        assert!(line.ends_with(plane), "node {id}: {shown}");
        // The expiry is the node's certificate's.
        let cert = c.check(c.spec(id)).tls_dir.join("cert.pem");
        let pem = cluster_proto::pki::read_pem_file(&cert).unwrap_or_else(|e| panic!("{e}"));
        let der = cluster_proto::pki::certificates_der(&pem);
        let until = cluster_proto::pki::unix_ms(
            cluster_proto::pki::not_after(&der[0]).unwrap_or_else(|e| panic!("{e}")),
        );
        let line = shown
            .lines()
            .find(|l| l.starts_with("certificate expires"))
            .unwrap_or_else(|| panic!("{shown}"));
        assert!(
            line.ends_with(&cluster_proto::pki::utc(until)),
            "node {id}: {shown}"
        );
        let j = json(&ep, &["node", "show", &id.to_string()]);
        let until_rfc3339 = cluster_proto::times::timestamp_from_unix_ms(until)
            .map(|t| cluster_proto::times::rfc3339(&t))
            .unwrap_or_default();
        assert_eq!(j["cert_expires_at"], until_rfc3339, "{j}");
    }
}
