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
    assert!(shown.starts_with("node 3,"), "{shown}");
    let r = c.start(3).await;
    c.check(r);
    ok_out(&ctl(&endpoint(&c, 3), &["cluster", "join", "--via", &ep1]));
    // The token was good once (another new node cannot use it again).
    let o = join(token, "4");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
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
    assert_eq!(o.status.code(), Some(1), "{err}");
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
    assert!(err.contains("not signed by the CA in"), "{err}");
    // create-ca never overwrites a CA.
    let o = bare(
        &["pki", "create-ca", "--dir", &other.display().to_string()],
        &[],
    );
    assert!(text(&o).1.contains("already holds a CA"));
}
