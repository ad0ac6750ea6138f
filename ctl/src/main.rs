//! `clusterctl`: command-line client of the cluster's management API. Argument parsing
//! and exit codes live here; talking to an agent is in [`client`], the commands in
//! [`commands`], rendering in [`output`].

mod ca;
mod client;
mod commands;
mod config;
mod disk;
mod drain;
mod duration;
mod migration;
mod nodes;
mod output;
mod pki;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Default management endpoint (first agent of `deploy/local-cluster.sh`).
pub const DEFAULT_ENDPOINT: &str = "127.0.1.1:7001";

#[derive(Debug, Parser)]
#[command(
    name = "clusterctl",
    version,
    about = "Manage a VM failover cluster",
    after_help = EXIT_CODES_HELP
)]
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
    /// How long to wait for an answer, e.g. 10s or 1m (joins wait at least 60s; a bare
    /// number is seconds; --timeout-s is the old name).
    #[arg(
        long,
        alias = "timeout-s",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = duration::bare_s,
        global = true
    )]
    pub timeout: std::time::Duration,
    /// Read the asked agent's own view, which may be stale (e.g. an agent cut off from
    /// the majority). Without it every read is linearizable: an agent that cannot confirm
    /// its view is current refuses (exit code 3).
    #[arg(long, global = true)]
    pub stale: bool,
    #[command(subcommand)]
    pub command: Cmd,
    /// `-o yaml`: the commands render JSON (`output` says `Json`) and `main` converts it.
    #[arg(skip)]
    pub yaml: bool,
}

impl Cli {
    /// The deadline of each call: `--timeout`, at least 1 s.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.max(std::time::Duration::from_secs(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    /// A table with more columns: every list (`vm list`, `node list`: measured demand;
    /// `migration list`: asked bounds and statistics; `drain list|show`, dry-run plans:
    /// counts and planned vs actual times; `disk list`; `events`: exact UTC times;
    /// `user list-revoked`).
    Wide,
    Json,
    /// The JSON document as YAML.
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster lifecycle and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Node registry.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster events, oldest first: the newest 1000 unless --after/--limit/--tail say
    /// otherwise; -f keeps printing new ones as they happen.
    #[command(after_help = EVENTS_EXAMPLES)]
    Events {
        /// Only events after this sequence number (paging from the start: --after 0).
        #[arg(long, conflicts_with = "tail")]
        after: Option<u64>,
        /// At most this many events (server default 1000, max 10000).
        #[arg(long, conflicts_with = "tail")]
        limit: Option<u32>,
        /// The newest N events (0 with -f: only events from now on).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=10_000))]
        tail: Option<u32>,
        /// Follow: keep printing events as they happen (until interrupted). Tables print
        /// one row per event; -o json prints one JSON object per line.
        #[arg(long, short = 'f')]
        follow: bool,
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
    /// Shell completions on stdout, e.g. `clusterctl completions bash >
    /// /etc/bash_completion.d/clusterctl` (zsh: into a directory of $fpath as _clusterctl).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff) on stdout (`clusterctl man | man -l -`), or with --dir one page
    /// per command (clusterctl.1, clusterctl-vm.1, clusterctl-vm-migrate.1, ...) in DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
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
        /// Node to remove (id or name).
        node_id: nodes::NodeArg,
    },
    /// Leader, term and members.
    Status,
    /// The cluster CA: rotate it, finish a rotation, show the trust bundle.
    #[command(subcommand)]
    Ca(ca::CaCmd),
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// All registered nodes.
    List,
    /// One node in detail.
    Show { node_id: nodes::NodeArg },
    /// Mark a node paused (administrative; e.g. before maintenance).
    Pause {
        node_id: nodes::NodeArg,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Return a paused node to up.
    Resume {
        node_id: nodes::NodeArg,
        #[arg(long, default_value = "")]
        reason: String,
        /// Also move back the VMs its drains moved off (a failback job).
        #[arg(long)]
        failback: bool,
    },
    /// Pause NODE and move every VM off it (a drain job run by the leader).
    #[command(after_help = "\
Examples:
  clusterctl node drain node-3 --dry-run   # the plan: waves, targets, ETAs; nothing changes
  clusterctl node drain 3 --watch          # drain and follow it to the end
  clusterctl drain abort 3                 # drop its queued moves
  clusterctl node resume 3 --failback      # up again, the drained VMs move back

With --watch: exit 5 when the drain ends failed or aborted.")]
    Drain {
        node_id: nodes::NodeArg,
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
        node_id: nodes::NodeArg,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Wake a standby NODE with its power-on command; it is up once its agent reports.
    Wake {
        node_id: nodes::NodeArg,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Why VM cannot run on (or move to) NODE: every rule that rules the node out.
    WhyNot { vm: String, node_id: nodes::NodeArg },
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

/// Examples in `clusterctl events --help`.
const EVENTS_EXAMPLES: &str = "\
Examples:
  clusterctl events                      # the newest 1000, with local times and ages
  clusterctl events --tail 20 -f         # the last 20, then new ones as they happen
  clusterctl -o json events --after 0    # from the first (times in RFC 3339, UTC)
  clusterctl -o json events -f --tail 0  # JSON Lines of new events, for scripts";

/// The exit-code table of `--help` (kept in step with [`client::exit`] by a test).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   done
  1   local error (bad endpoint, credentials, config, a value clusterctl refuses)
  2   no agent reachable, or no answer in time
  3   no leader, or the agent cannot confirm its view is current (try --stale)
  4   refused by the cluster (unknown VM/node, failed precondition, permission)
  5   a watched drain/failback or an awaited migration ended failed, aborted or cancelled
  64  bad command line (usage)";

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

/// `clusterctl man [--dir DIR]`.
fn man(dir: Option<&std::path::Path>) -> Result<String, client::CtlError> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        Some(d) => {
            let failed = |e: std::io::Error| {
                client::CtlError::Local(format!("cannot write man pages into {}: {e}", d.display()))
            };
            std::fs::create_dir_all(d).map_err(failed)?;
            clap_mangen::generate_to(cmd, d).map_err(failed)?;
            Ok(format!("man pages written to {}\n", d.display()))
        }
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .map_err(|e| client::CtlError::Render(e.to_string()))?;
            String::from_utf8(buf).map_err(|e| client::CtlError::Render(e.to_string()))
        }
    }
}

/// `text` (a command's `-o json` output) as YAML; text that is not one JSON document
/// (a join token, a note) stays as it is.
fn to_yaml(text: String) -> Result<String, client::CtlError> {
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => serde_yaml::to_string(&v).map_err(|e| client::CtlError::Render(e.to_string())),
        Err(_) => Ok(text),
    }
}

/// Commands that touch local files only.
fn run_local(cli: &Cli) -> Option<Result<String, client::CtlError>> {
    match &cli.command {
        Cmd::Pki(pki::PkiCmd::Join { .. }) => None,
        Cmd::Pki(p) => Some(pki::run_pki(p)),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "clusterctl", &mut buf);
            Some(String::from_utf8(buf).map_err(|e| client::CtlError::Render(e.to_string())))
        }
        Cmd::Man { dir } => Some(man(dir.as_deref())),
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
            let code = if e.use_stderr() {
                client::exit::USAGE
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.stale {
        client::use_stale_reads();
    }
    if cli.output == Format::Yaml {
        cli.output = Format::Json;
        cli.yaml = true;
    }
    let result = match run_local(&cli) {
        Some(r) => r,
        None => match resolve(&mut cli) {
            Err(e) => Err(e),
            Ok(()) => run_remote(&cli),
        },
    };
    let result = match result {
        Ok(text) if cli.yaml => to_yaml(text),
        r => r,
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

    /// The table in `--help` lists every code `client::exit` defines, with its number.
    #[test]
    fn the_help_lists_every_exit_code() {
        use crate::client::exit;
        for (code, words) in [
            (exit::LOCAL, "local error"),
            (exit::UNREACHABLE, "no agent reachable"),
            (exit::NO_LEADER, "no leader"),
            (exit::REFUSED, "refused by the cluster"),
            (exit::JOB_FAILED, "ended failed"),
            (exit::USAGE, "usage"),
        ] {
            let line = format!("  {code:<4}");
            assert!(
                super::EXIT_CODES_HELP
                    .lines()
                    .any(|l| l.starts_with(&line) && l.contains(words)),
                "exit code {code} ({words}) missing from --help"
            );
        }
    }
}
