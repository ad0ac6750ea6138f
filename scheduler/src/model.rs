//! The input of every plan: a snapshot of the cluster (nodes, VMs, in-flight migrations, policy).
//!
//! Units are last in names: memory in MiB (`_mib`), bandwidth and dirty rate in MiB/s (`_mib_per_s`), times in
//! milliseconds (`_ms`), ratios in percent (`_percent`). Everything is plain data with serde so the cluster-agent
//! can store snapshots and plans in Raft and send them over gRPC.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default number of concurrent live migrations a node takes part in (both directions), as in the reference
/// design: one at a time, so at most ⌊n/2⌋ run concurrently in an n-node cluster.
pub const DEFAULT_MAX_LIVE_MIGRATIONS_PER_NODE: u32 = 1;
/// Default CPU overcommit: 4 vCPUs per logical CPU.
pub const DEFAULT_CPU_OVERCOMMIT_PERCENT: u32 = 400;
/// Default memory overcommit: none.
pub const DEFAULT_MEMORY_OVERCOMMIT_PERCENT: u32 = 100;
/// Largest accepted overcommit ratio (a typo guard).
pub const MAX_OVERCOMMIT_PERCENT: u32 = 10_000;
/// Largest accepted per-node live-migration limit.
pub const MAX_LIVE_MIGRATIONS_PER_NODE_LIMIT: u32 = 64;
/// Largest accepted memory, bandwidth or dirty rate figure (1 EiB in MiB): keeps every sum far from overflow.
pub const MAX_QUANTITY: u64 = 1 << 40;
/// Largest accepted CPU or vCPU count.
pub const MAX_CPUS: u32 = 1 << 20;
/// Largest accepted number of nodes in a snapshot.
pub const MAX_NODES: usize = 10_000;
/// Largest accepted number of VMs in a snapshot.
pub const MAX_VMS: usize = 1_000_000;
/// Default hysteresis margin of the balancer, in basis points of load (5 %).
pub const DEFAULT_BALANCE_MARGIN_BP: u32 = 500;
/// Default cost the balancer charges a move, per second of its estimated live-migration time, in basis points
/// of load (1 % per second: a 1 GiB VM over a 1 GiB/s link must gain more than 1 %).
pub const DEFAULT_MIGRATION_COST_BP_PER_S: u32 = 100;
/// Default time a VM stays on a node after a migration before the balancer moves it again (5 minutes).
pub const DEFAULT_MIN_DWELL_MS: u64 = 300_000;
/// Largest accepted migration cost (100 % of load per second).
pub const MAX_MIGRATION_COST_BP_PER_S: u32 = 10_000;

/// Cluster node identifier.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// VM identifier (the VM's cluster-wide name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct VmId(pub String);

impl VmId {
    /// Builds an id from anything string-like.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VM {}", self.0)
    }
}

/// Administrative/health state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Member of the cluster and accepting VMs.
    Up,
    /// Paused for maintenance: keeps running what it has, takes nothing new.
    Paused,
    /// Not a live member (crashed, partitioned, powered off).
    Down,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Up => "up",
            NodeState::Paused => "paused",
            NodeState::Down => "down",
        })
    }
}

/// CPU vendor; live migration never crosses vendors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuVendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD.
    Amd,
}

impl fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuVendor::Intel => "Intel",
            CpuVendor::Amd => "AMD",
        })
    }
}

/// Whether the node may be powered off when it is empty (power-saving balancing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PowerPolicy {
    /// Must stay on.
    #[default]
    AlwaysOn,
    /// May be powered off when no VM runs on it.
    MayPowerOff,
}

/// An IPv4 subnet in CIDR form (`10.0.2.0/24`). Host bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// A subnet string that is not `a.b.c.d/len` with zero host bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// No `/` separator.
    #[error("subnet {0:?} is not in CIDR form a.b.c.d/len")]
    NotCidr(String),
    /// The address part did not parse.
    #[error("subnet {text:?} has an invalid address")]
    BadAddress {
        /// The whole input.
        text: String,
        /// Parser error.
        #[source]
        source: std::net::AddrParseError,
    },
    /// The prefix length is not 0..=32.
    #[error("subnet {0:?} has a prefix length outside 0..=32")]
    BadPrefix(String),
    /// Address has bits set below the prefix.
    #[error("subnet {0:?} has host bits set (write the network address)")]
    HostBitsSet(String),
}

impl Subnet {
    /// Builds a subnet, refusing host bits below the prefix.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, SubnetError> {
        let s = Self {
            network,
            prefix_len,
        };
        if prefix_len > 32 {
            return Err(SubnetError::BadPrefix(s.to_string()));
        }
        if u32::from(network) & !s.mask() != 0 {
            return Err(SubnetError::HostBitsSet(s.to_string()));
        }
        Ok(s)
    }

    fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// Network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// Prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` lies in this subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| SubnetError::NotCidr(text.to_owned()))?;
        let network = addr.parse().map_err(|source| SubnetError::BadAddress {
            text: text.to_owned(),
            source,
        })?;
        let prefix_len: u8 = len
            .parse()
            .map_err(|_| SubnetError::BadPrefix(text.to_owned()))?;
        if prefix_len > 32 {
            return Err(SubnetError::BadPrefix(text.to_owned()));
        }
        Self::new(network, prefix_len)
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Subnet> for String {
    fn from(value: Subnet) -> Self {
        value.to_string()
    }
}

/// A cluster node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Identifier.
    pub id: NodeId,
    /// Up / paused / down.
    pub state: NodeState,
    /// Logical CPUs.
    pub cpus_logical: u32,
    /// Physical memory.
    pub memory_mib: u64,
    /// Memory kept for the host (parent partition); never given to VMs.
    #[serde(default)]
    pub reserved_memory_mib: u64,
    /// CPU vendor.
    pub cpu_vendor: CpuVendor,
    /// CPU feature flags offered to guests (`avx2`, `aes`, ...).
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    /// Management network.
    pub management_subnet: Subnet,
    /// Live-migration network.
    pub migration_subnet: Subnet,
    /// Whether it may be powered off when empty.
    #[serde(default)]
    pub power: PowerPolicy,
    /// Measured migration bandwidth (one migration stream using the whole link).
    pub migration_bandwidth_mib_per_s: u64,
    /// Measured fixed cost of a migration on this node beyond moving memory (the cluster's
    /// commits, process start, connection set-up); a move between two nodes costs the
    /// larger of their two.
    #[serde(default)]
    pub migration_overhead_ms: u64,
    /// VM networks the node can attach NICs to (names from its config).
    #[serde(default)]
    pub networks: BTreeSet<String>,
}

/// Order in which VMs are restarted after a failure; `None` means "do not restart automatically".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RestartPriority {
    /// Restart first.
    High,
    /// Restart second.
    #[default]
    Medium,
    /// Restart last.
    Low,
    /// Never restarted automatically.
    None,
}

/// Run state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Running: holds memory and vCPUs on its node.
    #[default]
    Running,
    /// Off (or saved): owned by a node but holds no resources there.
    Off,
}

/// A VM as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Identifier.
    pub id: VmId,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u64,
    /// Owning node.
    pub node: NodeId,
    /// Running or off.
    #[serde(default)]
    pub state: VmState,
    /// Restart order after a node failure.
    #[serde(default)]
    pub restart_priority: RestartPriority,
    /// Anti-affinity class names: VMs sharing a class are kept on different nodes where possible.
    #[serde(default)]
    pub anti_affinity: BTreeSet<String>,
    /// Preferred owner nodes, most preferred first.
    #[serde(default)]
    pub preferred_owners: Vec<NodeId>,
    /// Measured guest dirty rate, for migration time estimates.
    #[serde(default)]
    pub dirty_rate_mib_per_s: u64,
    /// Whether the VM can be live-migrated (otherwise only quick migration: save, move, restore).
    #[serde(default = "default_true")]
    pub live_migratable: bool,
    /// CPU features the VM was started with; a live-migration target must offer all of them.
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    /// Networks the VM's NICs are on; every node it runs on must have all of them.
    #[serde(default)]
    pub networks: BTreeSet<String>,
    /// Measured CPU demand: time its vCPU threads ran plus time they were runnable but waited for a CPU, per
    /// second, smoothed, in millicores (1000 = one vCPU always busy). `None` (not measured yet): every vCPU is
    /// counted busy. Values above `vcpus × 1000` are counted as `vcpus × 1000`.
    #[serde(default)]
    pub cpu_demand_millicores: Option<u64>,
    /// Measured guest memory the VM has touched (resident on its host). `None`: all of `memory_mib`. Values
    /// above `memory_mib` are counted as `memory_mib`. Capacity checks always use `memory_mib`.
    #[serde(default)]
    pub memory_touched_mib: Option<u64>,
    /// When the VM last arrived on its node by migration (same clock as `now_ms`); the balancer leaves it
    /// there until `policy.min_dwell_ms` later.
    #[serde(default)]
    pub moved_at_ms: Option<u64>,
}

impl Vm {
    /// CPU demand the planners count, in millicores (see `cpu_demand_millicores`).
    pub fn cpu_demand_mc(&self) -> u64 {
        let all = u64::from(self.vcpus) * 1000;
        self.cpu_demand_millicores.map_or(all, |d| d.min(all))
    }

    /// Memory demand the planners count, in MiB (see `memory_touched_mib`).
    pub fn memory_demand_mib(&self) -> u64 {
        self.memory_touched_mib
            .map_or(self.memory_mib, |m| m.min(self.memory_mib))
    }
}

fn default_true() -> bool {
    true
}

/// A live migration already running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    /// The VM being moved (its `node` is still the source).
    pub vm: VmId,
    /// Source node.
    pub from: NodeId,
    /// Target node.
    pub to: NodeId,
    /// When it is expected to finish.
    pub expected_end_ms: u64,
}

/// Load-balancing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalanceMode {
    /// No automatic balancing.
    #[default]
    None,
    /// Bring every node under a utilisation threshold, narrowing the spread.
    EvenDistribution,
    /// Consolidate onto as few nodes as possible; name the nodes that may be powered off.
    PowerSaving,
}

/// How hard the balancer works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggressiveness {
    /// Even distribution acts while the load spread exceeds 30 %; power saving fills targets up to 70 %.
    Low,
    /// Even distribution acts while the load spread exceeds 20 %; power saving fills targets up to 80 %.
    #[default]
    Medium,
    /// Even distribution acts while the load spread exceeds 10 %; power saving fills targets up to 90 %.
    High,
}

impl Aggressiveness {
    /// Imbalance target of even distribution: it moves VMs while the spread of demand load (most loaded Up
    /// node minus least loaded) is above this, in basis points.
    pub fn imbalance_target_bp(self) -> u32 {
        match self {
            Aggressiveness::Low => 3_000,
            Aggressiveness::Medium => 2_000,
            Aggressiveness::High => 1_000,
        }
    }

    /// Utilisation up to which power saving fills a node, in basis points.
    pub fn consolidation_fill_bp(self) -> u32 {
        match self {
            Aggressiveness::Low => 7_000,
            Aggressiveness::Medium => 8_000,
            Aggressiveness::High => 9_000,
        }
    }
}

/// Scheduling policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Concurrent live migrations a node may take part in, counting both directions and in-flight ones.
    pub max_live_migrations_per_node: u32,
    /// vCPUs per logical CPU, in percent (400 = 4:1).
    pub cpu_overcommit_percent: u32,
    /// Guest memory per usable host memory, in percent (100 = no overcommit).
    pub memory_overcommit_percent: u32,
    /// Balancing mode.
    pub balance: BalanceMode,
    /// Balancing aggressiveness.
    pub aggressiveness: Aggressiveness,
    /// Hysteresis: a balancing move must leave both nodes at least this far (basis points) inside the old range.
    pub balance_margin_bp: u32,
    /// Cost of a balancing move per second of its estimated live-migration time, in basis points of load; a
    /// move is made only if its gain is larger.
    pub migration_cost_bp_per_s: u32,
    /// A VM that arrived by migration less than this long ago is not moved by the balancer.
    pub min_dwell_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_live_migrations_per_node: DEFAULT_MAX_LIVE_MIGRATIONS_PER_NODE,
            cpu_overcommit_percent: DEFAULT_CPU_OVERCOMMIT_PERCENT,
            memory_overcommit_percent: DEFAULT_MEMORY_OVERCOMMIT_PERCENT,
            balance: BalanceMode::default(),
            aggressiveness: Aggressiveness::default(),
            balance_margin_bp: DEFAULT_BALANCE_MARGIN_BP,
            migration_cost_bp_per_s: DEFAULT_MIGRATION_COST_BP_PER_S,
            min_dwell_ms: DEFAULT_MIN_DWELL_MS,
        }
    }
}

/// Everything a plan is computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterSnapshot {
    /// Nodes.
    pub nodes: Vec<Node>,
    /// VMs.
    #[serde(default)]
    pub vms: Vec<Vm>,
    /// In-flight live migrations.
    #[serde(default)]
    pub migrations: Vec<Migration>,
    /// Policy.
    #[serde(default)]
    pub policy: Policy,
}

/// A snapshot that cannot be planned on; each variant names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Two nodes share an id.
    #[error("{0} appears more than once")]
    DuplicateNode(NodeId),
    /// Two VMs share an id.
    #[error("{0} appears more than once")]
    DuplicateVm(VmId),
    /// A VM's owner is not in the node list.
    #[error("{vm} is owned by {node}, which is not in the snapshot")]
    VmOnUnknownNode {
        /// VM.
        vm: VmId,
        /// Its unknown node.
        node: NodeId,
    },
    /// A node with no CPUs or memory.
    #[error("{0} has zero logical CPUs or zero memory")]
    EmptyNode(NodeId),
    /// Reserved memory at least the physical memory.
    #[error("{node} reserves {reserved_mib} MiB of its {memory_mib} MiB for the host, leaving nothing for VMs")]
    ReservedTooLarge {
        /// Node.
        node: NodeId,
        /// Reserved.
        reserved_mib: u64,
        /// Physical.
        memory_mib: u64,
    },
    /// Zero migration bandwidth.
    #[error("{0} has a measured migration bandwidth of 0 MiB/s")]
    ZeroBandwidth(NodeId),
    /// A VM with no vCPU or no memory.
    #[error("{0} has zero vCPUs or zero memory")]
    EmptyVm(VmId),
    /// A migration of a VM not in the snapshot.
    #[error("in-flight migration of {0}, which is not in the snapshot")]
    MigrationOfUnknownVm(VmId),
    /// A migration whose source is not the VM's owner, whose target is unknown, or source equals target.
    #[error("in-flight migration of {vm} from {from} to {to} does not match the VM's owner ({owner}) or names an unknown or identical target")]
    MigrationMismatch {
        /// VM.
        vm: VmId,
        /// Claimed source.
        from: NodeId,
        /// Claimed target.
        to: NodeId,
        /// Actual owner.
        owner: NodeId,
    },
    /// A VM in two in-flight migrations.
    #[error("{0} is in more than one in-flight migration")]
    DuplicateMigration(VmId),
    /// Per-node migration limit outside 1..=64.
    #[error("max_live_migrations_per_node is {0}; it must be between 1 and {MAX_LIVE_MIGRATIONS_PER_NODE_LIMIT}")]
    BadMigrationLimit(u32),
    /// Overcommit ratio outside 1..=10000 %.
    #[error("{name} is {value} %; it must be between 1 and {MAX_OVERCOMMIT_PERCENT}")]
    BadOvercommit {
        /// Field name.
        name: &'static str,
        /// Value.
        value: u32,
    },
    /// A figure beyond the accepted range (a typo or a corrupted snapshot).
    #[error("{what} is {value}, above the accepted maximum {max}")]
    OutOfRange {
        /// Which field of which node or VM.
        what: String,
        /// Value.
        value: u64,
        /// Maximum.
        max: u64,
    },
    /// Too many nodes or VMs.
    #[error("the snapshot has {count} {what}, more than the {max} accepted")]
    TooMany {
        /// "nodes" or "VMs".
        what: &'static str,
        /// Count.
        count: usize,
        /// Maximum.
        max: usize,
    },
    /// Balance margin of 100 % or more.
    #[error("balance_margin_bp is {0}; it must be below 10000")]
    BadMargin(u32),
}

impl ClusterSnapshot {
    /// Checks the snapshot is consistent; every plan function calls this first.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let p = &self.policy;
        if !(1..=MAX_LIVE_MIGRATIONS_PER_NODE_LIMIT).contains(&p.max_live_migrations_per_node) {
            return Err(SnapshotError::BadMigrationLimit(
                p.max_live_migrations_per_node,
            ));
        }
        for (name, value) in [
            ("cpu_overcommit_percent", p.cpu_overcommit_percent),
            ("memory_overcommit_percent", p.memory_overcommit_percent),
        ] {
            if !(1..=MAX_OVERCOMMIT_PERCENT).contains(&value) {
                return Err(SnapshotError::BadOvercommit { name, value });
            }
        }
        if p.balance_margin_bp >= 10_000 {
            return Err(SnapshotError::BadMargin(p.balance_margin_bp));
        }
        if p.migration_cost_bp_per_s > MAX_MIGRATION_COST_BP_PER_S {
            return Err(SnapshotError::OutOfRange {
                what: "policy migration_cost_bp_per_s".to_owned(),
                value: u64::from(p.migration_cost_bp_per_s),
                max: u64::from(MAX_MIGRATION_COST_BP_PER_S),
            });
        }
        if p.min_dwell_ms > MAX_QUANTITY {
            return Err(SnapshotError::OutOfRange {
                what: "policy min_dwell_ms".to_owned(),
                value: p.min_dwell_ms,
                max: MAX_QUANTITY,
            });
        }
        if self.nodes.len() > MAX_NODES {
            return Err(SnapshotError::TooMany {
                what: "nodes",
                count: self.nodes.len(),
                max: MAX_NODES,
            });
        }
        if self.vms.len() > MAX_VMS {
            return Err(SnapshotError::TooMany {
                what: "VMs",
                count: self.vms.len(),
                max: MAX_VMS,
            });
        }
        let range = |what: &dyn Fn() -> String, value: u64, max: u64| {
            if value > max {
                Err(SnapshotError::OutOfRange {
                    what: what(),
                    value,
                    max,
                })
            } else {
                Ok(())
            }
        };
        let mut nodes = BTreeMap::new();
        for n in &self.nodes {
            range(
                &|| format!("{} memory_mib", n.id),
                n.memory_mib,
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} migration_bandwidth_mib_per_s", n.id),
                n.migration_bandwidth_mib_per_s,
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} cpus_logical", n.id),
                u64::from(n.cpus_logical),
                u64::from(MAX_CPUS),
            )?;
            if nodes.insert(n.id, n).is_some() {
                return Err(SnapshotError::DuplicateNode(n.id));
            }
            if n.cpus_logical == 0 || n.memory_mib == 0 {
                return Err(SnapshotError::EmptyNode(n.id));
            }
            if n.reserved_memory_mib >= n.memory_mib {
                return Err(SnapshotError::ReservedTooLarge {
                    node: n.id,
                    reserved_mib: n.reserved_memory_mib,
                    memory_mib: n.memory_mib,
                });
            }
            if n.migration_bandwidth_mib_per_s == 0 {
                return Err(SnapshotError::ZeroBandwidth(n.id));
            }
        }
        let mut vms = BTreeMap::new();
        for vm in &self.vms {
            range(
                &|| format!("{} memory_mib", vm.id),
                vm.memory_mib,
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} dirty_rate_mib_per_s", vm.id),
                vm.dirty_rate_mib_per_s,
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} cpu_demand_millicores", vm.id),
                vm.cpu_demand_millicores.unwrap_or(0),
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} memory_touched_mib", vm.id),
                vm.memory_touched_mib.unwrap_or(0),
                MAX_QUANTITY,
            )?;
            range(
                &|| format!("{} vcpus", vm.id),
                u64::from(vm.vcpus),
                u64::from(MAX_CPUS),
            )?;
            if vms.insert(&vm.id, vm).is_some() {
                return Err(SnapshotError::DuplicateVm(vm.id.clone()));
            }
            if vm.vcpus == 0 || vm.memory_mib == 0 {
                return Err(SnapshotError::EmptyVm(vm.id.clone()));
            }
            if !nodes.contains_key(&vm.node) {
                return Err(SnapshotError::VmOnUnknownNode {
                    vm: vm.id.clone(),
                    node: vm.node,
                });
            }
        }
        let mut migrating = BTreeSet::new();
        for m in &self.migrations {
            let vm = vms
                .get(&m.vm)
                .ok_or_else(|| SnapshotError::MigrationOfUnknownVm(m.vm.clone()))?;
            if vm.node != m.from || !nodes.contains_key(&m.to) || m.from == m.to {
                return Err(SnapshotError::MigrationMismatch {
                    vm: m.vm.clone(),
                    from: m.from,
                    to: m.to,
                    owner: vm.node,
                });
            }
            if !migrating.insert(&m.vm) {
                return Err(SnapshotError::DuplicateMigration(m.vm.clone()));
            }
        }
        Ok(())
    }
}
