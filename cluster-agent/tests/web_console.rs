//! The web console end to end, in a real headless browser (chromium through
//! chromedriver) against three real agents with a real KVM guest: login through a
//! one-time link from the gRPC API, the views filled from the live stream, a live
//! migration's progress bar moving to done, a confirmed action from the page, and the
//! refusals (no session 401, viewer 403, missing CSRF token 403, bad input 400, a used
//! link 401, a revoked user 401). Screenshots of the main views go to the test directory;
//! `CONSOLE_SCREENSHOTS_DIR=docs cargo test -p cluster-agent --test web_console` refreshes
//! the ones kept in `docs/console-*.png`.

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use cluster_proto::management as pb;
use cluster_proto::management::management_service_client::ManagementServiceClient;
use cluster_proto::pki::Role;
use cluster_proto::vms as vpb;
use cluster_tests::browser::{screenshot_dir, spki_pin, Browser};
use cluster_tests::pki::{endpoint_as, pki};
use cluster_tests::vm::guest_spec;
use cluster_tests::wait::Wait;
use cluster_tests::{free_port, node_ip, Cluster, WAIT};
use serde_json::Value;

/// The live migration below is held to this rate so its progress is seen mid-way on any
/// machine: its first round alone (every page of 96 MiB) takes 12 s.
const MIGRATION_BYTES_PER_S: u64 = 8 << 20;

/// Waits until `js` (run in the page) returns a value `cond` accepts; returns it.
fn wait_page(b: &Browser, what: &str, js: &str, cond: impl FnMut(&Value) -> bool) -> Value {
    let t0 = std::time::Instant::now();
    let v = Wait::new(WAIT)
        .until_blocking(what, || b.script(js), cond)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("waited {:?} for {what}", t0.elapsed());
    v
}

/// `fetch(path)` from the page with `init` (a JS object literal): `[status, body]`.
fn fetch(b: &Browser, path: &str, init: &str) -> (u64, Value) {
    let js = format!(
        "fetch({path:?}, {init}).then(async r => done([r.status, await r.json()]))\
         .catch(e => done([0, String(e)]));"
    );
    let v = b
        .script_async(&js)
        .unwrap_or_else(|e| panic!("fetch {path}: {e}"));
    (v[0].as_u64().unwrap_or(0), v[1].clone())
}

/// A POST from the page with the session's CSRF token (read from `/api/session`).
fn post(b: &Browser, path: &str, body: &str) -> (u64, Value) {
    let js = format!(
        "fetch('/api/session').then(r => r.json()).then(s => fetch({path:?}, {{method: 'POST', \
         headers: {{'content-type': 'application/json', 'x-csrf-token': s.csrf}}, body: {body:?}}}))\
         .then(async r => done([r.status, await r.json()])).catch(e => done([0, String(e)]));"
    );
    let v = b
        .script_async(&js)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (v[0].as_u64().unwrap_or(0), v[1].clone())
}

async fn login_url(addr: SocketAddr, who: Option<&cluster_proto::pki::TlsMaterial>) -> String {
    let mut m = ManagementServiceClient::new(
        endpoint_as(addr, who)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}")),
    );
    m.console_login(pb::ConsoleLoginRequest {})
        .await
        .unwrap_or_else(|e| panic!("console login: {e}"))
        .into_inner()
        .url
}

fn show_tab(b: &Browser, tab: &str) {
    if let Err(e) = b.script(&format!("location.hash = '{tab}'; return true;")) {
        panic!("show tab {tab}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_the_cluster_live_and_enforces_roles() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let mut console = BTreeMap::new();
    for id in 1..=3 {
        let a = cl.check(free_port(node_ip(1, id)));
        let added = cl.add_node_with(id, &format!("console_addr = \"{a}\"\n"));
        cl.check(added);
        console.insert(id, a);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let boot = vpb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Mem as i32,
        wss_mib: 8,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    let web = cl.create_running(1, guest_spec("web", 96, boot)).await;

    let pins: Vec<String> = (1..=3)
        .map(|id| spki_pin(&cl.check(cl.spec(id)).tls_dir.join("cert.pem")))
        .collect();
    let b = Browser::start(&pins);
    let docs = screenshot_dir(cl.dir());

    // An admin logs in to node 1's console with the link the gRPC API gives.
    let admin = pki()
        .admin()
        .load()
        .unwrap_or_else(|e| panic!("admin: {e}"));
    let url = login_url(cl.check(cl.spec(1)).mgmt_addr, Some(&admin)).await;
    let base = format!("https://{}", console[&1]);
    assert!(url.starts_with(&format!("{base}/login?token=")), "{url}");
    b.goto(&url);
    wait_page(
        &b,
        "the overview lists the three nodes, live",
        "return [document.querySelectorAll('#nodes-table tbody tr').length, \
         document.getElementById('live').textContent, document.getElementById('user').textContent];",
        |v| v[0] == 3 && v[1] == "live",
    );
    let user = b.script("return document.getElementById('user').textContent;");
    assert!(
        user.as_ref()
            .is_ok_and(|u| u.as_str().is_some_and(|u| u.contains("(admin)"))),
        "{user:?}"
    );
    b.screenshot(&docs.join("console-overview.png"));
    // The link was good once.
    b.goto(&url);
    let (status, _) = fetch(&b, "/api/session", "{}");
    assert_eq!(status, 200, "the session from the first use still works");
    let used = b.script("return document.getElementById('login-message').textContent;");
    assert!(
        used.as_ref()
            .is_ok_and(|m| m.as_str().is_some_and(|m| m.contains("already used"))),
        "{used:?}"
    );
    b.goto(&format!("{base}/"));

    // The VM, with its owner and state.
    show_tab(&b, "vms");
    let owner = cl
        .nodes(1)
        .await
        .map(|ns| ns.into_iter().find(|n| n.node_id == web.owner_id))
        .ok()
        .flatten()
        .map(|n| n.name)
        .unwrap_or_else(|| panic!("owner {} of web is not listed", web.owner_id));
    wait_page(
        &b,
        "the VM row shows web running on its owner",
        "const r = document.querySelector('tr[data-vm=\"web\"]'); \
         return r ? [r.cells[1].textContent, r.cells[2].textContent] : null;",
        |v| v[0].as_str().is_some_and(|s| s.starts_with("running")) && v[1] == owner.as_str(),
    );
    b.screenshot(&docs.join("console-vms.png"));

    // A live migration (started over gRPC, held to a rate): its bar moves, then is done.
    let target = if web.owner_id == 2 { 3 } else { 2 };
    let mut vms = cl.vms(1).await;
    vms.migrate_vm(vpb::MigrateVmRequest {
        name: "web".into(),
        to_node_id: target,
        bandwidth_bytes_per_s_max: Some(MIGRATION_BYTES_PER_S),
        no_queue: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let mig = cl.running_migration(1, "web", WAIT).await;
    show_tab(&b, "migrations");
    let bar = format!(
        "const p = document.getElementById('progress-{}'); return p ? p.value : null;",
        mig.id
    );
    let first = wait_page(&b, "the progress bar part-way", &bar, |v| {
        v.as_f64().is_some_and(|x| x > 0.0 && x < 1.0)
    });
    let first = first.as_f64().unwrap_or(0.0);
    wait_page(&b, "the progress bar further on", &bar, |v| {
        v.as_f64().is_some_and(|x| x > first)
    });
    b.screenshot(&docs.join("console-migrations.png"));
    wait_page(
        &b,
        "the migration done: full bar, succeeded",
        &format!(
            "const t = document.getElementById('progress-text-{id}'); \
             return [document.getElementById('progress-{id}').value, t.textContent];",
            id = mig.id
        ),
        |v| v[0] == 1 && v[1].as_str().is_some_and(|t| t.starts_with("succeeded")),
    );

    // Refusals as the admin: bad input (400, naming the field), no CSRF token (403), no
    // session (401), an unknown route (404).
    for (path, payload, code, needle) in [
        (
            "/api/vms/web/migrate",
            "{\"to_node\": 2}",
            400,
            "unknown field `to_node`",
        ),
        (
            "/api/vms/web/migrate",
            "{\"dry_run\": \"yes\"}",
            400,
            "invalid type",
        ),
        (
            "/api/vms/web/migrate",
            "{\"to_node_id\": -1}",
            400,
            "invalid value",
        ),
        ("/api/vms/web/stop", "not json", 400, "not valid"),
        (
            "/api/vms/web/reboot",
            "{}",
            404,
            "unknown VM action \"reboot\"",
        ),
        ("/api/vms/nosuch/stop", "{}", 404, "nosuch"),
        (
            "/api/nodes/zero/drain",
            "{}",
            400,
            "node id \"zero\" is not a positive number",
        ),
        ("/api/nodes/0/drain", "{}", 400, "node id \"0\""),
        (
            "/api/nodes/99999999999999999999/drain",
            "{}",
            400,
            "not a positive number",
        ),
        ("/api/nodes/1/explode", "{}", 404, "unknown node action"),
        ("/api/migrations/x/cancel", "{}", 400, "migration id \"x\""),
    ] {
        let (status, body) = post(&b, path, payload);
        assert_eq!(status, code, "{path} {payload}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{path} {payload}: {body} lacks {needle:?}"
        );
    }
    let (status, body) = fetch(&b, "/api/vms/web/stop", "{method: 'POST', body: '{}'}");
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("x-csrf-token")),
        "{body}"
    );
    let (status, body) = fetch(&b, "/api/overview", "{credentials: 'omit'}");
    assert_eq!(status, 401, "{body}");
    let (status, _) = fetch(&b, "/api/nope", "{}");
    assert_eq!(status, 404);
    let (status, body) = fetch(&b, "/api/vms/web/stop", "{}");
    assert_eq!(status, 405, "{body}");
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(20_000));
    let (status, body) = post(&b, "/api/vms/web/stop", &big);
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("too large")),
        "{body}"
    );
    // The session cookie is HttpOnly: the page's scripts cannot read it.
    let cookies = b.script("return document.cookie;");
    assert!(
        cookies
            .as_ref()
            .is_ok_and(|c| !c.as_str().unwrap_or("?").contains("vmcluster_console")),
        "{cookies:?}"
    );

    // Live streams are capped per agent: opening more than the cap (the page holds one)
    // is refused with 503 and the reason; once they close, a new one opens.
    let js = "(async () => { const ctrls = [], statuses = []; \
        for (let i = 0; i < 20; i++) { const c = new AbortController(); ctrls.push(c); \
          const r = await fetch('/api/stream', {signal: c.signal}); statuses.push(r.status); \
          if (r.status === 503) { const e = (await r.json()).error; ctrls.forEach(c => c.abort()); \
            done([statuses, e]); return; } } \
        ctrls.forEach(c => c.abort()); done([statuses, null]); })();";
    let v = b
        .script_async(js)
        .unwrap_or_else(|e| panic!("open streams: {e}"));
    let statuses: Vec<u64> = v[0]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let opened = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(statuses.last(), Some(&503), "{v}");
    assert!((1..=15).contains(&opened), "{v}");
    assert!(
        v[1].as_str()
            .is_some_and(|e| e.contains("16 live console streams")),
        "{v}"
    );
    Wait::new(WAIT)
        .until_blocking(
            "a stream opens again once the others closed",
            || {
                b.script_async(
                    "const c = new AbortController(); fetch('/api/stream', {signal: c.signal})\
                     .then(r => { c.abort(); done(r.status); }).catch(e => done(String(e)));",
                )
            },
            |v| v == 200,
        )
        .unwrap_or_else(|e| panic!("{e}"));

    // A drain from the page, previewed (dry run) then confirmed: a job whose timeline
    // shows the VM's move done.
    show_tab(&b, "overview");
    let drain = format!("tr[data-node=\"{target}\"] button[data-action=\"drain\"]");
    b.click(&drain)
        .unwrap_or_else(|e| panic!("click drain: {e}"));
    b.click("#confirm-preview-button")
        .unwrap_or_else(|e| panic!("click preview: {e}"));
    wait_page(
        &b,
        "the drain preview names the VM",
        "return document.getElementById('confirm-preview').textContent;",
        |v| v.as_str().is_some_and(|t| t.starts_with("web: ")),
    );
    b.click("#confirm-ok")
        .unwrap_or_else(|e| panic!("confirm drain: {e}"));
    show_tab(&b, "jobs");
    wait_page(
        &b,
        "the drain job's timeline: web moved, job done",
        "const j = document.querySelector('.job'); return j ? j.textContent : '';",
        |v| {
            v.as_str().is_some_and(|t| {
                t.contains("drain") && t.contains("web") && t.matches("done").count() >= 2
            })
        },
    );
    b.screenshot(&docs.join("console-jobs.png"));
    let moved = cl.wait_settled(1, "web").await;
    assert_ne!(moved.owner_id, target, "the drain moved web away");

    // A migration from the page's dialog: the target picked, previewed, confirmed.
    let to = 6 - moved.owner_id - target; // neither its owner nor the paused node
    show_tab(&b, "vms");
    let migrate = "tr[data-vm=\"web\"] button[data-action=\"migrate\"]";
    wait_page(
        &b,
        "the Migrate button of web",
        &format!(
            "const x = document.querySelector('{migrate}'); return !!x && x.offsetParent !== null;"
        ),
        |v| v == true,
    );
    b.click(migrate)
        .unwrap_or_else(|e| panic!("click migrate: {e}"));
    b.script(&format!(
        "document.getElementById('migrate-target').value = '{to}'; return true;"
    ))
    .unwrap_or_else(|e| panic!("pick the target: {e}"));
    b.click("#confirm-preview-button")
        .unwrap_or_else(|e| panic!("click preview: {e}"));
    wait_page(
        &b,
        "the migration preview names the target",
        "return document.getElementById('confirm-preview').textContent;",
        |v| {
            v.as_str()
                .is_some_and(|t| t.starts_with(&format!("would move to node-{to}")))
        },
    );
    b.click("#confirm-ok")
        .unwrap_or_else(|e| panic!("confirm migrate: {e}"));
    cl.wait_vm(1, "web", "migrated from the console", |v| {
        v.owner_id == to && v.runtime().name() == "running" && v.migrating_to == 0
    })
    .await;

    // A confirmed action from the page: stop the VM.
    show_tab(&b, "vms");
    wait_page(
        &b,
        "the Stop button of web",
        "const x = document.querySelector('tr[data-vm=\"web\"] button[data-action=\"stop\"]'); \
         return !!x && x.offsetParent !== null;",
        |v| v == true,
    );
    // The table is re-rendered as updates arrive: a click can land on a row being replaced
    // and be lost. Clicked (again, at most every 2 s) from the page until the dialog opens.
    wait_page(
        &b,
        "the confirmation dialog",
        "const d = document.getElementById('confirm'); \
         if (!d.open && Date.now() - (window.__stopClicked || 0) > 2000) { \
           const x = document.querySelector('tr[data-vm=\"web\"] button[data-action=\"stop\"]'); \
           if (x) { window.__stopClicked = Date.now(); x.click(); } \
         } \
         return d.open;",
        |v| v == true,
    );
    b.screenshot(&docs.join("console-confirm.png"));
    b.click("#confirm-ok")
        .unwrap_or_else(|e| panic!("confirm: {e}"));
    cl.wait_vm(1, "web", "stopped from the console", |v| {
        v.desired().name() == "stopped" && v.runtime().name() == "stopped"
    })
    .await;

    // A viewer on node 2: reads, but an action is 403 with the gRPC API's reason.
    let viewer = pki()
        .user("vera", Role::Viewer)
        .load()
        .unwrap_or_else(|e| panic!("viewer: {e}"));
    let url = login_url(cl.check(cl.spec(2)).mgmt_addr, Some(&viewer)).await;
    b.goto(&url);
    wait_page(
        &b,
        "the viewer's overview",
        "return [document.querySelectorAll('#nodes-table tbody tr').length, \
         document.getElementById('user').textContent];",
        |v| v[0] == 3 && v[1].as_str().is_some_and(|u| u.contains("vera (viewer)")),
    );
    let cancel = format!("/api/migrations/{}/cancel", mig.id);
    for (path, payload, method) in [
        ("/api/vms/web/start", "{}", "StartVm"),
        ("/api/vms/web/stop", "{}", "StopVm"),
        ("/api/vms/web/migrate", "{\"to_node_id\": 3}", "MigrateVm"),
        ("/api/nodes/3/drain", "{}", "DrainNode"),
        ("/api/nodes/3/drain", "{\"dry_run\": true}", "DrainNode"),
        ("/api/nodes/3/abort-drain", "{}", "AbortDrain"),
        ("/api/nodes/3/resume", "{\"failback\": true}", "ResumeNode"),
        (cancel.as_str(), "{}", "CancelMigration"),
    ] {
        let (status, body) = post(&b, path, payload);
        assert_eq!(status, 403, "{path} {payload}: {body}");
        let needle = format!("user \"vera\" has role viewer; {method} needs role admin");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(&needle)),
            "{path}: {body} lacks {needle:?}"
        );
    }
    // A migration preview is a read (PlanMigration): allowed (a drain preview is not:
    // DrainNode, dry run or not, needs admin over gRPC too).
    let (status, body) = post(&b, "/api/vms/web/migrate", "{\"dry_run\": true}");
    assert_eq!(status, 200, "{body}");
    assert!(body["plan"]["vm"] == "web", "{body}");
    cl.wait_vm(1, "web", "still stopped", |v| {
        v.desired().name() == "stopped"
    })
    .await;
    show_tab(&b, "events");
    b.screenshot(&docs.join("console-events.png"));

    // Revoking the viewer ends the session on the next request.
    let mut m = cl.client(1).await.unwrap_or_else(|e| panic!("{e}"));
    m.revoke_certificate(pb::RevokeCertificateRequest {
        user_name: "vera".into(),
        cert_pem: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("revoke: {e}"));
    Wait::new(WAIT)
        .until_blocking(
            "the revoked viewer refused",
            || Ok::<_, String>(fetch(&b, "/api/overview", "{}")),
            |(s, _)| *s == 401,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = fetch(&b, "/api/session", "{}");
    assert_eq!(status, 401, "{body}");

    // The admin logs out of node 1's console: that session is gone.
    b.goto(&format!("{base}/"));
    wait_page(
        &b,
        "the admin's page, live",
        "return document.getElementById('live').textContent;",
        |v| v == "live",
    );
    b.click("#logout")
        .unwrap_or_else(|e| panic!("log out: {e}"));
    wait_page(
        &b,
        "the login page after logging out",
        "const m = document.getElementById('login-message'); return m ? m.textContent : '';",
        |v| v.as_str().is_some_and(|m| m.contains("no console session")),
    );
    let (status, body) = fetch(&b, "/api/overview", "{}");
    assert_eq!(status, 401, "{body}");
}
