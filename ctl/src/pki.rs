//! Offline certificate commands (`clusterctl pki ...`) and the config file's contexts
//! (`clusterctl config ...`): they touch local files only, never an agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use cluster_proto::pki::{self, Ca, Identity, Role, TlsDir};

use crate::client::{error_chain as chain, CtlError};
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
    /// Get this new host's node certificate from an agent holding the CA key, with a
    /// join token (`clusterctl cluster token create`); the key is made here and stays here.
    /// Needs --ca (the cluster CA certificate, to check the agent) and no client
    /// certificate.
    Join {
        /// The one-time join token.
        #[arg(long, env = "CLUSTERCTL_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        node_id: u64,
        /// Every IP the node serves on (management, Raft, migration); repeat the flag.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// The new node's TLS dir (`tls_dir` of its config).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Issue a user certificate (an agent holding the CA key signs; you need role admin).
    /// The key is made here and written with the certificate into OUT.
    Create {
        name: String,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a user's certificates (you need role admin): with NAME, every certificate
    /// of that user issued until now; with --cert, exactly that certificate. Every agent
    /// refuses a revoked certificate on each call. A node's certificate is not revoked:
    /// remove the node (`cluster leave`).
    Revoke {
        /// The user whose certificates to revoke.
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        name: Option<String>,
        /// One certificate (PEM file) to revoke.
        #[arg(long = "cert-file", id = "cert")]
        cert: Option<PathBuf>,
    },
    /// The revoked user certificates (you need role admin).
    ListRevoked,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// A one-time join token for a new host (prints "<id>.<secret>"; give it once).
    Create {
        /// Lifetime: e.g. 90s, 30m, 1h, 2d (at most 7 days; a bare number is seconds).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
}

/// A lifetime (humantime: "90s", "30m", "1h", "2d"; or plain seconds) as whole seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    crate::duration::bare_s(s)
        .map(|d| d.as_secs())
        .and_then(|n| {
            if n > 0 {
                Ok(n)
            } else {
                Err(format!("{s:?} is shorter than one second"))
            }
        })
}

/// Write what an agent signed into `out` (ca.pem, cert.pem, and the key made here).
fn store_signed(
    out: &Path,
    key_pem: String,
    r: &cluster_proto::management::IssueCertificateResponse,
) -> Result<(), CtlError> {
    TlsDir(out.to_owned())
        .store(
            &r.ca_pem,
            &pki::Issued {
                cert_pem: r.cert_pem.clone(),
                key_pem,
            },
        )
        .map_err(|e| local(chain(&e)))
}

/// A key made here, a certificate for it signed by the agent at `--endpoint` (`req`
/// without its signing request), both stored in `out` with the CA.
async fn issue_into(
    cli: &crate::Cli,
    out: &Path,
    mut req: cluster_proto::management::IssueCertificateRequest,
) -> Result<(), CtlError> {
    let (key_pem, csr_pem) = pki::new_key_and_request().map_err(|e| local(chain(&e)))?;
    req.csr_pem = csr_pem;
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    let mut c = crate::client::connect(ep, timeout).await?;
    let r = crate::client::call(ep, timeout, c.issue_certificate(req)).await?;
    store_signed(out, key_pem, &r)
}

/// `clusterctl pki join`: a node certificate for a join token.
pub async fn join(cli: &crate::Cli, cmd: &PkiCmd) -> Result<String, CtlError> {
    let PkiCmd::Join {
        token,
        node_id,
        ips,
        out,
    } = cmd
    else {
        return Err(local("not a join"));
    };
    issue_into(
        cli,
        out,
        cluster_proto::management::IssueCertificateRequest {
            join_token: token.clone(),
            node_id: *node_id,
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
            ..Default::default()
        },
    )
    .await?;
    let ep = &cli.endpoint;
    Ok(format!(
        "node {node_id}: certificate issued by {ep}, stored in {} (start the agent with tls_dir there, then `clusterctl -e <its address> cluster join --via {ep}`)\n",
        out.display()
    ))
}

/// `clusterctl user ...`.
pub async fn user(cli: &crate::Cli, cmd: &UserCmd) -> Result<String, CtlError> {
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    match cmd {
        UserCmd::Create { name, role, out } => create_user(cli, name, *role, out).await,
        UserCmd::Revoke { name, cert } => {
            let cert_pem = match cert {
                Some(p) => pki::read_pem_file(p).map_err(|e| local(chain(&e)))?,
                None => String::new(),
            };
            if let Some(n) = name {
                pki::check_user_name(n).map_err(local)?;
            }
            let mut c = crate::client::connect(ep, timeout).await?;
            let r = crate::client::call(
                ep,
                timeout,
                c.revoke_certificate(cluster_proto::management::RevokeCertificateRequest {
                    user_name: name.clone().unwrap_or_default(),
                    cert_pem,
                }),
            )
            .await?;
            crate::output::revoked(
                cli.output,
                &crate::client::required(r.revocation, "revocation")?,
            )
        }
        UserCmd::ListRevoked => {
            let mut c = crate::client::connect(ep, timeout).await?;
            let r = crate::client::call(
                ep,
                timeout,
                c.list_revocations(cluster_proto::management::ListRevocationsRequest {
                    page_size: 0,
                    page_token: String::new(),
                }),
            )
            .await?;
            // Every page.
            let mut all = r.revocations;
            let mut page_token = r.next_page_token;
            while !page_token.is_empty() {
                let r = crate::client::call(
                    ep,
                    timeout,
                    c.list_revocations(cluster_proto::management::ListRevocationsRequest {
                        page_size: 0,
                        page_token,
                    }),
                )
                .await?;
                all.extend(r.revocations);
                page_token = r.next_page_token;
            }
            crate::output::revocations(cli.output, &all)
        }
    }
}

/// `clusterctl user create`.
async fn create_user(
    cli: &crate::Cli,
    name: &str,
    role: Role,
    out: &Path,
) -> Result<String, CtlError> {
    pki::check_user_name(name).map_err(local)?;
    issue_into(
        cli,
        out,
        cluster_proto::management::IssueCertificateRequest {
            user_name: name.to_owned(),
            role: match role {
                Role::Admin => cluster_proto::management::UserRole::Admin,
                Role::Viewer => cluster_proto::management::UserRole::Viewer,
            } as i32,
            ..Default::default()
        },
    )
    .await?;
    Ok(format!(
        "user {name:?} ({role}): certificate stored in {} (clusterctl config add-context ... --cert {}/cert.pem --key {}/key.pem)\n",
        out.display(),
        out.display(),
        out.display()
    ))
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Add (or replace) a context: where the cluster is (--endpoints) and which
    /// credentials to use (the global --ca, --cert and --key).
    AddContext {
        name: String,
        /// Management addresses of agents, comma-separated (the first is asked first).
        #[arg(long, required = true, value_delimiter = ',')]
        endpoints: Vec<String>,
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

pub fn run_pki(cmd: &PkiCmd) -> Result<String, CtlError> {
    match cmd {
        PkiCmd::Join { .. } => Err(local("`pki join` asks an agent")),
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
            let from = pki::unix_ms(pki::not_before(first).map_err(local)?);
            let until = pki::unix_ms(pki::not_after(first).map_err(local)?);
            let now = pki::unix_ms(std::time::SystemTime::now());
            let state = if until <= now {
                "EXPIRED".to_owned()
            } else {
                format!("{} s left", (until - now) / 1_000)
            };
            Ok(format!(
                "{id}, valid from {} until {} ({state}; unix time {})\n",
                pki::utc(from),
                pki::utc(until),
                until / 1_000
            ))
        }
    }
}

pub fn run_config(cli: &crate::Cli, cmd: &ConfigCmd, path: &Path) -> Result<String, CtlError> {
    let mut cfg = CtlConfig::load(path)?;
    match cmd {
        ConfigCmd::AddContext {
            name,
            endpoints,
            current,
        } => {
            let need = |v: &Option<PathBuf>, flag: &str| {
                v.clone()
                    .ok_or_else(|| local(format!("config add-context needs {flag}")))
            };
            let (ca, cert, key) = (
                need(&cli.ca, "--ca")?,
                need(&cli.cert, "--cert")?,
                need(&cli.key, "--key")?,
            );
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            cfg.upsert(
                Context {
                    name: name.clone(),
                    endpoints: endpoints.clone(),
                    ca: abs(&ca),
                    cert: abs(&cert),
                    key: abs(&key),
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
