//! Debugging binary: run or restore one VM, with an optional control socket.
//!
//! ```text
//! vmm-node run --config vm.json [--control /path/sock] [--console] [MIGRATION-SECURITY]
//! vmm-node restore --snapshot DIR [--nic-tap TAP]... [--control /path/sock] [--console] [MIGRATION-SECURITY]
//! vmm-node facts
//! vmm-node receive --listen 127.0.2.1:0 [--control /path/sock] [--console] MIGRATION-SECURITY
//!
//! MIGRATION-SECURITY: --tls-ca CA.pem --tls-cert NODE.pem --tls-key NODE-KEY.pem
//!                     | --insecure-plaintext
//! ```
//!
//! Migrations (the `migrate` control command, `receive`) use mutual TLS with the given CA;
//! `--insecure-plaintext` is the old unauthenticated protocol. A process started with
//! neither cannot migrate, and `receive` refuses to start.

mod migration_cli;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm_node::devices::virtio::net::install_virtio_nics;
use vmm_node::devices::virtio::{install_virtio_slots, raw_file_opener};
use vmm_node::migration::tls::Transport;
use vmm_node::{StopReason, Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "vmm-node",
    about = "Run a KVM VM (debugging front end of the vmm-node library)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Nice value of the VM's vCPU threads (-20..=19; default: this process's), as the
    /// cluster's VM workers run them at 10 while their other threads keep the agent's.
    #[arg(long, global = true, allow_hyphen_values = true)]
    vcpu_nice: Option<i32>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create and start a VM from a JSON config.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        control: Option<PathBuf>,
        /// Copy console lines to stdout.
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        tls: migration_cli::TlsArgs,
    },
    /// Restore a VM from a snapshot directory and resume it.
    Restore {
        #[arg(long)]
        snapshot: PathBuf,
        /// TAP device of NIC i on this host (repeat, in NIC order; default: the saved names).
        #[arg(long = "nic-tap")]
        nic_taps: Vec<String>,
        #[arg(long)]
        control: Option<PathBuf>,
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        tls: migration_cli::TlsArgs,
    },
    /// Print host facts as JSON.
    Facts,
    /// Wait for an incoming live migration, then run the VM (see `migration_cli`).
    Receive {
        #[command(flatten)]
        args: migration_cli::ReceiveArgs,
        #[arg(long)]
        control: Option<PathBuf>,
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        tls: migration_cli::TlsArgs,
    },
}

fn serve_and_wait(
    vm: Arc<Vm>,
    control: Option<PathBuf>,
    console: bool,
    transport: Option<Transport>,
) -> anyhow::Result<()> {
    let server = match &control {
        Some(path) => Some(
            vmm_node::control::serve(
                path,
                vm.clone(),
                vec![migration_cli::control_extension(transport)],
            )
            .with_context(|| format!("serving control socket {}", path.display()))?,
        ),
        None => None,
    };
    if console {
        let rx = vm.console().subscribe();
        std::thread::spawn(move || {
            for line in rx {
                println!("{line}");
            }
        });
    }
    let reason = loop {
        if let Some(r) = vm.wait_stopped(Duration::from_secs(1)) {
            break r;
        }
    };
    vm.stop().context("stopping VM")?;
    tracing::info!(?reason, "vm stopped");
    if let Some(s) = &server {
        // Deliver the response to the request that stopped the VM.
        s.wait_idle(Duration::from_secs(2));
    }
    if let Some(path) = &control {
        let _ = std::fs::remove_file(path);
    }
    match reason {
        StopReason::Requested | StopReason::GuestExit { code: 0 } => Ok(()),
        other => anyhow::bail!("VM stopped: {other:?}"),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.vcpu_nice {
        anyhow::ensure!(
            (-20..=19).contains(&n),
            "--vcpu-nice must be a nice value in -20..=19, got {n}"
        );
        vmm_node::kvm::set_vcpu_nice(n);
    }
    match cli.cmd {
        Cmd::Facts => {
            let f = vmm_node::facts::host_facts()?;
            println!("{}", serde_json::to_string_pretty(&f)?);
            Ok(())
        }
        Cmd::Run {
            config,
            control,
            console,
            tls,
        } => {
            let transport = tls.transport()?;
            let _ = vmm_node::facts::host_facts();
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg: VmConfig = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config.display()))?;
            let vm = Vm::create(cfg).context("creating VM")?;
            install_virtio_slots(&vm, raw_file_opener(), true).context("attaching disks")?;
            install_virtio_nics(&vm).context("creating NICs")?;
            vm.start().context("starting VM")?;
            serve_and_wait(Arc::new(vm), control, console, transport)
        }
        Cmd::Receive {
            args,
            control,
            console,
            tls,
        } => {
            let Some(transport) = tls.transport()? else {
                anyhow::bail!(
                    "receive needs --tls-ca, --tls-cert and --tls-key (mutual TLS), or \
                     --insecure-plaintext for an isolated migration network"
                );
            };
            let vm =
                migration_cli::receive_vm(&args, transport.clone()).context("receiving a VM")?;
            serve_and_wait(vm, control, console, Some(transport))
        }
        Cmd::Restore {
            snapshot,
            nic_taps,
            control,
            console,
            tls,
        } => {
            let transport = tls.transport()?;
            let _ = vmm_node::facts::host_facts();
            let vm = vmm_node::snapshot::restore_edited(
                &snapshot,
                |c| Ok(c.set_nic_taps(&nic_taps)?),
                |vm| {
                    install_virtio_slots(vm, raw_file_opener(), false)?;
                    install_virtio_nics(vm)?;
                    Ok(())
                },
            )
            .with_context(|| format!("restoring {}", snapshot.display()))?;
            vm.resume().context("resuming VM")?;
            serve_and_wait(Arc::new(vm), control, console, transport)
        }
    }
}
