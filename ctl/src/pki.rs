//! Offline certificate commands (`clusterctl pki ...`) and the config file's contexts
//! (`clusterctl config ...`): they touch local files only, never an agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use cluster_proto::pki::{self, Ca, Identity, Role, TlsDir};

use crate::client::CtlError;
use crate::config::{Context, CtlConfig};

#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create a cluster CA in DIR (ca.pem, and ca.key readable by its owner only).
    CreateCa {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name (in the CA's subject).
        #[arg(long, default_value = "vm-cluster")]
        cluster_name: String,
    },
    /// Issue a node certificate into a node's TLS dir (ca.pem, cert.pem, key.pem).
    IssueNode {
        /// Directory holding the CA (ca.pem, ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// Every IP the node serves on (management, Raft, migration); repeat the flag.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// The node's TLS dir (`tls_dir` of its config; default <data_dir>/tls).
        #[arg(long)]
        out: PathBuf,
        /// Also give the node the CA key, so it can issue certificates (join tokens,
        /// `clusterctl user create`).
        #[arg(long)]
        issuer: bool,
    },
    /// Issue a user certificate (role admin or viewer) into OUT.
    IssueUser {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        out: PathBuf,
    },
    /// Who a certificate names and until when it is valid.
    Show { cert: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Add (or replace) a context: where the cluster is and which credentials to use.
    AddContext {
        name: String,
        /// Management addresses of agents; repeat the flag.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Make it the current context.
        #[arg(long)]
        current: bool,
    },
    /// Make NAME the current context.
    UseContext { name: String },
    /// The contexts, the current one marked.
    GetContexts,
}

fn local(e: impl std::fmt::Display) -> CtlError {
    CtlError::Local(e.to_string())
}

fn load_ca(dir: &Path) -> Result<Ca, CtlError> {
    TlsDir(dir.to_owned()).load_ca().map_err(|e| {
        local(format!(
            "cannot load the CA from {}: {}",
            dir.display(),
            chain(&e)
        ))
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub fn run_pki(cmd: &PkiCmd) -> Result<String, CtlError> {
    match cmd {
        PkiCmd::CreateCa { dir, cluster_name } => {
            let d = TlsDir(dir.clone());
            if d.ca_cert().exists() || d.ca_key().exists() {
                return Err(local(format!(
                    "{} already holds a CA; refusing to overwrite it",
                    dir.display()
                )));
            }
            let ca = Ca::create(cluster_name).map_err(|e| local(chain(&e)))?;
            pki::write_file(&d.ca_key(), &ca.key_pem(), true).map_err(|e| local(chain(&e)))?;
            pki::write_file(&d.ca_cert(), ca.cert_pem(), false).map_err(|e| local(chain(&e)))?;
            Ok(format!(
                "created the CA of cluster {cluster_name:?} in {} (keep ca.key secret)\n",
                dir.display()
            ))
        }
        PkiCmd::IssueNode {
            ca_dir,
            node_id,
            ips,
            out,
            issuer,
        } => {
            if *node_id == 0 {
                return Err(local("node id 0 is reserved; use 1 or higher"));
            }
            let ca = load_ca(ca_dir)?;
            let id = Identity::Node(*node_id);
            let issued = ca
                .issue(&id, ips, pki::CERT_VALIDITY)
                .map_err(|e| local(chain(&e)))?;
            let d = TlsDir(out.clone());
            d.store(ca.cert_pem(), &issued)
                .map_err(|e| local(chain(&e)))?;
            if *issuer {
                d.store_ca_key(&ca).map_err(|e| local(chain(&e)))?;
            }
            Ok(format!(
                "issued a certificate for {id} into {}\n",
                out.display()
            ))
        }
        PkiCmd::IssueUser {
            ca_dir,
            name,
            role,
            out,
        } => {
            pki::check_user_name(name).map_err(local)?;
            let ca = load_ca(ca_dir)?;
            let id = Identity::User {
                name: name.clone(),
                role: *role,
            };
            let issued = ca
                .issue(&id, &[], pki::CERT_VALIDITY)
                .map_err(|e| local(chain(&e)))?;
            TlsDir(out.clone())
                .store(ca.cert_pem(), &issued)
                .map_err(|e| local(chain(&e)))?;
            Ok(format!(
                "issued a certificate for {id} into {}\n",
                out.display()
            ))
        }
        PkiCmd::Show { cert } => {
            let text = pki::read_pem_file(cert).map_err(|e| local(chain(&e)))?;
            let der = pki::certificates_der(&text);
            let first = der
                .first()
                .ok_or_else(|| local(format!("{} holds no certificate", cert.display())))?;
            let id = pki::identity_of(first).map_err(local)?;
            let until = pki::not_after(first).map_err(local)?;
            let secs = until
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Ok(format!("{id}, valid until unix time {secs}\n"))
        }
    }
}

pub fn run_config(cmd: &ConfigCmd, path: &Path) -> Result<String, CtlError> {
    let mut cfg = CtlConfig::load(path)?;
    match cmd {
        ConfigCmd::AddContext {
            name,
            endpoints,
            ca,
            cert,
            key,
            current,
        } => {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            cfg.upsert(
                Context {
                    name: name.clone(),
                    endpoints: endpoints.clone(),
                    ca: abs(ca),
                    cert: abs(cert),
                    key: abs(key),
                },
                *current,
            );
            cfg.save(path)?;
            Ok(format!("context {name:?} saved in {}\n", path.display()))
        }
        ConfigCmd::UseContext { name } => {
            cfg.context(Some(name), path)?;
            cfg.current_context = Some(name.clone());
            cfg.save(path)?;
            Ok(format!("current context: {name}\n"))
        }
        ConfigCmd::GetContexts => {
            let mut out = String::new();
            for c in &cfg.contexts {
                let mark = if cfg.current_context.as_deref() == Some(&c.name) {
                    "*"
                } else {
                    " "
                };
                out.push_str(&format!("{mark} {}  {}\n", c.name, c.endpoints.join(",")));
            }
            Ok(out)
        }
    }
}
