//! `clusterctl vm ...` and `clusterctl node why-not`: the VM lifecycle API
//! (`cluster.vms.v1.VmService`). Tables by default, `-o json` for scripts.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use cluster_proto::times;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_proto::EnumName;
use serde::Serialize;

use crate::client::{call, service, status_error, CtlError};
use crate::output::{dur_ms, json, table};
use crate::{Cli, Format};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Define a VM (and start it on the node the scheduler picks unless --no-start).
    #[command(after_help = "\
Examples:
  clusterctl vm create web1 --vcpus 2 --memory-mib 128 --workload mem
  clusterctl vm create db1 --memory-mib 64 --disk vol/vms/db1.img --preferred-owner 2
  clusterctl vm create web3 --nic lan --nic dmz,mac=52:54:00:12:34:56")]
    Create(Box<CreateArgs>),
    /// Start a stopped VM on the node the scheduler picks.
    Start { name: String },
    /// Stop a VM (its owner stops it and reports Stopped).
    Stop { name: String },
    /// Delete a stopped VM.
    Delete { name: String },
    /// All VMs.
    List,
    /// One VM in detail.
    Show { name: String },
    /// Live-migrate a running VM (target chosen by the scheduler unless --to).
    #[command(after_help = "\
Examples:
  clusterctl vm migrate web1 --dry-run                 # target, go/no-go, predicted time
  clusterctl vm migrate web1 --to node-2               # by name or id; waits, with a progress bar
  clusterctl vm migrate web1 --to 2 --max-downtime 50ms --deadline 2m --max-bandwidth 200
  clusterctl vm migrate db1 --quick                    # save to the shared volume, restore there
  clusterctl vm migrate web2 --to 2 --no-wait          # return at once (queued or started)

Exit 5 when the migration waited for fails or is cancelled.")]
    Migrate {
        name: String,
        /// Target node: its id or its name.
        #[arg(long)]
        to: Option<crate::nodes::NodeArg>,
        /// Do not wait for the migration to end.
        #[arg(long)]
        no_wait: bool,
        /// Print the target, the go/no-go and the prediction; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Quick migration: save to the shared volume, restore on the target.
        #[arg(long)]
        quick: bool,
        /// Longest acceptable blackout, e.g. 50ms or 1s (default 300ms; a bare number is
        /// milliseconds).
        #[arg(long, value_name = "DURATION", value_parser = crate::duration::bare_ms)]
        max_downtime: Option<Duration>,
        /// Give up and roll back when not converged within this, e.g. 2m (default 120s; a
        /// bare number is seconds).
        #[arg(long, value_name = "DURATION", value_parser = crate::duration::bare_s)]
        deadline: Option<Duration>,
        /// Most MiB/s the live migration may send over the migration network (default
        /// and 0: unlimited).
        #[arg(long, value_name = "MIB_PER_S", value_parser = parse_mib_per_s)]
        max_bandwidth: Option<u64>,
        /// No progress bar on stderr.
        #[arg(long)]
        no_progress: bool,
        /// Refuse instead of queueing when a migration slot of the source or target is
        /// busy (one live migration per node at a time).
        #[arg(long)]
        no_queue: bool,
    },
    /// The VM's serial console, from whichever node runs it.
    Console {
        name: String,
        /// Keep printing live lines until interrupted (or --max-lines).
        #[arg(long, short = 'f')]
        follow: bool,
        /// With --follow: stop after this many live lines (0: never).
        #[arg(long, default_value_t = 0)]
        max_lines: u64,
    },
    /// Hot add / remove of shared-volume disks.
    #[command(subcommand)]
    Disk(crate::disk::VmDiskCmd),
    /// Hot add / remove of NICs (only guests that poll their NIC slots see a change while
    /// running; a Linux guest sees NICs present at its boot).
    #[command(subcommand)]
    Nic(VmNicCmd),
}

/// `clusterctl vm nic ...`.
#[derive(Debug, Subcommand)]
pub enum VmNicCmd {
    /// Add a NIC on a network (`NET[,mac=aa:bb:cc:dd:ee:ff][,mtu=9000]`; the MAC is
    /// generated when not given, the MTU is 1500 when not given) in the VM's lowest free
    /// NIC slot.
    Attach {
        name: String,
        #[arg(value_parser = parse_nic)]
        nic: NicArg,
    },
    /// Remove the NIC with this MAC.
    Detach { name: String, mac: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u64,
    /// Test guest workload: idle, dirty, mem, disk or net (ignored with --kernel).
    #[arg(long, default_value = "mem", value_parser = ["idle", "dirty", "mem", "disk", "net"])]
    pub workload: String,
    /// Test guest working set in MiB (0: guest default).
    #[arg(long, default_value_t = 0)]
    pub wss_mib: u64,
    /// Test guest heartbeat period in ms (0: guest default).
    #[arg(long, default_value_t = 0)]
    pub hb_ms: u64,
    /// Boot this kernel instead of the test guest.
    #[arg(long)]
    pub kernel: Option<String>,
    #[arg(long, default_value = "")]
    pub cmdline: String,
    #[arg(long, default_value = "")]
    pub initrd: String,
    /// Disk on a shared volume (volume/dir/disk.img); repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Read-only disk on a shared volume (shared lock; other VMs may read it too); repeatable.
    #[arg(long = "disk-ro")]
    pub disks_ro: Vec<String>,
    /// high, medium, low or none.
    #[arg(long, default_value = "medium", value_parser = ["high", "medium", "low", "none"])]
    pub restart_priority: String,
    /// When the VM fails while running (its worker died, a vCPU failed, the guest reset):
    /// `on-failure` restarts it on its node, `never` leaves it failed.
    #[arg(long, default_value = "on-failure", value_parser = ["on-failure", "never"])]
    pub restart_policy: String,
    /// Restarts allowed within --restart-window before the VM is left failed (a crash
    /// loop); 1..=100.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_restarts: u32,
    /// The crash-loop window (e.g. 10m, 1h; a bare number counts in seconds).
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = crate::duration::bare_s)]
    pub restart_window: std::time::Duration,
    /// Anti-affinity class; repeatable.
    #[arg(long = "anti-affinity")]
    pub anti_affinity: Vec<String>,
    /// Preferred owner node (id or name), most preferred first; repeatable.
    #[arg(long = "preferred-owner")]
    pub preferred_owners: Vec<crate::nodes::NodeArg>,
    /// NIC on a network the nodes map to a bridge: `NET[,mac=52:54:00:12:34:56][,mtu=9000]`
    /// (without a MAC the cluster generates one; MTU 68..=9000, default 1500); repeatable,
    /// NIC i in slot i.
    #[arg(long = "nic", value_parser = parse_nic)]
    pub nics: Vec<NicArg>,
    /// Test guest `net` workload: its IPv4 address on the first NIC.
    #[arg(long)]
    pub net_ip: Option<std::net::Ipv4Addr>,
    /// Only define the VM.
    #[arg(long)]
    pub no_start: bool,
}

/// `on_failure (3 in 10m)`, `never`, or empty for a spec without one.
fn restart_policy_text(p: Option<&pb::RestartPolicy>) -> String {
    let Some(p) = p else { return String::new() };
    match p.mode() {
        pb::RestartMode::Never => "never".into(),
        mode => {
            let window = p.window.as_ref().map_or(String::new(), |w| {
                let d = std::time::Duration::from_secs(u64::try_from(w.seconds).unwrap_or(0));
                format!(" in {}", humantime::format_duration(d))
            });
            let name = match mode {
                pb::RestartMode::Unspecified => "on_failure",
                m => m.name(),
            };
            format!("{name} ({}{window})", p.max_restarts)
        }
    }
}

/// A `--nic NET[,mac=..][,mtu=..]` argument.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicArg {
    pub network: String,
    pub mac: String,
    /// `None`: the default (1500).
    pub mtu: Option<u32>,
}

/// Parses `NET[,mac=aa:bb:cc:dd:ee:ff][,mtu=N]` (the agent validates the network, the MAC
/// and the MTU's range).
pub fn parse_nic(s: &str) -> Result<NicArg, String> {
    let mut parts = s.split(',');
    let network = parts.next().unwrap_or_default().trim().to_owned();
    if network.is_empty() {
        return Err(format!(
            "{s:?}: give a network name first, e.g. lan, lan,mac=52:54:00:12:34:56 or lan,mtu=9000"
        ));
    }
    let mut mac = String::new();
    let mut mtu = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) if mac.is_empty() => mac = m.trim().to_owned(),
            Some(("mtu", m)) if mtu.is_none() => {
                mtu = Some(m.trim().parse::<u32>().map_err(|_| {
                    format!("{s:?}: mtu={m} is not a number (68..=9000, e.g. mtu=9000)")
                })?)
            }
            _ => {
                return Err(format!(
                    "{s:?}: after the network only mac=aa:bb:cc:dd:ee:ff and mtu=N are accepted (once each), got {p:?}"
                ))
            }
        }
    }
    Ok(NicArg { network, mac, mtu })
}

/// How long `vm console --follow` retries while the VM is between owners.
const CONSOLE_REOPEN_MAX: Duration = Duration::from_secs(60);

/// Longest `vm migrate` waits for the migration to end.
const MIGRATE_WAIT_MAX: Duration = Duration::from_secs(300);

fn spec_of(a: &CreateArgs) -> pb::VmSpec {
    let boot = match &a.kernel {
        Some(k) => pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: k.clone(),
            cmdline: a.cmdline.clone(),
            initrd: a.initrd.clone(),
        }),
        None => pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
            workload: pb::Workload::from_name(&a.workload).map_or(0, |w| w as i32),
            wss_mib: a.wss_mib,
            heartbeat_interval: (a.hb_ms != 0)
                .then(|| crate::duration::pb(Duration::from_millis(a.hb_ms))),
            net_ip: a.net_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            ..Default::default()
        }),
    };
    pb::VmSpec {
        name: a.name.clone(),
        vcpus: a.vcpus,
        memory_mib: a.memory_mib,
        boot: Some(boot),
        disks: a
            .disks
            .iter()
            .map(|d| pb::DiskSpec {
                name: d.clone(),
                read_only: false,
            })
            .chain(a.disks_ro.iter().map(|d| pb::DiskSpec {
                name: d.clone(),
                read_only: true,
            }))
            .collect(),
        restart_priority: pb::RestartPriority::from_name(&a.restart_priority)
            .map_or(0, |p| p as i32),
        restart_policy: Some(pb::RestartPolicy {
            mode: pb::RestartMode::from_name(&a.restart_policy).map_or(0, |m| m as i32),
            max_restarts: a.max_restarts,
            window: Some(crate::duration::pb(a.restart_window)),
        }),
        anti_affinity: a.anti_affinity.clone(),
        // Names are resolved by the caller (`node_id` asks the cluster).
        preferred_owners: Vec::new(),
        nics: a
            .nics
            .iter()
            .map(|n| pb::NicSpec {
                network: n.network.clone(),
                mac: n.mac.clone(),
                slot: None,
                mtu: n.mtu,
            })
            .collect(),
    }
}

/// A VM as printed (`-o json` uses these field names).
#[derive(Debug, Serialize)]
pub struct VmView {
    pub id: u64,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: String,
    pub desired: String,
    pub runtime: String,
    pub owner_id: u64,
    pub owner_name: String,
    pub reason: String,
    pub generation: u64,
    pub restart_priority: String,
    /// `on_failure (3 in 10m)` or `never`.
    pub restart_policy: String,
    /// Automatic restarts after failures within the policy's window (RFC 3339, UTC).
    pub restarts: Vec<String>,
    pub anti_affinity: Vec<String>,
    pub preferred_owners: Vec<u64>,
    pub disks: Vec<String>,
    pub nics: Vec<NicView>,
    pub migrating_to: u64,
    /// Measured demand as its owner reported it; `null`: not measured (yet).
    pub demand: Option<DemandView>,
    /// RFC 3339 (UTC).
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A VM's measured demand as printed.
#[derive(Debug, Serialize)]
pub struct DemandView {
    /// vCPU run + runnable-wait time per second, smoothed (1000 = one busy vCPU).
    pub cpu_demand_millicores: u64,
    /// Of that, the time it ran.
    pub cpu_run_millicores: u64,
    /// Guest memory resident on the host.
    pub memory_touched_mib: u64,
}

/// Millicores as vCPUs, two decimals (`1.00`).
pub fn cpus(millicores: u64) -> String {
    format!("{}.{:02}", millicores / 1000, millicores % 1000 / 10)
}

/// One NIC as printed: its network, MAC, MTU and TAP device on the owner's node.
#[derive(Debug, Serialize)]
pub struct NicView {
    pub network: String,
    pub mac: String,
    /// The MTU in effect (1500 when the spec gives none).
    pub mtu: u32,
    pub tap: String,
}

pub fn view(v: &pb::VmInfo) -> VmView {
    let spec = v.spec.clone().unwrap_or_default();
    let boot = match &spec.boot {
        Some(pb::vm_spec::Boot::TestGuest(t)) => format!("test-guest {}", t.workload().name()),
        Some(pb::vm_spec::Boot::Kernel(k)) => format!("kernel {}", k.kernel),
        None => String::new(),
    };
    VmView {
        id: v.id,
        name: spec.name,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        boot,
        desired: v.desired().name().to_owned(),
        runtime: v.runtime().name().to_owned(),
        owner_id: v.owner_id,
        owner_name: v.owner_name.clone(),
        reason: v.reason.clone(),
        generation: v.generation,
        restart_priority: match pb::RestartPriority::try_from(spec.restart_priority) {
            Ok(pb::RestartPriority::Unspecified) | Err(_) => String::new(),
            Ok(p) => p.name().to_owned(),
        },
        restart_policy: restart_policy_text(spec.restart_policy.as_ref()),
        restarts: v
            .restarts
            .iter()
            .map(cluster_proto::times::rfc3339)
            .collect(),
        anti_affinity: spec.anti_affinity,
        preferred_owners: spec.preferred_owners,
        disks: spec.disks.into_iter().map(|d| d.name).collect(),
        nics: spec
            .nics
            .into_iter()
            .enumerate()
            .map(|(i, n)| NicView {
                network: n.network,
                mac: n.mac,
                mtu: n.mtu.unwrap_or(1500),
                tap: v.nic_taps.get(i).cloned().unwrap_or_default(),
            })
            .collect(),
        migrating_to: v.migrating_to,
        created_at: crate::output::time_text(&v.created_at),
        updated_at: crate::output::time_text(&v.updated_at),
        demand: v.demand.as_ref().map(|d| DemandView {
            cpu_demand_millicores: d.cpu_demand_millicores,
            cpu_run_millicores: d.cpu_run_millicores,
            memory_touched_mib: d.memory_touched_mib,
        }),
    }
}

fn owner(v: &VmView) -> String {
    match (v.owner_id, v.owner_name.as_str()) {
        (0, _) => "-".into(),
        (id, "") => id.to_string(),
        (id, n) => format!("{id} ({n})"),
    }
}

pub fn render_list(fmt: Format, vms: &[pb::VmInfo]) -> Result<String, CtlError> {
    let views: Vec<VmView> = vms.iter().map(view).collect();
    if fmt == Format::Json {
        return json(&views);
    }
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![
                v.name.clone(),
                v.runtime.clone(),
                v.desired.clone(),
                owner(v),
                v.vcpus.to_string(),
                v.memory_mib.to_string(),
            ];
            if wide {
                match &v.demand {
                    Some(d) => row.extend([
                        cpus(d.cpu_demand_millicores),
                        cpus(d.cpu_demand_millicores.saturating_sub(d.cpu_run_millicores)),
                        d.memory_touched_mib.to_string(),
                    ]),
                    None => row.extend(["-".into(), "-".into(), "-".into()]),
                }
                let list = |xs: Vec<String>| {
                    if xs.is_empty() {
                        "-".to_string()
                    } else {
                        xs.join(",")
                    }
                };
                row.extend([
                    if v.restart_priority.is_empty() {
                        "-".into()
                    } else {
                        v.restart_priority.clone()
                    },
                    list(v.disks.clone()),
                    list(
                        v.nics
                            .iter()
                            .map(|n| format!("{}/{}", n.network, n.mac))
                            .collect(),
                    ),
                    match v.migrating_to {
                        0 => "-".into(),
                        n => n.to_string(),
                    },
                ]);
            }
            row.extend([v.boot.clone(), v.reason.clone()]);
            row
        })
        .collect();
    let mut headers = vec!["NAME", "STATE", "DESIRED", "OWNER", "VCPUS", "MEMORY_MIB"];
    if wide {
        headers.extend([
            "CPU_DEMAND",
            "CPU_WAIT",
            "TOUCHED_MIB",
            "PRIORITY",
            "DISKS",
            "NICS",
            "MIGRATING_TO",
        ]);
    }
    headers.extend(["BOOT", "REASON"]);
    Ok(table(&headers, &rows))
}

pub fn render_one(fmt: Format, vm: Option<&pb::VmInfo>) -> Result<String, CtlError> {
    let Some(vm) = vm else {
        return Err(CtlError::Render("the agent answered without a VM".into()));
    };
    let v = view(vm);
    if fmt == Format::Json {
        return json(&v);
    }
    let list = |xs: &[String]| {
        if xs.is_empty() {
            "-".to_string()
        } else {
            xs.join(", ")
        }
    };
    let rows = vec![
        vec!["name".into(), v.name.clone()],
        vec!["id".into(), v.id.to_string()],
        vec!["state".into(), v.runtime.clone()],
        vec!["desired".into(), v.desired.clone()],
        vec!["owner".into(), owner(&v)],
        vec![
            "reason".into(),
            if v.reason.is_empty() {
                "-".into()
            } else {
                v.reason.clone()
            },
        ],
        vec!["vcpus".into(), v.vcpus.to_string()],
        vec!["memory_mib".into(), v.memory_mib.to_string()],
        vec!["boot".into(), v.boot.clone()],
        vec!["disks".into(), list(&v.disks)],
        vec![
            "nics".into(),
            list(
                &v.nics
                    .iter()
                    .map(|n| match n.tap.as_str() {
                        "" => format!("{} {} mtu {}", n.network, n.mac, n.mtu),
                        tap => format!("{} {} mtu {} tap {tap}", n.network, n.mac, n.mtu),
                    })
                    .collect::<Vec<_>>(),
            ),
        ],
        vec!["restart_priority".into(), v.restart_priority.clone()],
        vec!["restart_policy".into(), v.restart_policy.clone()],
        vec!["restarts (within the window)".into(), list(&v.restarts)],
        vec!["anti_affinity".into(), list(&v.anti_affinity)],
        vec![
            "preferred_owners".into(),
            list(
                &v.preferred_owners
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>(),
            ),
        ],
        vec![
            "cpu demand (vCPUs: run + wait)".into(),
            v.demand.as_ref().map_or("-".into(), |d| {
                format!(
                    "{} ({} ran, {} waited for a CPU)",
                    cpus(d.cpu_demand_millicores),
                    cpus(d.cpu_run_millicores),
                    cpus(d.cpu_demand_millicores.saturating_sub(d.cpu_run_millicores))
                )
            }),
        ],
        vec![
            "memory touched (MiB)".into(),
            v.demand
                .as_ref()
                .map_or("-".into(), |d| d.memory_touched_mib.to_string()),
        ],
        vec!["generation".into(), v.generation.to_string()],
        vec![
            "migrating_to".into(),
            if v.migrating_to == 0 {
                "-".into()
            } else {
                v.migrating_to.to_string()
            },
        ],
    ];
    Ok(table(&["FIELD", "VALUE"], &rows))
}

#[derive(Serialize)]
struct PlanView<'a> {
    vm: &'a str,
    from_node_id: u64,
    to_node_id: u64,
    go: bool,
    reasons: &'a [String],
    /// `"1.500s"`.
    predicted_duration: Option<String>,
    predicted_downtime: Option<String>,
    predicted_rounds: u32,
}

pub fn render_plan(fmt: Format, p: &pb::PlanMigrationResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&PlanView {
            vm: &p.vm,
            from_node_id: p.from_node_id,
            to_node_id: p.to_node_id,
            go: p.go,
            reasons: &p.reasons,
            predicted_duration: p.predicted_duration.as_ref().map(times::duration_string),
            predicted_downtime: p.predicted_downtime.as_ref().map(times::duration_string),
            predicted_rounds: p.predicted_rounds,
        });
    }
    let target = if p.to_node_id == 0 {
        "none".to_string()
    } else {
        format!("node {}", p.to_node_id)
    };
    let mut s = format!(
        "dry run: VM {} node {} -> {target}: {}\n",
        p.vm,
        p.from_node_id,
        if p.go { "GO" } else { "NO-GO" }
    );
    if p.predicted_rounds > 0 {
        s.push_str(&format!(
            "  predicted: {} ms total, {} ms blackout, {} pre-copy rounds\n",
            dur_ms(&p.predicted_duration),
            dur_ms(&p.predicted_downtime),
            p.predicted_rounds
        ));
    }
    for r in &p.reasons {
        s.push_str("  - ");
        s.push_str(r);
        s.push('\n');
    }
    Ok(s)
}

pub fn render_why_not(
    fmt: Format,
    vm: &str,
    node_id: u64,
    reasons: &[String],
) -> Result<String, CtlError> {
    if fmt == Format::Json {
        #[derive(Serialize)]
        struct WhyNot<'a> {
            vm: &'a str,
            node_id: u64,
            allowed: bool,
            reasons: &'a [String],
        }
        return json(&WhyNot {
            vm,
            node_id,
            allowed: reasons.is_empty(),
            reasons,
        });
    }
    if reasons.is_empty() {
        return Ok(format!("VM {vm} could move to node {node_id} now\n"));
    }
    let mut s = format!("VM {vm} cannot go to node {node_id}:\n");
    for r in reasons {
        s.push_str("  - ");
        s.push_str(r);
        s.push('\n');
    }
    Ok(s)
}

/// `clusterctl node why-not VM NODE`.
pub async fn why_not(cli: &Cli, vm: &str, node_id: u64) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, VmServiceClient::new).await?;
    let r = call(
        ep,
        timeout,
        c.why_not(pb::WhyNotRequest {
            vm: vm.to_owned(),
            node_id,
        }),
    )
    .await?;
    render_why_not(cli.output, vm, node_id, &r.reasons)
}

/// `--max-bandwidth MIB_PER_S` as bytes per second (0: no cap).
fn parse_mib_per_s(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of MiB/s"))?;
    mib.checked_mul(1 << 20)
        .ok_or_else(|| format!("{mib} MiB/s is too large"))
}

/// `clusterctl vm ...`.
pub async fn run(cli: &Cli, cmd: &VmCmd) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, VmServiceClient::new).await?;
    let fail = |s| status_error(ep, timeout, s);
    let timed_out = |_| CtlError::Timeout {
        endpoint: ep.to_owned(),
        timeout_s: timeout.as_secs(),
    };
    let fmt = cli.output;
    match cmd {
        VmCmd::Disk(d) => crate::disk::run_vm_disk(cli, d).await,
        VmCmd::Nic(VmNicCmd::Attach { name: n, nic }) => {
            let req = pb::AttachNicRequest {
                vm: n.clone(),
                nic: Some(pb::NicSpec {
                    network: nic.network.clone(),
                    mac: nic.mac.clone(),
                    slot: None,
                    mtu: nic.mtu,
                }),
            };
            let r = call(ep, timeout, c.attach_nic(req)).await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Nic(VmNicCmd::Detach { name: n, mac }) => {
            let req = pb::DetachNicRequest {
                vm: n.clone(),
                mac: mac.clone(),
            };
            let r = call(ep, timeout, c.detach_nic(req)).await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Create(a) => {
            let mut spec = spec_of(a);
            for n in &a.preferred_owners {
                spec.preferred_owners
                    .push(crate::nodes::node_id(cli, n).await?);
            }
            let req = pb::CreateVmRequest {
                spec: Some(spec),
                start: !a.no_start,
            };
            let r = call(ep, timeout, c.create_vm(req)).await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Start { name: n } => {
            let r = call(
                ep,
                timeout,
                c.start_vm(pb::StartVmRequest { name: n.clone() }),
            )
            .await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Stop { name: n } => {
            let r = call(
                ep,
                timeout,
                c.stop_vm(pb::StopVmRequest { name: n.clone() }),
            )
            .await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Delete { name: n } => {
            tokio::time::timeout(
                timeout,
                c.delete_vm(pb::DeleteVmRequest { name: n.clone() }),
            )
            .await
            .map_err(timed_out)?
            .map_err(fail)?;
            if fmt == Format::Json {
                return json(&serde_json::json!({ "deleted": n }));
            }
            Ok(format!("VM {n} deleted\n"))
        }
        VmCmd::List => {
            let vms = crate::client::all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let req = pb::ListVmsRequest {
                        page_size: crate::client::PAGE_SIZE,
                        page_token,
                    };
                    let r = call(ep, timeout, c.list_vms(req)).await?;
                    Ok((r.vms, r.next_page_token))
                }
            })
            .await?;
            render_list(fmt, &vms)
        }
        VmCmd::Show { name: n } => {
            let r = call(ep, timeout, c.get_vm(pb::GetVmRequest { name: n.clone() })).await?;
            render_one(fmt, r.vm.as_ref())
        }
        VmCmd::Migrate {
            name: n,
            to,
            no_wait,
            dry_run,
            quick,
            max_downtime,
            deadline,
            max_bandwidth,
            no_progress,
            no_queue,
        } => {
            let to_node_id = match to {
                Some(t) => crate::nodes::node_id(cli, t).await?,
                None => 0,
            };
            let req = pb::MigrateVmRequest {
                name: n.clone(),
                to_node_id,
                quick: *quick,
                max_downtime: max_downtime.map(crate::duration::pb),
                deadline: deadline.map(crate::duration::pb),
                no_queue: *no_queue,
                bandwidth_bytes_per_s_max: max_bandwidth.filter(|b| *b > 0),
            };
            if *dry_run {
                let plan = pb::PlanMigrationRequest {
                    name: req.name,
                    to_node_id: req.to_node_id,
                    quick: req.quick,
                    max_downtime: req.max_downtime,
                    deadline: req.deadline,
                    no_queue: req.no_queue,
                    bandwidth_bytes_per_s_max: req.bandwidth_bytes_per_s_max,
                };
                let p = call(ep, timeout, c.plan_migration(plan)).await?;
                return render_plan(fmt, &p);
            }
            let r = call(ep, timeout, c.migrate_vm(req)).await?;
            let queued = r.queued_migration_id;
            let started = r.vm.unwrap_or_default();
            if *no_wait {
                if queued != 0 {
                    return match fmt {
                        Format::Json | Format::Yaml => json(&serde_json::json!({
                            "vm": n,
                            "queued_migration_id": queued,
                        })),
                        Format::Table | Format::Wide => Ok(format!(
                            "VM {n}: migration {queued} queued (a migration slot is busy)\n"
                        )),
                    };
                }
                return render_one(fmt, Some(&started));
            }
            let target = if queued != 0 {
                crate::migration::wait_queued(ep, timeout, queued, n, MIGRATE_WAIT_MAX).await?
            } else {
                started.migrating_to
            };
            if !*no_progress {
                // Progress bar on stderr until the migration ends (best effort).
                if let Err(e) = crate::migration::follow_progress(ep, timeout, n).await {
                    eprintln!("clusterctl: no progress stream: {e}");
                }
            }
            let deadline = std::time::Instant::now() + MIGRATE_WAIT_MAX;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let v = c
                    .get_vm(pb::GetVmRequest { name: n.clone() })
                    .await
                    .map_err(fail)?
                    .into_inner()
                    .vm
                    .unwrap_or_default();
                if v.migrating_to == 0 {
                    if v.owner_id != target {
                        return Err(CtlError::Ended {
                            what: format!("the migration of VM {n} to node {target}"),
                            status: format!("without moving it: {}", v.reason),
                        });
                    }
                    if v.runtime() == pb::RuntimeState::Failed {
                        return Err(CtlError::Ended {
                            what: format!("VM {n} on node {target} after its migration"),
                            status: format!("failed: {}", v.reason),
                        });
                    }
                    if v.runtime() == pb::RuntimeState::Running {
                        return render_one(fmt, Some(&v));
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err(CtlError::Timeout {
                        endpoint: ep.to_owned(),
                        timeout_s: MIGRATE_WAIT_MAX.as_secs(),
                    });
                }
            }
        }
        VmCmd::Console {
            name: n,
            follow,
            max_lines,
        } => {
            let mut live = 0u64;
            let mut out = std::io::stdout().lock();
            let mut node = 0u64;
            let mut reopen_since: Option<std::time::Instant> = None;
            loop {
                let req = pb::StreamConsoleRequest {
                    name: n.clone(),
                    follow: *follow,
                    ..Default::default()
                };
                let opened = tokio::time::timeout(timeout, c.stream_console(req))
                    .await
                    .map_err(timed_out)?;
                let mut stream = match opened {
                    Ok(s) => s.into_inner(),
                    // Following: the VM may be between owners (migration, failover).
                    Err(s)
                        if *follow
                            && node != 0
                            && matches!(
                                s.code(),
                                tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                            ) =>
                    {
                        let since = *reopen_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > CONSOLE_REOPEN_MAX {
                            return Err(fail(s));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(s) => return Err(fail(s)),
                };
                reopen_since = None;
                let mut first = true;
                loop {
                    let chunk = match stream.message().await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => break,
                        // Following: the owner died under the stream (failover); reopen it.
                        Err(s) if *follow && node != 0 => {
                            eprintln!(
                                "clusterctl: console of {n} lost node {node}: {}",
                                s.message()
                            );
                            break;
                        }
                        Err(s) => return Err(fail(s)),
                    };
                    if node != 0 && chunk.node_id != node {
                        eprintln!(
                            "clusterctl: console of {n} now streams from node {}",
                            chunk.node_id
                        );
                    }
                    node = chunk.node_id;
                    if out
                        .write_all(chunk.text.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return Ok(String::new()); // the reader left (e.g. `| head`)
                    }
                    if !first {
                        live += 1;
                        if *max_lines != 0 && live >= *max_lines {
                            return Ok(String::new());
                        }
                    }
                    first = false;
                }
                if !*follow {
                    return Ok(String::new());
                }
                // The stream ended: the VM left its node. Follow it unless it was stopped.
                let v = c
                    .get_vm(pb::GetVmRequest { name: n.clone() })
                    .await
                    .map_err(fail)?
                    .into_inner()
                    .vm
                    .unwrap_or_default();
                if v.desired() != pb::DesiredState::Running {
                    return Ok(String::new());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_list_shows_measured_demand() {
        let vm = |name: &str, demand: Option<pb::VmDemand>| pb::VmInfo {
            spec: Some(pb::VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 512,
                ..Default::default()
            }),
            runtime: pb::RuntimeState::Running as i32,
            desired: pb::DesiredState::Running as i32,
            owner_id: 1,
            demand,
            ..Default::default()
        };
        let vms = [
            vm(
                "busy",
                Some(pb::VmDemand {
                    cpu_demand_millicores: 980,
                    cpu_run_millicores: 490,
                    memory_touched_mib: 12,
                    sampled_at: cluster_proto::times::timestamp_from_unix_ms(1),
                }),
            ),
            vm("new", None),
        ];
        let t = render_list(Format::Wide, &vms).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("CPU_DEMAND  CPU_WAIT  TOUCHED_MIB"),
            "{t}"
        );
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(cells(lines[1])[6..9], ["0.98", "0.49", "12"], "{t}");
        assert_eq!(cells(lines[2])[6..9], ["-", "-", "-"], "{t}");
        // Then the restart priority, disks, NICs and a migration's target.
        assert!(
            lines[0].contains("TOUCHED_MIB  PRIORITY  DISKS  NICS  MIGRATING_TO"),
            "{t}"
        );
        assert_eq!(cells(lines[2])[9..13], ["-", "-", "-", "-"], "{t}");
        let mut moving = vm("db1", None);
        moving.migrating_to = 3;
        moving.nic_taps = vec!["tap0".into()];
        if let Some(spec) = moving.spec.as_mut() {
            spec.restart_priority = pb::RestartPriority::High as i32;
            spec.disks = vec![pb::DiskSpec {
                name: "vol/vms/db1.img".into(),
                ..Default::default()
            }];
            spec.nics = vec![pb::NicSpec {
                network: "lan".into(),
                mac: "52:54:00:00:00:04".into(),
                ..Default::default()
            }];
        }
        let t = render_list(Format::Wide, &[moving]).unwrap_or_default();
        let row = t.lines().nth(1).unwrap_or_default();
        assert_eq!(
            cells(row)[9..13],
            ["high", "vol/vms/db1.img", "lan/52:54:00:00:00:04", "3"],
            "{t}"
        );
        // The plain table keeps its columns.
        assert!(!render_list(Format::Table, &vms)
            .unwrap_or_default()
            .contains("CPU_DEMAND"));
        let j = render_list(Format::Json, &vms).unwrap_or_default();
        assert!(j.contains("\"cpu_demand_millicores\": 980"), "{j}");
    }

    #[test]
    fn nic_arguments_parse_or_name_the_problem() {
        assert_eq!(
            parse_nic("lan"),
            Ok(NicArg {
                network: "lan".into(),
                ..Default::default()
            })
        );
        assert_eq!(
            parse_nic("lan,mtu=9000,mac=52:54:00:12:34:56"),
            Ok(NicArg {
                network: "lan".into(),
                mac: "52:54:00:12:34:56".into(),
                mtu: Some(9000),
            })
        );
        // The range is the agent's to check (it names the NIC); a non-number is refused here.
        assert_eq!(parse_nic("lan,mtu=20000").map(|n| n.mtu), Ok(Some(20000)));
        assert!(parse_nic("lan,mtu=big")
            .unwrap_err()
            .contains("mtu=big is not a number"));
        assert!(parse_nic("lan,mtu=1500,mtu=9000")
            .unwrap_err()
            .contains("once each"));
        assert_eq!(
            parse_nic("lan,mac=52:54:00:12:34:56").map(|n| n.mac),
            Ok("52:54:00:12:34:56".into())
        );
        assert!(parse_nic(",mac=52:54:00:12:34:56")
            .unwrap_err()
            .contains("network name"));
        assert!(parse_nic("lan,speed=10").unwrap_err().contains("speed=10"));
    }

    fn info(name: &str, owner: u64) -> pb::VmInfo {
        pb::VmInfo {
            id: 1,
            spec: Some(pb::VmSpec {
                name: name.into(),
                vcpus: 2,
                memory_mib: 128,
                boot: Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
                    workload: pb::Workload::Mem as i32,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            desired: pb::DesiredState::Running as i32,
            owner_id: owner,
            owner_name: "n2".into(),
            runtime: pb::RuntimeState::Running as i32,
            ..Default::default()
        }
    }

    #[test]
    fn list_renders_table_and_json() {
        let mut web1 = info("web1", 2);
        web1.created_at = times::timestamp_from_unix_ms(1_767_323_045_678);
        let vms = [web1];
        let t = render_list(Format::Table, &vms).unwrap_or_default();
        assert!(
            t.contains("NAME") && t.contains("web1") && t.contains("2 (n2)"),
            "{t}"
        );
        let j = render_list(Format::Json, &vms).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_default();
        assert_eq!(v[0]["name"], "web1");
        assert_eq!(v[0]["owner_id"], 2);
        assert_eq!(v[0]["boot"], "test-guest mem");
        // Times in RFC 3339 (UTC); an absent one is null.
        assert_eq!(v[0]["created_at"], "2026-01-02T03:04:05.678Z", "{v}");
        assert!(v[0]["updated_at"].is_null(), "{v}");
        let one = render_one(Format::Json, vms.first()).unwrap_or_default();
        assert!(
            one.contains("\"created_at\": \"2026-01-02T03:04:05.678Z\""),
            "{one}"
        );
    }

    #[test]
    fn why_not_says_allowed_or_lists_reasons() {
        let ok = render_why_not(Format::Table, "a", 2, &[]).unwrap_or_default();
        assert!(ok.contains("could move to node 2"));
        let no = render_why_not(Format::Table, "a", 2, &["not enough memory".into()])
            .unwrap_or_default();
        assert!(no.contains("cannot go to node 2") && no.contains("- not enough memory"));
        assert!(render_one(Format::Table, None).is_err());
    }
}
