//! `clusterctl`: command-line client of the cluster's management API. Argument parsing
//! and exit codes live here; talking to an agent is in [`client`], the commands in
//! [`commands`], rendering in [`output`].

mod client;
mod commands;
mod config;
mod disk;
mod drain;
mod migration;
mod output;
mod pki;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Default management endpoint (first agent of `deploy/local-cluster.sh`).
pub const DEFAULT_ENDPOINT: &str = "127.0.1.1:7001";

#[derive(Debug, Parser)]
#[command(name = "clusterctl", version, about = "Manage a VM failover cluster")]
pub struct Cli {
    /// Management address (IP:port) of any agent [default: the context's first
    /// endpoint, else 127.0.1.1:7001].
    #[arg(
        long,
        short = 'e',
        env = "CLUSTERCTL_ENDPOINT",
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    pub endpoint: String,
    /// The cluster CA certificate (PEM) agents' certificates must chain to [default:
    /// the context's].
    #[arg(long = "ca", id = "global-ca", env = "CLUSTERCTL_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Your client certificate (PEM); its role decides what you may do [default: the
    /// context's].
    #[arg(
        long = "cert",
        id = "global-cert",
        env = "CLUSTERCTL_CERT",
        global = true
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long = "key", id = "global-key", env = "CLUSTERCTL_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
    /// The config file with contexts [default: ~/.config/clusterctl/config.toml].
    #[arg(
        long = "config",
        id = "global-config",
        env = "CLUSTERCTL_CONFIG",
        global = true
    )]
    pub config: Option<std::path::PathBuf>,
    /// Use this context of the config file instead of its current one.
    #[arg(
        long = "context",
        id = "global-context",
        env = "CLUSTERCTL_CONTEXT",
        global = true
    )]
    pub context: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    /// Seconds to wait for an answer (joins wait at least 60 s).
    #[arg(long, default_value_t = 10, global = true)]
    pub timeout_s: u64,
    /// Read the asked agent's own view, which may be stale (e.g. an agent cut off from
    /// the majority). Without it every read is linearizable: an agent that cannot confirm
    /// its view is current refuses (exit code 3).
    #[arg(long, global = true)]
    pub stale: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

impl Cli {
    /// The deadline of each call: `--timeout-s`, at least 1 s.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    /// A table with more columns (`vm list`, `node list`: measured demand).
    Wide,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster lifecycle and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Node registry.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster events (oldest first).
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (server default 1000, max 10000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Replicated key/value entries (tests, small settings).
    #[command(subcommand)]
    Kv(KvCmd),
    /// The web console of the agent this command talks to.
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// VM lifecycle: create, start, stop, delete, list, show, console.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Drain jobs: show progress, abort, list jobs.
    #[command(subcommand)]
    Drain(drain::DrainCmd),
    /// Load-balancing policy: set, show, dry-run.
    #[command(subcommand)]
    Policy(drain::PolicyCmd),
    /// Shared-volume disks and their cluster locks: create, list, locks.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Migrations: list, show (statistics, receipt), cancel.
    #[command(subcommand)]
    Migration(migration::MigrationCmd),
    /// Certificates, offline: create the cluster CA, issue node and user certificates.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Users: certificates with a role, issued by the cluster.
    #[command(subcommand)]
    User(pki::UserCmd),
    /// The config file's contexts (cluster endpoints and credentials).
    #[command(subcommand)]
    Config(pki::ConfigCmd),
    /// The agent's standard gRPC health check (`grpc.health.v1`): exit 0 when it serves.
    Health {
        /// One service (e.g. cluster.vms.v1.VmService); empty: the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Bootstrap a new one-node cluster on the agent at --endpoint.
    Init {
        #[arg(long, default_value = "vm-cluster")]
        name: String,
    },
    /// Make the (new) agent at --endpoint join the cluster that VIA belongs to.
    Join {
        /// Management address of any current member.
        #[arg(long)]
        via: String,
    },
    /// Join tokens for new hosts (`clusterctl pki join` spends one).
    #[command(subcommand)]
    Token(pki::TokenCmd),
    /// Remove a node from the cluster.
    Leave {
        /// Node id to remove.
        node_id: u64,
    },
    /// Leader, term and members.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// All registered nodes.
    List,
    /// One node in detail.
    Show { node_id: u64 },
    /// Mark a node paused (administrative; e.g. before maintenance).
    Pause {
        node_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Return a paused node to up.
    Resume {
        node_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
        /// Also move back the VMs its drains moved off (a failback job).
        #[arg(long)]
        failback: bool,
    },
    /// Pause NODE and move every VM off it (a drain job run by the leader).
    Drain {
        node_id: u64,
        /// Print the plan (waves, ETAs) without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Follow the drain's progress until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Drain NODE, then put it in standby with its power-off command (its config's
    /// power_off_command, run by the leader); the power policy wakes it when needed.
    Standby {
        node_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Wake a standby NODE with its power-on command; it is up once its agent reports.
    Wake {
        node_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Why VM cannot run on (or move to) NODE: every rule that rules the node out.
    WhyNot { vm: String, node_id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ConsoleCmd {
    /// Print a one-time login link (good for a minute) to the agent's web console, for
    /// the name and role of your client certificate; open it in a browser.
    Url,
}

#[derive(Debug, Subcommand)]
pub enum KvCmd {
    Put { key: String, value: String },
    Get { key: String },
}

/// Exit code of a command line clap refuses (sysexits' `EX_USAGE`): distinct from 2, "no
/// agent reachable".
const EXIT_USAGE: u8 = 64;

/// Fill in the endpoint and the TLS credentials from flags, env and the config file.
fn resolve(cli: &mut Cli) -> Result<(), client::CtlError> {
    let path = cli.config.clone().or_else(config::default_path);
    let cfg = match &path {
        Some(p) => config::CtlConfig::load(p)?,
        None => config::CtlConfig::default(),
    };
    let ctx = match &path {
        Some(p) => cfg.context(cli.context.as_deref(), p)?.cloned(),
        None => None,
    };
    if cli.endpoint.is_empty() {
        cli.endpoint = ctx
            .as_ref()
            .and_then(|c| c.endpoints.first().cloned())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    }
    let ca = cli
        .ca
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.ca.clone()));
    let cert = cli
        .cert
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.cert.clone()));
    let key = cli
        .key
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.key.clone()));
    let Some(ca) = ca else {
        // `agent()` explains what is missing when a command needs an agent.
        return Ok(());
    };
    let read = |p: &std::path::Path, what: &str| {
        cluster_proto::pki::read_pem_file(p).map_err(|e| {
            client::CtlError::Credentials(format!("cannot read the {what} {}: {e}", p.display()))
        })
    };
    let ca_pem = read(&ca, "CA certificate")?;
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((read(c, "client certificate")?, read(k, "client key")?)),
        (None, None) => None,
        _ => {
            return Err(client::CtlError::Credentials(
                "--cert and --key go together: give both or neither".into(),
            ))
        }
    };
    client::use_tls(client::Tls {
        ca_path: ca,
        ca_pem,
        cert_path: cert,
        identity,
    });
    Ok(())
}

/// Commands that touch local files only.
fn run_local(cli: &Cli) -> Option<Result<String, client::CtlError>> {
    match &cli.command {
        Cmd::Pki(pki::PkiCmd::Join { .. }) => None,
        Cmd::Pki(p) => Some(pki::run_pki(p)),
        Cmd::Config(c) => Some(match cli.config.clone().or_else(config::default_path) {
            Some(path) => pki::run_config(cli, c, &path),
            None => Err(client::CtlError::Credentials(
                "no config file: give --config (HOME is not set)".into(),
            )),
        }),
        _ => None,
    }
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are answers, not errors.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.stale {
        client::use_stale_reads();
    }
    let result = match run_local(&cli) {
        Some(r) => r,
        None => match resolve(&mut cli) {
            Err(e) => Err(e),
            Ok(()) => run_remote(&cli),
        },
    };
    match result {
        Ok(text) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // `clusterctl node list | head`: the reader left; not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("clusterctl: error: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("clusterctl: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run_remote(cli: &Cli) -> Result<String, client::CtlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| client::CtlError::Local(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(commands::run(cli))
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand (ids, long flags, globals).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
