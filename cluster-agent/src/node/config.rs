//! Agent configuration: a TOML file plus command-line flags that override it.
//!
//! [`RawConfig`] is what the file and the flags deserialize into (every key optional,
//! unknown keys refused); [`RawConfig::validate`] turns it into an [`AgentConfig`] or a
//! [`ConfigError`] that names the offending key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::state::KvmKind;

/// Liveness heartbeat interval. All-to-all, so its cost grows with the square of the
/// members: 200 ms keeps an idle follower of 16 under 1 % of a core (`idle-bench`). The
/// lease (half of `down_after`, 600 ms) then survives a 400 ms delay of the heartbeats
/// (500 ms at 100 ms); the Down time is set by `down_after`, not by the interval.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 200;
/// Silence threshold (see `liveness`: the self-fence lease is half of it). With the
/// failover grace (500 ms) a killed agent's VMs run elsewhere about 2 s after it dies.
pub const DEFAULT_DOWN_AFTER_MS: u64 = 1_200;
/// Default `restart_window_ms`.
pub const DEFAULT_RESTART_WINDOW_MS: u64 = 60_000;
/// openraft's heartbeat, sent on a wall-clock grid (`run_raft_heartbeats`). Followers
/// learn that the leader lives from the liveness heartbeats (`node::elections`); these
/// show its Raft core works (a follower without one for 3 intervals asks for votes).
/// At 200 ms the leader of 16 sent 75 a second.
pub const DEFAULT_RAFT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Elections (`node::elections`): a voter asks `election_timeout_max_ms` (the leader's
/// lease) plus a random timeout from this range (widened by ¾ of its minimum, as
/// openraft's tick did) after the last sign of a leader, so a dead leader's successor is
/// elected in time to mark it Down at `down_after`. 500–1000 ms made a killed leader's
/// Down ~300 ms later (`idle-bench`, 3 nodes).
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 400;
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 800;
pub const DEFAULT_SNAPSHOT_LOGS_SINCE_LAST: u64 = 5_000;
pub const DEFAULT_MAX_LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
pub const DEFAULT_RPC_TIMEOUT_MS: u64 = 2_000;
/// Largest config file accepted.
pub const CONFIG_FILE_LEN_MAX: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is {len} bytes; the limit is {CONFIG_FILE_LEN_MAX}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("missing required key `{key}` (set it in the config file or with --{flag})")]
    Missing {
        key: &'static str,
        flag: &'static str,
    },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Optional hardware facts that replace the probed ones (tests simulate other CPUs).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FactsOverride {
    pub cpu_vendor: Option<String>,
    pub cpu_model: Option<String>,
    pub logical_cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub kvm_kind: Option<KvmKind>,
}

/// A VM network of this node: NICs on network `name` are TAPs attached to host bridge
/// `bridge` (`[[networks]] name = "lan", bridge = "br-lan"`). The bridge must exist; the
/// agent never creates one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    pub bridge: String,
}

/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const IFNAME_BYTES_MAX: usize = 15;

/// True for Linux interface names the agent accepts (1..=15 bytes, no '/', ':' or space).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':'))
}

/// The config file as written; every key optional so flags can fill in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_id: Option<u64>,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub mgmt_addr: Option<String>,
    pub raft_addr: Option<String>,
    pub migration_addr: Option<String>,
    pub mgmt_subnet: Option<String>,
    pub migration_subnet: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    pub down_after_ms: Option<u64>,
    pub raft_heartbeat_interval_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub snapshot_logs_since_last: Option<u64>,
    pub max_logs_kept_after_snapshot: Option<u64>,
    pub rpc_timeout_ms: Option<u64>,
    pub facts_override: Option<FactsOverride>,
    /// Shared volumes (`[[volumes]] name = "vol", path = "/srv/csv/vol"`): every node
    /// of a cluster names the same volumes, reaching the same shared storage.
    pub volumes: Option<Vec<csv_volume::VolumeConfig>>,
    /// Prometheus `/metrics` listener (IP:port); unset: no metrics endpoint.
    pub metrics_addr: Option<String>,
    /// The web console's HTTPS listener (IP:port); unset: no console.
    pub console_addr: Option<String>,
    /// VM networks this node offers (`[[networks]] name = "lan", bridge = "br-lan"`).
    pub networks: Option<Vec<NetworkConfig>>,
    /// The argv list (no shell) that powers this host off, run by the Raft leader once
    /// the host is drained (`["ipmitool", "-I", "lanplus", "-H", "bmc-3", "-f",
    /// "/etc/bmc-pass", "chassis", "power", "soft"]`). Registered with the node, so
    /// every node can run it; set together with `power_on_command`.
    pub power_off_command: Option<Vec<String>>,
    /// The argv list that powers this host on, run by the Raft leader (another node):
    /// `["ipmitool", ..., "chassis", "power", "on"]` or `["wakeonlan", "aa:bb:cc:dd:ee:ff"]`.
    pub power_on_command: Option<Vec<String>>,
    /// The node's TLS credentials (`ca.pem`, `cert.pem`, `key.pem`, and `ca.key` on
    /// nodes that issue certificates); default `<data_dir>/tls`.
    pub tls_dir: Option<PathBuf>,
    /// Carry live migrations without TLS or authentication (default false): only on a
    /// migration network isolated from everything else.
    pub migration_insecure_plaintext: Option<bool>,
    /// Carry the peer (Raft) plane without TLS (default false): only on a peer network
    /// isolated from everything else. Callers are then identified by their source
    /// address alone (a member's `raft_addr` IP), not by a certificate; every node of the
    /// cluster must be set alike.
    pub raft_insecure_plaintext: Option<bool>,
    /// Directories VM kernels and initrds may come from (absolute); none: only the
    /// built-in test guest boots.
    pub image_dirs: Option<Vec<PathBuf>>,
    /// Lifetime of the node certificates this node issues when it holds the CA key (join
    /// tokens, rotations), in seconds: default one year, 10 s to 10 years.
    pub node_cert_validity_s: Option<u64>,
    /// Renew this node's certificate when less than this percentage of its lifetime is
    /// left (default 33, 5 to 80).
    pub cert_renew_percent_left: Option<u64>,
    /// Run each VM in a worker process of its own (default true), so VMs keep running
    /// while the agent restarts (live and quick migration and hot-plug work through it).
    pub vm_workers: Option<bool>,
    /// Where the workers' directories (control socket, start file, log) live; default
    /// `<data_dir>/vms`.
    pub worker_dir: Option<PathBuf>,
    /// Give each worker a cgroup with its VM's memory limit and CPU cap (default true;
    /// where the agent cannot write its cgroup tree it says why and runs without).
    pub worker_cgroups: Option<bool>,
    /// With `vm_workers`: on SIGTERM the agent announces a restart of up to this long
    /// (default 60000, at most 600000; 0: none): the cluster does not take the node for
    /// dead during it and its workers keep their VMs running until it ends.
    pub restart_window_ms: Option<u64>,
    /// How the log on stderr is written: "text" (default) or "json" (one object per
    /// line). Colours only when stderr is a terminal, in either format.
    pub log_format: Option<String>,
}

/// An IP subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR form, e.g. 127.0.1.0/24"))?;
        let network: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        let prefix_len: u8 = len
            .parse()
            .map_err(|_| format!("{len:?} is not a prefix length"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("prefix length {prefix_len} exceeds {max}"));
        }
        Ok(Subnet {
            network,
            prefix_len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: u64,
    pub name: String,
    pub data_dir: PathBuf,
    pub mgmt_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub migration_addr: SocketAddr,
    pub mgmt_subnet: Subnet,
    pub migration_subnet: Subnet,
    pub heartbeat_interval: Duration,
    pub down_after: Duration,
    pub raft_heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub max_logs_kept_after_snapshot: u64,
    pub rpc_timeout: Duration,
    pub facts_override: FactsOverride,
    pub volumes: Vec<csv_volume::VolumeConfig>,
    pub metrics_addr: Option<SocketAddr>,
    /// See [`RawConfig::console_addr`].
    pub console_addr: Option<SocketAddr>,
    pub networks: Vec<NetworkConfig>,
    /// See [`RawConfig::power_off_command`] and [`RawConfig::power_on_command`].
    pub power: crate::state::power::PowerCommands,
    /// Where this node's TLS credentials are (see [`RawConfig::tls_dir`]).
    pub tls_dir: PathBuf,
    /// See [`RawConfig::migration_insecure_plaintext`].
    pub migration_insecure_plaintext: bool,
    /// See [`RawConfig::raft_insecure_plaintext`].
    pub raft_insecure_plaintext: bool,
    /// See [`RawConfig::image_dirs`].
    pub image_dirs: Vec<PathBuf>,
    /// See [`RawConfig::node_cert_validity_s`].
    pub node_cert_validity: Duration,
    /// See [`RawConfig::cert_renew_percent_left`].
    pub cert_renew_percent_left: u64,
    /// See [`RawConfig::vm_workers`].
    pub vm_workers: bool,
    /// See [`RawConfig::worker_dir`].
    pub worker_dir: PathBuf,
    /// See [`RawConfig::worker_cgroups`].
    pub worker_cgroups: bool,
    /// See [`RawConfig::restart_window_ms`].
    pub restart_window: Duration,
    /// See [`RawConfig::log_format`].
    pub log_format: crate::logging::LogFormat,
}

impl AgentConfig {
    /// The address this agent's outgoing management and peer connections leave from:
    /// the IP of `mgmt_addr`, unless it is a wildcard (then the kernel chooses). Each
    /// plane's traffic then carries its node's address, so a firewall (or the partition
    /// tests) can tell nodes apart by source.
    pub fn mgmt_source_ip(&self) -> Option<IpAddr> {
        source_ip(self.mgmt_addr)
    }

    /// The source address of outgoing peer-plane (Raft) connections: the IP of
    /// `raft_addr` unless it is a wildcard.
    pub fn raft_source_ip(&self) -> Option<IpAddr> {
        source_ip(self.raft_addr)
    }

    /// The source address of outgoing migration connections: the IP of
    /// `migration_addr` unless it is a wildcard.
    pub fn migration_source_ip(&self) -> Option<IpAddr> {
        source_ip(self.migration_addr)
    }
}

/// `addr`'s IP as a source address, `None` for a wildcard (0.0.0.0, ::).
pub fn source_ip(addr: SocketAddr) -> Option<IpAddr> {
    (!addr.ip().is_unspecified()).then_some(addr.ip())
}

impl RawConfig {
    /// Read and parse a TOML config file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > CONFIG_FILE_LEN_MAX {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<RawConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Overlay `other`'s set keys on top of `self` (flags over file).
    pub fn overlay(mut self, other: RawConfig) -> RawConfig {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            node_id,
            name,
            data_dir,
            mgmt_addr,
            raft_addr,
            migration_addr,
            mgmt_subnet,
            migration_subnet,
            heartbeat_interval_ms,
            down_after_ms,
            raft_heartbeat_interval_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            snapshot_logs_since_last,
            max_logs_kept_after_snapshot,
            rpc_timeout_ms,
            facts_override,
            volumes,
            metrics_addr,
            console_addr,
            networks,
            power_off_command,
            power_on_command,
            tls_dir,
            migration_insecure_plaintext,
            raft_insecure_plaintext,
            image_dirs,
            vm_workers,
            worker_dir,
            worker_cgroups,
            restart_window_ms,
            log_format
        );
        self
    }

    /// Check every key and build the typed config.
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let node_id = self.node_id.ok_or(ConfigError::Missing {
            key: "node_id",
            flag: "node-id",
        })?;
        if node_id == 0 {
            return Err(invalid("node_id", "0 is reserved; use 1 or higher"));
        }
        let name = self.name.unwrap_or_else(|| format!("node-{node_id}"));
        if name.is_empty() || name.len() > 63 {
            return Err(invalid("name", "must be 1 to 63 characters"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "name",
                format!("{name:?} may contain only letters, digits, '-', '_' and '.'"),
            ));
        }
        let data_dir = self.data_dir.ok_or(ConfigError::Missing {
            key: "data_dir",
            flag: "data-dir",
        })?;
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let mgmt_addr = addr("mgmt_addr", "mgmt-addr", self.mgmt_addr)?;
        let raft_addr = addr("raft_addr", "raft-addr", self.raft_addr)?;
        let migration_addr = addr("migration_addr", "migration-addr", self.migration_addr)?;
        if mgmt_addr == raft_addr {
            return Err(invalid(
                "raft_addr",
                format!("must differ from mgmt_addr ({mgmt_addr}): the Raft service has its own listener"),
            ));
        }
        if migration_addr == mgmt_addr || migration_addr == raft_addr {
            return Err(invalid(
                "migration_addr",
                "must differ from mgmt_addr and raft_addr",
            ));
        }
        let mgmt_subnet = subnet("mgmt_subnet", self.mgmt_subnet, mgmt_addr)?;
        let migration_subnet = subnet("migration_subnet", self.migration_subnet, migration_addr)?;
        if !mgmt_subnet.contains(mgmt_addr.ip()) {
            return Err(invalid(
                "mgmt_addr",
                format!("{} is outside mgmt_subnet {mgmt_subnet}", mgmt_addr.ip()),
            ));
        }
        if !migration_subnet.contains(migration_addr.ip()) {
            return Err(invalid(
                "migration_addr",
                format!(
                    "{} is outside migration_subnet {migration_subnet}",
                    migration_addr.ip()
                ),
            ));
        }
        let heartbeat_interval_ms = ranged(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            DEFAULT_HEARTBEAT_INTERVAL_MS,
            10,
            60_000,
        )?;
        let down_after_ms = ranged(
            "down_after_ms",
            self.down_after_ms,
            DEFAULT_DOWN_AFTER_MS,
            100,
            3_600_000,
        )?;
        if down_after_ms < 2 * heartbeat_interval_ms {
            return Err(invalid(
                "down_after_ms",
                format!(
                    "{down_after_ms} must be at least twice heartbeat_interval_ms ({heartbeat_interval_ms})"
                ),
            ));
        }
        let raft_heartbeat_interval_ms = ranged(
            "raft_heartbeat_interval_ms",
            self.raft_heartbeat_interval_ms,
            DEFAULT_RAFT_HEARTBEAT_INTERVAL_MS,
            10,
            10_000,
        )?;
        let election_timeout_min_ms = ranged(
            "election_timeout_min_ms",
            self.election_timeout_min_ms,
            DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            50,
            60_000,
        )?;
        let election_timeout_max_ms = ranged(
            "election_timeout_max_ms",
            self.election_timeout_max_ms,
            DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            51,
            120_000,
        )?;
        if election_timeout_max_ms <= election_timeout_min_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                format!("{election_timeout_max_ms} must exceed election_timeout_min_ms ({election_timeout_min_ms})"),
            ));
        }
        if election_timeout_max_ms < 2 * heartbeat_interval_ms {
            // A leader answers a follower's heartbeat once a round: its lease
            // (`election_timeout_max_ms`, see `node::elections`) must span two rounds.
            return Err(invalid(
                "election_timeout_max_ms",
                format!("{election_timeout_max_ms} must be at least twice heartbeat_interval_ms ({heartbeat_interval_ms})"),
            ));
        }
        let snapshot_logs_since_last = ranged(
            "snapshot_logs_since_last",
            self.snapshot_logs_since_last,
            DEFAULT_SNAPSHOT_LOGS_SINCE_LAST,
            10,
            10_000_000,
        )?;
        let max_logs_kept_after_snapshot = ranged(
            "max_logs_kept_after_snapshot",
            self.max_logs_kept_after_snapshot,
            DEFAULT_MAX_LOGS_KEPT_AFTER_SNAPSHOT,
            0,
            10_000_000,
        )?;
        let rpc_timeout_ms = ranged(
            "rpc_timeout_ms",
            self.rpc_timeout_ms,
            DEFAULT_RPC_TIMEOUT_MS,
            50,
            600_000,
        )?;
        let facts_override = self.facts_override.unwrap_or_default();
        if let Some(v) = &facts_override.cpu_vendor {
            if v.is_empty() {
                return Err(invalid("facts_override.cpu_vendor", "must not be empty"));
            }
        }
        if facts_override.logical_cpus == Some(0) {
            return Err(invalid("facts_override.logical_cpus", "must be at least 1"));
        }
        let volumes = self.volumes.unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        for v in &volumes {
            if let Err(e) = csv_volume::name::validate_volume_name(&v.name) {
                return Err(invalid("volumes.name", format!("{:?}: {e}", v.name)));
            }
            if !seen.insert(v.name.clone()) {
                return Err(invalid(
                    "volumes.name",
                    format!("volume {:?} is listed twice", v.name),
                ));
            }
        }
        let metrics_addr = match self.metrics_addr {
            None => None,
            Some(v) => {
                let a = addr("metrics_addr", "metrics-addr", Some(v))?;
                if a == mgmt_addr || a == raft_addr || a == migration_addr {
                    return Err(invalid(
                        "metrics_addr",
                        format!("{a} is already used by another listener of this agent"),
                    ));
                }
                Some(a)
            }
        };
        let console_addr = match self.console_addr {
            None => None,
            Some(v) => {
                let a = addr("console_addr", "console-addr", Some(v))?;
                if a == mgmt_addr
                    || a == raft_addr
                    || a == migration_addr
                    || Some(a) == metrics_addr
                {
                    return Err(invalid(
                        "console_addr",
                        format!("{a} is already used by another listener of this agent"),
                    ));
                }
                Some(a)
            }
        };
        let networks = self.networks.unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        for n in &networks {
            if !crate::state::vm_spec::valid_network_name(&n.name) {
                return Err(invalid(
                    "networks",
                    format!(
                        "network name {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
                        n.name,
                        crate::state::vm_spec::NETWORK_NAME_BYTES_MAX
                    ),
                ));
            }
            if !valid_ifname(&n.bridge) {
                return Err(invalid(
                    "networks",
                    format!(
                        "bridge {:?} of network {:?} is not an interface name (1 to {IFNAME_BYTES_MAX} bytes, no '/', ':' or spaces)",
                        n.bridge, n.name
                    ),
                ));
            }
            if !seen.insert(n.name.as_str()) {
                return Err(invalid(
                    "networks",
                    format!("network {:?} is listed twice", n.name),
                ));
            }
        }
        let power = crate::state::power::PowerCommands {
            off: self.power_off_command.unwrap_or_default(),
            on: self.power_on_command.unwrap_or_default(),
        };
        if let Err(reason) = power.validate() {
            return Err(invalid("power_off_command", reason));
        }
        let tls_dir = match self.tls_dir {
            Some(d) if d.as_os_str().is_empty() => {
                return Err(invalid("tls_dir", "must not be empty"))
            }
            Some(d) => d,
            None => data_dir.join("tls"),
        };
        let image_dirs = self.image_dirs.unwrap_or_default();
        if let Some(d) = image_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(invalid(
                "image_dirs",
                format!("{} is not an absolute path", d.display()),
            ));
        }
        let node_cert_validity_s = self
            .node_cert_validity_s
            .unwrap_or(NODE_CERT_VALIDITY_DEFAULT_S);
        if !(10..=10 * 365 * 86_400).contains(&node_cert_validity_s) {
            return Err(invalid(
                "node_cert_validity_s",
                format!("{node_cert_validity_s} is not 10 s to 10 years (315360000)"),
            ));
        }
        let cert_renew_percent_left = self.cert_renew_percent_left.unwrap_or(33);
        if !(5..=80).contains(&cert_renew_percent_left) {
            return Err(invalid(
                "cert_renew_percent_left",
                format!("{cert_renew_percent_left} is not 5 to 80"),
            ));
        }
        let worker_dir = match self.worker_dir {
            Some(d) if !d.is_absolute() => {
                return Err(invalid(
                    "worker_dir",
                    format!("{} is not an absolute path", d.display()),
                ))
            }
            Some(d) => d,
            None => data_dir.join("vms"),
        };
        let restart_window_ms = self.restart_window_ms.unwrap_or(DEFAULT_RESTART_WINDOW_MS);
        if restart_window_ms > crate::state::RESTART_WINDOW_MS_MAX {
            return Err(invalid(
                "restart_window_ms",
                format!(
                    "{restart_window_ms} is more than {}",
                    crate::state::RESTART_WINDOW_MS_MAX
                ),
            ));
        }
        let log_format = match self.log_format.as_deref() {
            None => crate::logging::LogFormat::default(),
            Some(v) => crate::logging::LogFormat::parse(v).ok_or_else(|| {
                invalid(
                    "log_format",
                    format!(
                        "{v:?} is not a log format; use {}",
                        crate::logging::LogFormat::NAMES
                    ),
                )
            })?,
        };
        Ok(AgentConfig {
            log_format,
            node_cert_validity: Duration::from_secs(node_cert_validity_s),
            cert_renew_percent_left,
            restart_window: Duration::from_millis(restart_window_ms),
            vm_workers: self.vm_workers.unwrap_or(true),
            worker_dir,
            worker_cgroups: self.worker_cgroups.unwrap_or(true),
            image_dirs,
            migration_insecure_plaintext: self.migration_insecure_plaintext.unwrap_or(false),
            raft_insecure_plaintext: self.raft_insecure_plaintext.unwrap_or(false),
            tls_dir,
            networks,
            power,
            node_id,
            name,
            data_dir,
            mgmt_addr,
            raft_addr,
            migration_addr,
            mgmt_subnet,
            migration_subnet,
            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms),
            down_after: Duration::from_millis(down_after_ms),
            raft_heartbeat_interval_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            snapshot_logs_since_last,
            max_logs_kept_after_snapshot,
            rpc_timeout: Duration::from_millis(rpc_timeout_ms),
            facts_override,
            volumes,
            metrics_addr,
            console_addr,
        })
    }
}

/// Default lifetime of the node certificates an issuer signs: one year.
pub const NODE_CERT_VALIDITY_DEFAULT_S: u64 = 365 * 86_400;

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn addr(
    key: &'static str,
    flag: &'static str,
    v: Option<String>,
) -> Result<SocketAddr, ConfigError> {
    let v = v.ok_or(ConfigError::Missing { key, flag })?;
    let a: SocketAddr = v
        .parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an IP:port address")))?;
    if a.port() == 0 {
        return Err(invalid(
            key,
            format!("{v:?} needs an explicit port (not 0)"),
        ));
    }
    if a.ip().is_unspecified() {
        return Err(invalid(
            key,
            format!("{v:?} is a wildcard; peers need an address they can reach"),
        ));
    }
    Ok(a)
}

/// A subnet; when absent, the /24 (IPv4) or /64 (IPv6) around the address.
fn subnet(key: &'static str, v: Option<String>, around: SocketAddr) -> Result<Subnet, ConfigError> {
    match v {
        Some(s) => Subnet::parse(&s).map_err(|reason| invalid(key, reason)),
        None => Ok(match around.ip() {
            IpAddr::V4(ip) => {
                let o = ip.octets();
                Subnet {
                    network: IpAddr::from([o[0], o[1], o[2], 0]),
                    prefix_len: 24,
                }
            }
            IpAddr::V6(ip) => Subnet {
                network: IpAddr::V6(std::net::Ipv6Addr::from(u128::from(ip) & (u128::MAX << 64))),
                prefix_len: 64,
            },
        }),
    }
}

fn ranged(
    key: &'static str,
    v: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let v = v.unwrap_or(default);
    if v < min || v > max {
        return Err(invalid(key, format!("{v} is outside {min}..={max}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example config, with its optional sections switched on, is valid.
    #[test]
    fn deploy_example_config_is_valid() {
        let text = include_str!("../../../deploy/agent.example.toml");
        let on = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| !r.contains(' ') || r.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        for t in [text.to_owned(), on] {
            let raw =
                RawConfig::from_toml(&t).unwrap_or_else(|e| panic!("example config: {e}\n{t}"));
            let cfg = raw
                .validate()
                .unwrap_or_else(|e| panic!("example config: {e}\n{t}"));
            assert_eq!(cfg.node_id, 1);
        }
    }

    const GOOD: &str = r#"
node_id = 3
name = "n3"
data_dir = "/tmp/x"
mgmt_addr = "127.0.1.3:7001"
raft_addr = "127.0.1.3:7002"
migration_addr = "127.0.2.3:7003"
mgmt_subnet = "127.0.1.0/24"
migration_subnet = "127.0.2.0/24"
down_after_ms = 1500
[facts_override]
cpu_vendor = "GenuineIntel"
"#;

    fn err(text: &str) -> String {
        match RawConfig::from_toml(text) {
            Err(e) => e.to_string(),
            Ok(raw) => match raw.validate() {
                Ok(_) => "ok".into(),
                Err(e) => e.to_string(),
            },
        }
    }

    #[test]
    fn the_election_lease_must_span_two_heartbeat_rounds() {
        let with = |keys: &str| {
            GOOD.replace(
                "down_after_ms = 1500\n",
                &format!("down_after_ms = 1500\n{keys}"),
            )
        };
        let e = err(&with("heartbeat_interval_ms = 500\n"));
        assert!(
            e.contains("election_timeout_max_ms")
                && e.contains("twice heartbeat_interval_ms (500)"),
            "{e}"
        );
        // Raft heartbeats slower than the elections are fine now (they only show the
        // leader's Raft core works).
        let c = RawConfig::from_toml(&with("raft_heartbeat_interval_ms = 1000\n"))
            .map(|r| r.validate());
        assert!(
            matches!(c, Ok(Ok(ref c)) if c.raft_heartbeat_interval_ms == 1000),
            "{c:?}"
        );
    }

    #[test]
    fn volumes_are_read_and_bad_ones_name_the_key() {
        let with = |v: &str| format!("{GOOD}{v}");
        let c = RawConfig::from_toml(&with("[[volumes]]\nname = \"vol\"\npath = \"/srv/csv\"\n"))
            .map(|r| r.validate());
        let vols = match c {
            Ok(Ok(c)) => c.volumes,
            other => panic!("{other:?}"),
        };
        assert_eq!(vols.len(), 1);
        assert_eq!(vols[0].name, "vol");
        let e = err(&with("[[volumes]]\nname = \"a/b\"\npath = \"/x\"\n"));
        assert!(e.contains("volumes.name"), "{e}");
        let e = err(&with(
            "[[volumes]]\nname = \"v\"\npath = \"/x\"\n[[volumes]]\nname = \"v\"\npath = \"/y\"\n",
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&with(
            "[[volumes]]\nname = \"v\"\npath = \"/x\"\nsize = 1\n",
        ));
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn networks_are_read_and_bad_ones_name_the_problem() {
        let with = |v: &str| format!("{GOOD}{v}");
        let c = RawConfig::from_toml(&with("[[networks]]\nname = \"lan\"\nbridge = \"br-lan\"\n"))
            .map(|r| r.validate());
        let nets = match c {
            Ok(Ok(c)) => c.networks,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            nets,
            vec![NetworkConfig {
                name: "lan".into(),
                bridge: "br-lan".into()
            }]
        );
        let e = err(&with("[[networks]]\nname = \"a b\"\nbridge = \"br0\"\n"));
        assert!(e.contains("networks") && e.contains("\"a b\""), "{e}");
        let e = err(&with(
            "[[networks]]\nname = \"lan\"\nbridge = \"a-bridge-name-too-long\"\n",
        ));
        assert!(e.contains("a-bridge-name-too-long"), "{e}");
        let e = err(&with(
            "[[networks]]\nname = \"lan\"\nbridge = \"br0\"\n[[networks]]\nname = \"lan\"\nbridge = \"br1\"\n",
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&with(
            "[[networks]]\nname = \"lan\"\nbridge = \"br0\"\nvlan = 3\n",
        ));
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn good_config_validates() {
        let c = RawConfig::from_toml(GOOD)
            .map_err(|e| e.to_string())
            .and_then(|r| r.validate().map_err(|e| e.to_string()));
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("good config refused: {e}"),
        };
        assert_eq!(c.node_id, 3);
        assert_eq!(c.down_after, Duration::from_millis(1500));
        assert_eq!(
            c.heartbeat_interval,
            Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS)
        );
        assert_eq!(c.facts_override.cpu_vendor.as_deref(), Some("GenuineIntel"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{GOOD}\nbogus_key = 1\n"));
        assert!(e.contains("bogus_key"), "{e}");
        let e = err(&GOOD.replace("cpu_vendor", "cpu_vendr"));
        assert!(e.contains("cpu_vendr"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("node_id = 3", "node_id = 0", "node_id"),
            ("\"127.0.1.3:7001\"", "\"nonsense\"", "mgmt_addr"),
            ("\"127.0.2.3:7003\"", "\"127.0.9.3:7003\"", "migration_addr"),
            ("\"127.0.1.0/24\"", "\"127.0.1.0/99\"", "mgmt_subnet"),
            ("down_after_ms = 1500", "down_after_ms = 5", "down_after_ms"),
            ("name = \"n3\"", "name = \"bad name\"", "name"),
            ("\"127.0.1.3:7002\"", "\"127.0.1.3:7001\"", "raft_addr"),
        ];
        for (from, to, key) in cases {
            let e = err(&GOOD.replace(from, to));
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        let e = err(&GOOD.replace("node_id = 3", "node_id = \"three\""));
        assert!(e.contains("node_id"), "{e}");
    }

    #[test]
    fn console_addr_is_optional_checked_and_distinct() {
        let ok = |t: &str| RawConfig::from_toml(t).ok().and_then(|r| r.validate().ok());
        assert_eq!(ok(GOOD).and_then(|c| c.console_addr), None);
        let with = |v: &str| {
            GOOD.replace(
                "[facts_override]",
                &format!("console_addr = \"{v}\"\n[facts_override]"),
            )
        };
        assert_eq!(
            ok(&with("127.0.1.3:7005")).and_then(|c| c.console_addr),
            "127.0.1.3:7005".parse().ok()
        );
        let e = err(&with("127.0.1.3"));
        assert!(e.contains("console_addr"), "{e}");
        let e = err(&with("127.0.1.3:7001"));
        assert!(
            e.contains("console_addr") && e.contains("already used"),
            "{e}"
        );
    }

    #[test]
    fn metrics_addr_is_optional_checked_and_distinct() {
        let ok = |t: &str| RawConfig::from_toml(t).ok().and_then(|r| r.validate().ok());
        assert_eq!(ok(GOOD).and_then(|c| c.metrics_addr), None);
        let with = |v: &str| {
            GOOD.replace(
                "[facts_override]",
                &format!("metrics_addr = \"{v}\"\n[facts_override]"),
            )
        };
        assert_eq!(
            ok(&with("127.0.1.3:9101")).and_then(|c| c.metrics_addr),
            "127.0.1.3:9101".parse().ok()
        );
        let e = err(&with("nope"));
        assert!(e.contains("metrics_addr"), "{e}");
        let e = err(&with("127.0.1.3:7001"));
        assert!(
            e.contains("metrics_addr") && e.contains("already used"),
            "{e}"
        );
    }

    #[test]
    fn missing_keys_name_the_flag() {
        let e = err(&GOOD.replace("data_dir = \"/tmp/x\"", ""));
        assert!(e.contains("`data_dir`") && e.contains("--data-dir"), "{e}");
    }

    #[test]
    fn flags_override_file() {
        let file = RawConfig::from_toml(GOOD).unwrap_or_default();
        let flags = RawConfig {
            node_id: Some(7),
            ..RawConfig::default()
        };
        let c = file.overlay(flags).validate();
        assert_eq!(c.map(|c| c.node_id).ok(), Some(7));
    }

    #[test]
    fn subnet_contains() {
        let s = Subnet::parse("10.1.0.0/16").unwrap_or(Subnet {
            network: IpAddr::from([0, 0, 0, 0]),
            prefix_len: 32,
        });
        assert!(s.contains("10.1.200.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!s.contains("10.2.0.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
    }
}
