//! `clusterctl console url`: a one-time login link to the web console of the agent asked
//! (the browser side is cluster-agent/tests/web_console.rs), and a clear refusal from an
//! agent that serves no console.

mod common;

use common::*;

use cluster_tests::{free_port, node_ip, Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_url_prints_a_fresh_link_to_the_agent_asked() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let console = c.check(free_port(node_ip(1, 1)));
    let added = c.add_node_with(1, &format!("console_addr = \"{console}\"\n"));
    c.check(added);
    let r = c.form(2).await;
    c.check(r);
    let (ep1, ep2) = (endpoint(&c, 1), endpoint(&c, 2));

    let out = ok(&ep1, &["console", "url"]);
    let prefix = format!("https://{console}/login?token=");
    let first = out.lines().next().unwrap_or_default();
    let token = first
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{out:?} does not start with {prefix}"));
    assert!(
        token.len() == 64 && token.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{token:?}"
    );
    assert!(out.contains("good once, for a minute"), "{out}");

    let j = json(&ep1, &["console", "url"]);
    let url = j["url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&prefix) && url != first,
        "a new link each time: {j}"
    );
    assert!(
        j["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "{j}"
    );

    refused(
        &ep2,
        &["console", "url"],
        "serves no web console (set console_addr",
    );
}
