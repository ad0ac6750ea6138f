//! clusterctl against no agent and against a real one.

mod common;

use common::*;

use cluster_tests::{Cluster, Options};

#[test]
fn no_agent_reachable_is_one_clear_sentence_and_exit_2() {
    let o = ctl("127.0.1.251:9", &["cluster", "status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "stdout {out} stderr {err}");
    assert!(
        err.starts_with("clusterctl: error: no cluster agent reachable at 127.0.1.251:9: "),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(out.is_empty());

    let o = ctl("not-an-address", &["node", "list"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("\"not-an-address\" is not a valid agent address"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_against_a_real_agent() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.add_node(1).unwrap_or_else(|e| panic!("{e}"));
    c.start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);

    let o = ctl(&ep, &["cluster", "init", "--name", "tour"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("initialized"), "{out}");

    let o = ctl(&ep, &["-o", "json", "cluster", "status"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["cluster_name"], "tour");
    assert_eq!(v["voter_ids"], serde_json::json!([1]));

    let o = ctl(&ep, &["node", "list"]);
    let (out, _) = text(&o);
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID") && header.contains("STATE") && header.contains("MIGRATION"),
        "{out}"
    );
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with('1') && row.contains("up") && row.contains("voter"),
        "{out}"
    );

    let o = ctl(&ep, &["-o", "json", "node", "show", "1"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "up");
    assert!(v["facts"]["logical_cpus"].as_u64().unwrap_or(0) >= 1);

    let o = ctl(&ep, &["node", "show", "99"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4));
    assert!(err.contains("unknown node id 99"), "{err}");

    let o = ctl(
        &ep,
        &[
            "-o",
            "json",
            "node",
            "pause",
            "1",
            "--reason",
            "maintenance",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "paused");
    let o = ctl(&ep, &["-o", "json", "node", "resume", "1"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "up");
    let o = ctl(&ep, &["node", "pause", "7"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(text(&o).1.contains("unknown node id 7"));

    let o = ctl(&ep, &["kv", "put", "motd", "hello"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = ctl(&ep, &["kv", "get", "motd"]);
    assert_eq!(text(&o).0, "hello\n");
    // The agent's own view on request (a one-node cluster's is current anyway).
    let o = ctl(&ep, &["--stale", "kv", "get", "motd"]);
    assert_eq!(text(&o).0, "hello\n");

    let o = ctl(&ep, &["-o", "json", "events"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v[0]["kind"], "cluster_initialized");
    assert_eq!(v[1]["kind"], "node_joined");
    assert_eq!(v[2]["kind"], "node_state_changed");
    assert!(
        v[2]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("up -> paused: maintenance"),
        "{out}"
    );

    // Times: RFC 3339 in JSON, local time and age in tables; --tail; -f follows.
    let v = json(&ep, &["events", "--tail", "1"]);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["kind"], "node_state_changed", "{v}");
    let at = v[0]["at"].as_str().unwrap_or_default();
    assert!(
        at.len() == "2026-01-02T03:04:05.678Z".len() && at.ends_with('Z') && at.contains('T'),
        "{v}"
    );
    let table = ok(&ep, &["events"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("TIME") && header.contains("AGE") && !header.contains("UNIX"),
        "{table}"
    );
    let (mut json_follow, jrx) = spawn_lines(&ep, &["-o", "json", "events", "-f", "--tail", "1"]);
    let (mut table_follow, trx) = spawn_lines(&ep, &["events", "-f", "--tail", "1"]);
    // Both have shown the newest event (node 1 resumed), so they are following.
    let first = recv_until(&trx, "the newest event's row", |l| {
        l.contains("paused -> up")
    });
    assert!(first[0].starts_with("   SEQ  TIME"), "{first:?}");
    recv_until(&jrx, "the newest event as JSON", |l| {
        l.contains("paused -> up")
    });
    ok(&ep, &["node", "pause", "1", "--reason", "follow-me"]);
    let lines = recv_until(&jrx, "the new event as JSON", |l| l.contains("follow-me"));
    let e: serde_json::Value = serde_json::from_str(lines.last().map_or("", String::as_str))
        .unwrap_or_else(|e| panic!("{e}: {lines:?}"));
    assert_eq!(e["kind"], "node_state_changed", "{lines:?}");
    recv_until(&trx, "the new event's row", |l| l.contains("follow-me"));
    let _ = json_follow.kill();
    let _ = table_follow.kill();
    let _ = (json_follow.wait(), table_follow.wait());
    ok(&ep, &["node", "resume", "1"]);
    let o = ctl(&ep, &["events", "--tail", "5", "--after", "2"]);
    assert_eq!(o.status.code(), Some(64), "{:?}", text(&o));

    // Nodes by name as well as by id; an unknown name is refused, naming the nodes.
    assert_eq!(json(&ep, &["node", "show", "node-1"])["node_id"], 1);
    let o = ctl(&ep, &["node", "pause", "nope"]);
    assert_eq!(o.status.code(), Some(4), "{:?}", text(&o));
    assert!(
        text(&o)
            .1
            .contains("no node is named \"nope\"; the nodes are: node-1 (1)"),
        "{:?}",
        text(&o)
    );
    assert_eq!(
        json(&ep, &["node", "list"])[0]["state"],
        "up",
        "nothing paused"
    );

    // -o yaml: the JSON document as YAML.
    let y = ok(&ep, &["-o", "yaml", "node", "show", "node-1"]);
    assert!(
        y.lines().any(|l| l == "node_id: 1") && y.lines().any(|l| l == "state: up"),
        "{y}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&y).is_err(),
        "{y}"
    );

    let o = ctl(&ep, &["cluster", "join", "--via", "127.0.1.252:9"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4));
    assert!(err.contains("already a member"), "{err}");
}

#[test]
fn a_bad_command_line_is_a_usage_error_not_an_unreachable_agent() {
    let o = ctl("127.0.1.251:9", &["vm", "migrate"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(64), "stdout {out} stderr {err}");
    assert!(err.contains("Usage:"), "{err}");
    let o = ctl("127.0.1.251:9", &["--help"]);
    assert_eq!(o.status.code(), Some(0), "--help is an answer");
    assert!(text(&o).0.contains("Usage:"));
    assert!(
        text(&o).0.contains("Exit codes:\n  0   done"),
        "{:?}",
        text(&o)
    );
    // The main commands show examples.
    for cmd in [
        &["vm", "create"][..],
        &["vm", "migrate"],
        &["node", "drain"],
        &["events"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (out, _) = text(&ctl("127.0.1.251:9", &args));
        let example = format!("\n  clusterctl {}", cmd.join(" "));
        assert!(
            out.contains("Examples:") && out.contains(&example),
            "{cmd:?}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_serving_agent_and_an_unreachable_one() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.add_node(1).unwrap_or_else(|e| panic!("{e}"));
    c.start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let o = ctl(&ep, &["health"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout {out} stderr {err}");
    assert!(out.contains("serving"), "{out}");
    let o = ctl(&ep, &["health", "--service", "cluster.vms.v1.VmService"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = ctl(&ep, &["health", "--service", "no.such.Service"]);
    assert_eq!(o.status.code(), Some(4), "unknown service: {:?}", text(&o));
    let o = ctl("127.0.1.251:9", &["health"]);
    assert_eq!(o.status.code(), Some(2), "unreachable: {:?}", text(&o));
}

/// Exit 3: an agent cut off from the majority (its only peer killed) cannot confirm its
/// view and refuses a read; `--stale` reads its own view (exit 0); a refusal by the
/// cluster itself is exit 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_majority_is_exit_3_and_a_refusal_exit_4() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    ok(&ep, &["kv", "put", "motd", "hello"]);
    let o = ctl(&ep, &["node", "show", "9"]);
    assert_eq!(o.status.code(), Some(4), "{:?}", text(&o));
    c.kill9(2).unwrap_or_else(|e| panic!("{e}"));
    let r = cluster_tests::Wait::new(cluster_tests::WAIT).until_blocking(
        "a read through node 1 refused with exit 3",
        || {
            let o = ctl(&ep, &["kv", "get", "motd"]);
            Ok::<_, String>((o.status.code(), text(&o).1))
        },
        |(code, _)| *code == Some(3),
    );
    let (_, err) = c.check(r);
    assert!(err.contains("stale"), "{err}");
    assert_eq!(ok(&ep, &["--stale", "kv", "get", "motd"]), "hello\n");
}

/// Completions and man pages come from the same clap definition as the parser.
#[test]
fn completions_and_man_page_are_generated_from_the_command_line() {
    let o = ctl("127.0.1.251:9", &["completions", "bash"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("_clusterctl()"), "{out}");
    for sub in [
        "vm",
        "node",
        "drain",
        "events",
        "migration",
        "migrate",
        "completions",
    ] {
        assert!(out.contains(sub), "bash completion lacks {sub}");
    }
    for shell in ["zsh", "fish"] {
        let o = ctl("127.0.1.251:9", &["completions", shell]);
        assert!(
            o.status.success() && o.stdout.len() > 1000,
            "{shell}: {:?}",
            text(&o)
        );
    }
    let o = ctl("127.0.1.251:9", &["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(64), "{:?}", text(&o));

    let o = ctl("127.0.1.251:9", &["man"]);
    let (page, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        page.starts_with(".ie") || page.contains(".TH clusterctl"),
        "{page}"
    );
    // groff renders it without warnings, with the sections a man page has.
    let g = groff(&["-man", "-Tascii", "-ww"], &page);
    assert!(g.status.success(), "{g:?}");
    assert!(
        g.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&g.stderr)
    );
    // Without a terminal grotty emboldens by overstriking ("N\x08N"): keep the last char.
    let mut shown = String::new();
    for c in String::from_utf8_lossy(&g.stdout).chars() {
        if c == '\x08' {
            shown.pop();
        } else {
            shown.push(c);
        }
    }
    for section in ["NAME", "SYNOPSIS", "OPTIONS", "SUBCOMMANDS", "Exit codes"] {
        assert!(
            shown.contains(section),
            "rendered page lacks {section}: {shown}"
        );
    }

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path().join("man1");
    let o = ctl("127.0.1.251:9", &["man", "--dir", &d.display().to_string()]);
    assert!(o.status.success(), "{:?}", text(&o));
    for f in [
        "clusterctl.1",
        "clusterctl-vm-migrate.1",
        "clusterctl-node-drain.1",
    ] {
        assert!(d.join(f).is_file(), "{f} not in {}", d.display());
    }
}

/// `groff ARGS` with `input` on stdin.
fn groff(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut g = std::process::Command::new("groff")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("groff (apt-get install groff-base): {e}"));
    if let Some(mut stdin) = g.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    g.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

/// `cluster leave` by name: the name is resolved once, before the node leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_by_name() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(3).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let out = ok(&ep, &["cluster", "leave", "node-3"]);
    assert_eq!(out, "node 3 removed; 2 voters remain\n");
    let o = ctl(&ep, &["cluster", "leave", "node-3"]);
    assert_eq!(o.status.code(), Some(4), "{:?}", text(&o));
    assert!(
        text(&o)
            .1
            .contains("no node is named \"node-3\"; the nodes are: node-1 (1), node-2 (2)"),
        "{:?}",
        text(&o)
    );
}
