//! Where clusterctl finds a cluster and the credentials to talk to it: flags, then
//! environment variables, then the current (or `--context`) context of the config file,
//! like a kubeconfig.
//!
//! ```toml
//! # ~/.config/clusterctl/config.toml (or $CLUSTERCTL_CONFIG, or --config)
//! current_context = "local"
//! [[contexts]]
//! name = "local"
//! endpoints = ["127.0.1.1:7001", "127.0.1.2:7001"]
//! ca = "/root/.local/share/vmcluster/local/ca.pem"
//! cert = "/root/.local/share/vmcluster/local/admin/cert.pem"
//! key = "/root/.local/share/vmcluster/local/admin/key.pem"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::CtlError;

/// The config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One cluster and who to be there.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// Management addresses (IP:port) of some agents; the first is asked.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// The client certificate (PEM) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The config file's default path: `$CLUSTERCTL_CONFIG` (handled by clap), else
/// `$HOME/.config/clusterctl/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/clusterctl/config.toml"))
}

fn bad(path: &Path, reason: impl Into<String>) -> CtlError {
    CtlError::Config {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl CtlConfig {
    /// The config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<CtlConfig, CtlError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CtlConfig::default()),
            Err(e) => return Err(bad(path, format!("cannot read it: {e}"))),
        };
        let c: CtlConfig = toml::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        for ctx in &c.contexts {
            if ctx.endpoints.is_empty() {
                return Err(bad(
                    path,
                    format!("context {:?} lists no endpoints", ctx.name),
                ));
            }
        }
        Ok(c)
    }

    /// Write the config to `path` (owner-only: it points at private keys).
    pub fn save(&self, path: &Path) -> Result<(), CtlError> {
        let text = toml::to_string_pretty(self).map_err(|e| bad(path, e.to_string()))?;
        cluster_proto::pki::write_file(path, &text, true).map_err(|e| bad(path, e.to_string()))
    }

    /// The context named `name`, or the current one when `name` is `None`.
    pub fn context(&self, name: Option<&str>, path: &Path) -> Result<Option<&Context>, CtlError> {
        let wanted = name.or(self.current_context.as_deref());
        match wanted {
            None => Ok(None),
            Some(w) => self
                .contexts
                .iter()
                .find(|c| c.name == w)
                .map(Some)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
                    bad(
                        path,
                        format!("no context named {w:?} (contexts: {})", known.join(", ")),
                    )
                }),
        }
    }

    /// Add or replace a context; make it current when `current`.
    pub fn upsert(&mut self, ctx: Context, current: bool) {
        if current || self.current_context.is_none() {
            self.current_context = Some(ctx.name.clone());
        }
        self.contexts.retain(|c| c.name != ctx.name);
        self.contexts.push(ctx);
    }
}
