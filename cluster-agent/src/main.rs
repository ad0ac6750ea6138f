//! `cluster-agent`: the node daemon. Parses flags, loads the config and runs
//! [`cluster_agent::server::run`] until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cluster_agent::logging::LogFormat;
use cluster_agent::node::config::RawConfig;

#[derive(Debug, Parser)]
#[command(name = "cluster-agent", version, about = "VM cluster node agent")]
struct Args {
    /// TOML config file; flags override its keys.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Public management gRPC address (IP:port).
    #[arg(long)]
    mgmt_addr: Option<String>,
    /// Peer-only Raft gRPC address (IP:port).
    #[arg(long)]
    raft_addr: Option<String>,
    /// Address on the dedicated migration network (IP:port).
    #[arg(long)]
    migration_addr: Option<String>,
    #[arg(long)]
    mgmt_subnet: Option<String>,
    #[arg(long)]
    migration_subnet: Option<String>,
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    #[arg(long)]
    down_after_ms: Option<u64>,
    /// Prometheus `/metrics` listener (IP:port); unset: none.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// The web console's HTTPS listener (IP:port); unset: none.
    #[arg(long)]
    console_addr: Option<String>,
    /// Log format on stderr: "text" or "json" (config key `log_format`). Colours only
    /// when stderr is a terminal.
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// Validate the configuration, print it and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Run one VM in this process (started by the agent when `vm_workers` is on; not
    /// meant to be run by hand).
    VmWorker {
        /// The VM's worker directory (start.json, sock, worker.log).
        #[arg(long)]
        dir: PathBuf,
    },
    /// The man page (roff, section 8) on stdout, e.g. `cluster-agent man >
    /// cluster-agent.8` (what `deploy/package.sh` ships).
    #[command(hide = true)]
    Man,
}

impl Args {
    fn flags(&self) -> RawConfig {
        RawConfig {
            node_id: self.node_id,
            name: self.name.clone(),
            data_dir: self.data_dir.clone(),
            mgmt_addr: self.mgmt_addr.clone(),
            raft_addr: self.raft_addr.clone(),
            migration_addr: self.migration_addr.clone(),
            mgmt_subnet: self.mgmt_subnet.clone(),
            migration_subnet: self.migration_subnet.clone(),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            down_after_ms: self.down_after_ms,
            metrics_addr: self.metrics_addr.clone(),
            console_addr: self.console_addr.clone(),
            log_format: self.log_format.clone(),
            ..RawConfig::default()
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Sub::Man) = &args.command {
        return man();
    }
    if let Some(Sub::VmWorker { dir }) = &args.command {
        // The agent passes its own format; a worker started by hand logs text.
        let format = match args.log_format.as_deref().map(LogFormat::parse) {
            None => LogFormat::default(),
            Some(Some(f)) => f,
            Some(None) => {
                eprintln!(
                    "cluster-agent: error: invalid value for `log_format`: use {}",
                    LogFormat::NAMES
                );
                return ExitCode::FAILURE;
            }
        };
        cluster_agent::logging::init(format);
        let code = cluster_agent::vmhost::worker::process::run(dir);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "cluster-agent: error: {}",
                cluster_agent::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// `cluster-agent man`: the page for the agent's flags, as section 8 (a daemon).
fn man() -> ExitCode {
    use clap::CommandFactory;
    use std::io::Write;
    let mut buf = Vec::new();
    let rendered = clap_mangen::Man::new(Args::command())
        .section("8")
        .render(&mut buf)
        .and_then(|()| std::io::stdout().write_all(&buf));
    match rendered {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster-agent: error: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file = match &args.config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    let config = file.overlay(args.flags()).validate()?;
    // The log starts once its format is known; config errors go to stderr as plain text.
    cluster_agent::logging::init(config.log_format);
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install SIGTERM handler");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        cluster_agent::server::run(config, shutdown).await
    })?;
    Ok(())
}
