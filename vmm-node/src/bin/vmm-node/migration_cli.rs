//! Migration commands of the `vmm-node` debug binary: the `receive` subcommand and the
//! control-socket extension. Part of the binary, not of the library: only this front end
//! and the tests that drive it speak this JSON.
//!
//! Control commands (JSON lines, see `vmm_node::control`):
//! | cmd | fields | result |
//! |---|---|---|
//! | `migrate` | `addr`, `max_downtime_ms`, `deadline_ms`, `connections`, `throttle`, `bandwidth_bytes_per_s_max`, `ticket`, `precopy_nice`, `verify_nice`, `vcpu_boost` (all but `addr` optional; no cap or 0: unlimited; `ticket`: a string the target's authorizer checks; the two nice values: of the pre-copy send threads (default: this process's priority) and of the after-switchover re-hash (default 19), never above this process's priority; `vcpu_boost`: the vCPUs at this process's priority until the pause, default true) | `stats` (see [`MigrationStats`]), `console` (guest output up to the switchover); the source VM is destroyed shortly after the reply. With `"cancel": true`: cancels the running migration. |
//! | `migrate-status` | | `state` (`idle`/`running`/`succeeded`/`failed`), `phase`, `progress`, `prediction`, `throttle_percent`, `events` (last 64), `error` |
//! | `migrate-cancel` | | cancels a running migration (the VM keeps running here) |
//! | `quick-migrate` | `dir` | `save` figures, `console`; the VM is saved paused into `dir` and destroyed shortly after; restore with `vmm-node restore --snapshot DIR` |

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use vmm_node::control::{error_response, Extension};
use vmm_node::migration::adapter::{local_facts, LocalFactory, LocalSource};
use vmm_node::migration::convergence::ConvergenceConfig;
use vmm_node::migration::seam::{NoHandoff, NodeFacts};
use vmm_node::migration::source::{migrate, CancelToken, MigrateOptions, MigrationEvent};
use vmm_node::migration::stats::MigrationStats;
use vmm_node::migration::target::{serve, FailAction, Failpoint, ReceiveOptions};
use vmm_node::migration::tls::{AllowAll, MigrationTls, Transport};
use vmm_node::migration::MigrationError;
use vmm_node::{Vm, VmStatus};

/// Line printed on stdout once the receive listener is bound.
pub const LISTEN_LINE_PREFIX: &str = "MIGRATION-LISTEN ";
/// Grace period between a successful migration's reply and destroying the source VM, so
/// the reply reaches the client before the process exits.
pub const DESTROY_GRACE: Duration = Duration::from_millis(300);
const EVENTS_MAX: usize = 64;
const CONSOLE_REPLY_BYTES_MAX: usize = 1 << 20;

/// How this process's migrations (in and out) are carried: mutual TLS with the cluster
/// CA, or plaintext only when asked for explicitly.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) the peer's certificate must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM, leaf first; IP SAN of its migration address).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Migrate without encryption or peer authentication (an isolated network only).
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// The transport the flags ask for; `None` when neither TLS nor plaintext was given.
    pub fn transport(&self) -> anyhow::Result<Option<Transport>> {
        use anyhow::Context;
        if self.insecure_plaintext {
            tracing::warn!("migrations of this process are plaintext and unauthenticated");
            return Ok(Some(Transport::Plaintext));
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return Ok(None);
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = MigrationTls::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
            .context("building the migration TLS configuration")?;
        Ok(Some(Transport::Tls(tls)))
    }
}

/// `vmm-node receive` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiveArgs {
    /// Migration address to listen on (port 0 picks one; the bound address is printed as
    /// `MIGRATION-LISTEN ADDR` on stdout).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Pretend this node has another CPU vendor (tests of the compatibility check).
    #[arg(long)]
    pub fake_cpu_vendor: Option<String>,
    /// Pretend this node has only this much memory available.
    #[arg(long)]
    pub fake_memory_available_mib: Option<u64>,
    /// Die (abort) at this phase: setup, precopy, stopcopy, before-resume.
    #[arg(long, env = "VMM_NODE_MIGRATION_FAILPOINT")]
    pub failpoint: Option<String>,
    /// How long to wait for the source at any step.
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
    /// TAP device of the received VM's NIC i on this host (repeat, in NIC order; default:
    /// the source's names).
    #[arg(long = "nic-tap")]
    pub nic_taps: Vec<String>,
    /// Leave the received VM's vCPU threads at their own priority right after the resume
    /// (default: this process's priority for the first 100 ms).
    #[arg(long)]
    pub no_vcpu_boost: bool,
}

/// Waits for an incoming migration and returns the VM running here. Any source with a
/// certificate of the CA (or anyone, over plaintext) may send a VM: this debugging tool
/// has no cluster state to check tickets against.
pub fn receive_vm(args: &ReceiveArgs, transport: Transport) -> Result<Arc<Vm>, MigrationError> {
    let failpoint = match &args.failpoint {
        Some(s) => Some((s.parse::<Failpoint>()?, FailAction::Abort)),
        None => None,
    };
    let facts_override =
        if args.fake_cpu_vendor.is_some() || args.fake_memory_available_mib.is_some() {
            let f = local_facts();
            Some(NodeFacts {
                cpu_vendor: args.fake_cpu_vendor.clone().unwrap_or(f.cpu_vendor),
                memory_available_bytes: args
                    .fake_memory_available_mib
                    .map_or(f.memory_available_bytes, |m| m << 20),
                cpu_features: f.cpu_features,
            })
        } else {
            None
        };
    let opts = ReceiveOptions {
        facts_override,
        failpoint,
        io_timeout: Duration::from_millis(args.io_timeout_ms),
        vcpu_boost: !args.no_vcpu_boost,
        ..ReceiveOptions::new(transport, Arc::new(AllowAll))
    };
    let listener = TcpListener::bind(args.listen).map_err(MigrationError::Listen)?;
    let bound = listener.local_addr().map_err(MigrationError::Listen)?;
    let version = vmm_node::migration::protocol::PROTOCOL_VERSION;
    tracing::info!(%bound, version, "waiting for an incoming migration");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{LISTEN_LINE_PREFIX}{bound}");
        let _ = out.flush();
    }
    // The target's disk slots reopen the VM's raw image files on `restore_state`, after
    // the storage handoff (the cluster-agent passes its own opener for fenced disks).
    // Its NICs open this host's TAPs (`--nic-tap`) before the state arrives.
    let taps = args.nic_taps.clone();
    let factory = LocalFactory::with_disk_slots(Arc::new(|vm: &Vm| {
        vmm_node::devices::virtio::install_virtio_slots(
            vm,
            vmm_node::devices::virtio::raw_file_opener(),
            false,
        )?;
        vmm_node::devices::virtio::net::install_virtio_nics(vm)?;
        Ok(())
    }))
    .with_config_hook(Arc::new(move |c: &mut vmm_node::VmConfig| {
        c.set_nic_taps(&taps)?;
        Ok(())
    }));
    let received = serve(&listener, &factory, &NoHandoff, &opts)?;
    let vm = factory.last_vm().ok_or(MigrationError::InvalidOptions(
        "the received VM vanished".into(),
    ))?;
    drop(received);
    Ok(vm)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    #[allow(dead_code)]
    cmd: String,
    #[serde(default)]
    addr: Option<SocketAddr>,
    #[serde(default)]
    max_downtime_ms: Option<u64>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    connections: Option<usize>,
    #[serde(default)]
    throttle: Option<bool>,
    #[serde(default)]
    bandwidth_bytes_per_s_max: Option<u64>,
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    precopy_nice: Option<i32>,
    #[serde(default)]
    verify_nice: Option<i32>,
    #[serde(default)]
    vcpu_boost: Option<bool>,
    #[serde(default)]
    cancel: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickRequest {
    #[allow(dead_code)]
    cmd: String,
    dir: PathBuf,
}

#[derive(Default)]
struct Status {
    state: &'static str,
    phase: &'static str,
    progress: Option<Value>,
    prediction: Option<Value>,
    throttle_percent: u8,
    events: VecDeque<Value>,
    error: Option<String>,
    cancel: Option<CancelToken>,
}

impl Status {
    fn push(&mut self, v: Value) {
        if self.events.len() == EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }
}

fn event_json(e: &MigrationEvent) -> Value {
    match e {
        MigrationEvent::Phase(p) => json!({"phase": p}),
        MigrationEvent::Prediction(p) => json!({"prediction": {
            "bandwidth_bytes_per_s": p.bandwidth_bytes_per_s,
            "dirty_rate_bytes_per_s": p.dirty_rate_bytes_per_s,
            "remaining_ms": p.remaining.map(|d| d.as_millis() as u64),
            "downtime_us": p.downtime.as_micros() as u64,
            "converges": p.converges,
        }}),
        MigrationEvent::Progress(p) => json!({"progress": p}),
        MigrationEvent::Throttle(t) => json!({"throttle_percent": t}),
    }
}

fn console_text(vm: &Vm) -> String {
    let log = vm.console().log();
    let n = log.len().min(CONSOLE_REPLY_BYTES_MAX);
    String::from_utf8_lossy(&log[log.len() - n..]).into_owned()
}

fn destroy_later(vm: &Arc<Vm>) {
    let vm = vm.clone();
    let _ = std::thread::Builder::new()
        .name("destroy-migrated".into())
        .spawn(move || {
            std::thread::sleep(DESTROY_GRACE);
            if let Err(e) = vm.stop() {
                tracing::error!(error = %e, "destroying the migrated-away VM");
            }
            tracing::info!("source vm destroyed after migration");
        });
}

/// The control-socket extension handling the migration commands; `transport` is how
/// outgoing migrations are carried (`None`: this process was started without TLS or
/// plaintext flags and refuses to migrate).
pub fn control_extension(transport: Option<Transport>) -> Extension {
    let st = Arc::new(Mutex::new(Status {
        state: "idle",
        ..Default::default()
    }));
    Arc::new(move |req: &Value, vm: &Arc<Vm>| {
        let cmd = req.get("cmd")?.as_str()?;
        match cmd {
            "migrate" => Some(handle_migrate(&st, req, vm, transport.as_ref())),
            "migrate-cancel" => Some(cancel(&st)),
            "migrate-status" => {
                let s = st.lock().unwrap_or_else(|e| e.into_inner());
                Some(json!({
                    "ok": true,
                    "state": s.state,
                    "phase": s.phase,
                    "progress": s.progress,
                    "prediction": s.prediction,
                    "throttle_percent": s.throttle_percent,
                    "events": s.events,
                    "error": s.error,
                }))
            }
            "quick-migrate" => Some(handle_quick(req, vm)),
            _ => None,
        }
    })
}

fn cancel(st: &Mutex<Status>) -> Value {
    let s = st.lock().unwrap_or_else(|e| e.into_inner());
    match &s.cancel {
        Some(c) if s.state == "running" => {
            c.cancel();
            json!({"ok": true})
        }
        _ => json!({"ok": false, "error": "no migration is running"}),
    }
}

fn handle_migrate(
    st: &Mutex<Status>,
    req: &Value,
    vm: &Arc<Vm>,
    transport: Option<&Transport>,
) -> Value {
    let r: MigrateRequest = match serde_json::from_value(req.clone()) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    if r.cancel {
        return cancel(st);
    }
    let Some(addr) = r.addr else {
        let e = "migrate needs \"addr\": the target's migration address";
        return json!({"ok": false, "error": e});
    };
    let Some(transport) = transport else {
        let e = "this process was started without --tls-ca/--tls-cert/--tls-key or \
                 --insecure-plaintext, so it cannot migrate";
        return json!({"ok": false, "error": e});
    };
    let defaults = ConvergenceConfig::default();
    let opts = MigrateOptions {
        ticket: r.ticket.map(String::into_bytes).unwrap_or_default(),
        connections: r
            .connections
            .unwrap_or(vmm_node::migration::DEFAULT_CONNECTIONS),
        bandwidth_bytes_per_s_max: r.bandwidth_bytes_per_s_max,
        convergence: ConvergenceConfig {
            max_downtime: r
                .max_downtime_ms
                .map_or(defaults.max_downtime, Duration::from_millis),
            deadline: r
                .deadline_ms
                .map_or(defaults.deadline, Duration::from_millis),
            throttle: r.throttle.unwrap_or(true),
        },
        ..MigrateOptions::new(transport.clone())
    };
    let opts = MigrateOptions {
        precopy_nice: r.precopy_nice.or(opts.precopy_nice),
        verify_nice: r.verify_nice.or(opts.verify_nice),
        vcpu_boost: r.vcpu_boost.unwrap_or(opts.vcpu_boost),
        ..opts
    };
    if let Err(e) = opts.validate() {
        return error_response(&e);
    }
    if !matches!(vm.status(), VmStatus::Running) {
        let e = format!(
            "the VM is {:?}; only a running VM can be migrated",
            vm.status()
        );
        return json!({"ok": false, "error": e});
    }
    let token = CancelToken::default();
    {
        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
        if s.state == "running" {
            return json!({"ok": false, "error": "a migration of this VM is already running"});
        }
        *s = Status {
            state: "running",
            phase: "setup",
            cancel: Some(token.clone()),
            ..Default::default()
        };
    }
    let source = LocalSource::new(vm.clone());
    let result = migrate(&source, addr, &opts, &NoHandoff, &token, &mut |e| {
        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            MigrationEvent::Phase(p) => s.phase = p,
            MigrationEvent::Progress(p) => s.progress = Some(json!(p)),
            MigrationEvent::Prediction(_) => {
                s.prediction = event_json(e).get("prediction").cloned()
            }
            MigrationEvent::Throttle(t) => s.throttle_percent = *t,
        }
        s.push(event_json(e));
    });
    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
    s.cancel = None;
    match result {
        Ok(stats) => {
            s.state = "succeeded";
            drop(s);
            let console = console_text(vm);
            destroy_later(vm);
            json!({"ok": true, "stats": stats_json(&stats), "console": console})
        }
        Err(e) => {
            s.state = "failed";
            let resp = error_response(&e);
            s.error = resp["error"].as_str().map(str::to_owned);
            resp
        }
    }
}

fn stats_json(s: &MigrationStats) -> Value {
    let mut v = json!(s);
    v["receipt_matches"] = json!(s.receipt_matches());
    v
}

fn handle_quick(req: &Value, vm: &Arc<Vm>) -> Value {
    let r: QuickRequest = match serde_json::from_value(req.clone()) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    match vmm_node::migration::quick::save(vm, &r.dir) {
        Ok(stats) => {
            let console = console_text(vm);
            destroy_later(vm);
            json!({"ok": true, "save": stats, "console": console})
        }
        Err(e) => {
            // The VM stays here: resume it if the save failed after pausing.
            let _ = vm.resume();
            error_response(&e)
        }
    }
}
