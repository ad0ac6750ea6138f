//! Test harness: start, stop, kill -9 and restart real `cluster-agent` processes on
//! loopback addresses (127.0.1.x management/raft, 127.0.2.x migration), and talk to
//! them through the public management API.
//!
//! Each node's addresses and data dir stay fixed for the life of a [`Cluster`], so a
//! restarted agent comes back as the same member. Agent logs go to
//! `<tempdir>/node-<id>.log`; [`Cluster::log_tail`] shows them when a test fails.

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_proto::management as pb;
use cluster_proto::management::management_service_client::ManagementServiceClient;
use tonic::transport::Channel;

pub mod browser;
pub mod checker;
pub mod netns;
pub mod partition;
pub mod pki;
pub mod vm;
pub mod wait;

pub use wait::{Wait, WAIT};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("the {name} binary was not found at {path}; build it first (`cargo build -p {package}`) or run the whole suite with `cargo test --workspace`")]
    BinaryMissing {
        name: String,
        package: String,
        path: PathBuf,
    },
    #[error("cannot locate the target directory from the test executable")]
    NoTargetDir(#[source] std::io::Error),
    #[error("I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node {0} is not part of this test cluster")]
    UnknownNode(u64),
    #[error("node {id}: {what} did not happen within {waited_ms} ms; last error: {last}")]
    Timeout {
        id: u64,
        what: String,
        waited_ms: u64,
        last: String,
    },
    #[error("{what} did not happen within {waited_ms} ms; last seen: {last}")]
    WaitTimeout {
        what: String,
        waited_ms: u64,
        last: String,
    },
    #[error("node {id} answered {rpc} with an error: {status}")]
    Rpc {
        id: u64,
        rpc: &'static str,
        status: tonic::Status,
    },
    #[error("{what} failed: {detail}")]
    Firewall { what: String, detail: String },
    #[error("node {id} is not reachable")]
    Connect {
        id: u64,
        #[source]
        source: tonic::transport::Error,
    },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for the whole of a multi-process test: see [`serial`].
pub struct SerialGuard {
    _in_process: tokio::sync::MutexGuard<'static, ()>,
    /// An exclusive `flock` on [`SERIAL_LOCK_PATH`], released when the file closes.
    _across_processes: std::fs::File,
}

/// The agents' test hook that holds a VM's live migrations in pre-copy
/// (`cluster-agent/src/crash_point.rs`): its source finds the VM's first page dirty after
/// every round, so under a 1 ms blackout cap the migration never converges, whatever the
/// guest does (a guest a loaded machine leaves unscheduled dirties nothing, and a round
/// with nothing dirty switches over).
pub const HOLD_PRECOPY_ENV: &str = "CLUSTER_AGENT_HOLD_PRECOPY";

/// The file every test process locks: the tests bind fixed loopback addresses
/// (127.0.1.x, 127.0.2.x), so two test binaries (or two checkouts) must not run
/// cluster tests at the same time.
pub const SERIAL_LOCK_PATH: &str = "/tmp/vmcluster-tests.lock";

/// Hold this for the whole test to run multi-process tests one at a time, within a
/// test binary and across test processes: the CI machine has 2 cores, elections need
/// CPU on time, and every cluster test uses the same loopback addresses.
pub async fn serial() -> SerialGuard {
    let in_process = SERIAL.lock().await;
    let file = tokio::task::spawn_blocking(|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SERIAL_LOCK_PATH)?;
        f.lock()?;
        Ok::<_, std::io::Error>(f)
    })
    .await;
    let across = match file {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => panic!("cannot lock {SERIAL_LOCK_PATH}: {e}"),
        Err(e) => panic!("cannot lock {SERIAL_LOCK_PATH}: {e}"),
    };
    SerialGuard {
        _in_process: in_process,
        _across_processes: across,
    }
}

/// Locate a workspace binary next to the running test executable
/// (`target/<profile>/deps/test-xxxx` → `target/<profile>/<name>`).
pub fn locate_binary(name: &str, package: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(HarnessError::NoTargetDir)?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::BinaryMissing {
            name: name.to_string(),
            package: package.to_string(),
            path,
        })
    }
}

/// Timing knobs written into every node's config.
#[derive(Debug, Clone)]
pub struct Options {
    pub heartbeat_interval_ms: u64,
    pub down_after_ms: u64,
    pub raft_heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub max_logs_kept_after_snapshot: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat_interval_ms: 200,
            down_after_ms: 2_000,
            raft_heartbeat_interval_ms: 150,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            snapshot_logs_since_last: 50,
            max_logs_kept_after_snapshot: 20,
        }
    }
}

impl Options {
    /// The agent's own default timings (`DEFAULT_*` in `cluster-agent/src/node/config.rs`;
    /// this crate does not link the agent, and `partition`'s
    /// `the_harness_copy_of_the_agent_defaults_matches` checks the copy): what the
    /// partition tests and the benchmarks that measure the defaults run with.
    pub fn agent_defaults() -> Options {
        Options {
            heartbeat_interval_ms: 200,
            down_after_ms: 1_200,
            raft_heartbeat_interval_ms: 1_000,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            ..Options::default()
        }
    }
}

/// One node's fixed identity.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub mgmt_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub migration_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// The node's TLS credentials (issued by [`pki::pki`] when the node is added).
    pub tls_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

struct NodeProc {
    spec: NodeSpec,
    child: Option<Child>,
    /// Extra environment of the agent process (e.g. a crash point).
    env: Vec<(String, String)>,
}

/// A set of agent processes for one test. Dropping it kills every process.
pub struct Cluster {
    dir: tempfile::TempDir,
    agent_bin: PathBuf,
    pub opts: Options,
    nodes: BTreeMap<u64, NodeProc>,
    /// The network namespace the agents run in (VM network tests); `None`: the root one.
    netns: Option<std::sync::Arc<netns::NetNs>>,
    /// The credentials the harness's clients use (`None`: the process's admin).
    client: Option<cluster_proto::pki::TlsMaterial>,
}

/// A port free on `ip` right now (e.g. for a node's `metrics_addr`), and never handed out
/// before by this process: the kernel may give a just-released port again, and one node's
/// management and Raft addresses once came out the same.
pub fn free_port(ip: [u8; 4]) -> Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<Option<std::collections::BTreeSet<SocketAddr>>> =
        std::sync::Mutex::new(None);
    for _ in 0..1000 {
        let l =
            TcpListener::bind(SocketAddr::from((ip, 0))).map_err(|source| HarnessError::Io {
                what: format!("binding a free port on {ip:?}"),
                source,
            })?;
        let addr = l.local_addr().map_err(|source| HarnessError::Io {
            what: "local_addr".into(),
            source,
        })?;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(Default::default).insert(addr) {
            return Ok(addr);
        }
    }
    Err(HarnessError::Io {
        what: format!("finding a port on {ip:?} not handed out before"),
        source: std::io::Error::other("1000 tries"),
    })
}

/// Loopback IP 127.0.`net`.`id` for node `id` (1..=254): net 1 is management and
/// Raft, net 2 the migration network.
pub fn node_ip(net: u8, id: u64) -> [u8; 4] {
    [127, 0, net, id.clamp(1, 254) as u8]
}

/// Panics unless `/dev/kvm` can be opened: the VM process tests need KVM.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm cannot be opened ({e}): these tests need KVM");
    }
}

impl Cluster {
    /// A cluster of the workspace's `cluster-agent` binary (found next to the test
    /// executable) with `opts`, no node added yet; panics with the reason when it cannot.
    pub fn agents(opts: Options) -> Cluster {
        locate_binary("cluster-agent", "cluster-agent")
            .and_then(|bin| Cluster::new(bin, opts))
            .unwrap_or_else(|e| panic!("harness: {e}"))
    }

    /// [`Cluster::agents`] with the default options, after checking for KVM: the
    /// cluster the VM process tests start from.
    pub fn vm_agents() -> Cluster {
        require_kvm();
        Cluster::agents(Options::default())
    }

    pub fn new(agent_bin: PathBuf, opts: Options) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("cluster-test-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                what: "creating the test directory".into(),
                source,
            })?;
        // CLUSTER_TESTS_KEEP=1 keeps every cluster's directory (data, logs) for a post-mortem.
        let mut dir = dir;
        if std::env::var_os("CLUSTER_TESTS_KEEP").is_some_and(|v| v == "1") {
            dir.disable_cleanup(true);
            eprintln!("keeping the cluster directory {}", dir.path().display());
        }
        Ok(Cluster {
            dir,
            agent_bin,
            opts,
            nodes: BTreeMap::new(),
            netns: None,
            client: None,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run the agents started from now on inside `ns` (`ip netns exec`), so the TAPs of
    /// their VMs are created there; the harness's clients connect from inside it too.
    pub fn set_netns(&mut self, ns: std::sync::Arc<netns::NetNs>) {
        self.netns = Some(ns);
    }

    /// Make the harness's clients use `m` (its CA file and certificate) from now on,
    /// e.g. a CA rotation's trust bundle; `None`: the process's admin again.
    pub fn set_client(&mut self, m: Option<cluster_proto::pki::TlsMaterial>) {
        self.client = m;
    }

    /// A gRPC channel to node `id`'s management address (from inside the cluster's
    /// network namespace when it has one).
    pub async fn connect_channel(
        &self,
        id: u64,
    ) -> std::result::Result<Channel, tonic::transport::Error> {
        let addr = self.spec(id).map(|s| s.mgmt_addr).unwrap_or_else(|_| {
            panic!("harness: no node {id}");
        });
        let ep = match &self.client {
            Some(m) => pki::endpoint_as(addr, Some(m)),
            None => pki::admin_endpoint(addr),
        }
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60));
        match &self.netns {
            None => ep.connect().await,
            Some(ns) => {
                let ns = ns.clone();
                ep.connect_with_connector(tower::service_fn(move |_uri| {
                    let ns = ns.clone();
                    async move { ns.connect(addr).await.map(hyper_util::rt::TokioIo::new) }
                }))
                .await
            }
        }
    }

    /// Creates `<test dir>/csv`, the directory standing in for shared storage, and
    /// returns it with the config lines that name it volume `vol` (for
    /// [`Cluster::add_node_with`]).
    pub fn shared_volume(&self) -> (PathBuf, String) {
        let csv = self.dir().join("csv");
        std::fs::create_dir_all(&csv).unwrap_or_else(|e| panic!("mkdir {}: {e}", csv.display()));
        let toml = format!(
            "[[volumes]]\nname = \"vol\"\npath = \"{}\"\n",
            csv.display()
        );
        (csv, toml)
    }

    /// Allocate addresses and write the config for node `id` (not started).
    pub fn add_node(&mut self, id: u64) -> Result<NodeSpec> {
        self.add_node_with(id, "")
    }

    /// Like [`Cluster::add_node`], with extra TOML appended to the config.
    pub fn add_node_with(&mut self, id: u64, extra_toml: &str) -> Result<NodeSpec> {
        let ip = node_ip(1, id);
        let mip = node_ip(2, id);
        let spec = NodeSpec {
            id,
            mgmt_addr: free_port(ip)?,
            raft_addr: free_port(ip)?,
            migration_addr: free_port(mip)?,
            data_dir: self.dir.path().join(format!("node-{id}")),
            tls_dir: self.dir.path().join(format!("node-{id}-tls")),
            config_path: self.dir.path().join(format!("node-{id}.toml")),
            log_path: self.dir.path().join(format!("node-{id}.log")),
        };
        // Node 1 may issue certificates (it holds the CA key), like the first node of a
        // real cluster.
        pki::pki().issue_node(
            id,
            &[std::net::IpAddr::from(ip), std::net::IpAddr::from(mip)],
            &spec.tls_dir,
            id == 1,
        );
        let o = &self.opts;
        // Default subnets, unless `extra_toml` sets its own (e.g. another migration subnet).
        let mut subnets = String::new();
        for (key, default) in [
            ("mgmt_subnet", "127.0.1.0/24"),
            ("migration_subnet", "127.0.2.0/24"),
        ] {
            if !extra_toml
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{key} ")))
            {
                subnets.push_str(&format!("{key} = \"{default}\"\n"));
            }
        }
        let text = format!(
            "node_id = {id}\nname = \"node-{id}\"\ndata_dir = \"{}\"\ntls_dir = \"{}\"\nmgmt_addr = \"{}\"\nraft_addr = \"{}\"\nmigration_addr = \"{}\"\n{subnets}heartbeat_interval_ms = {}\ndown_after_ms = {}\nraft_heartbeat_interval_ms = {}\nelection_timeout_min_ms = {}\nelection_timeout_max_ms = {}\nsnapshot_logs_since_last = {}\nmax_logs_kept_after_snapshot = {}\n{extra_toml}\n",
            spec.data_dir.display(),
            spec.tls_dir.display(),
            spec.mgmt_addr,
            spec.raft_addr,
            spec.migration_addr,
            o.heartbeat_interval_ms,
            o.down_after_ms,
            o.raft_heartbeat_interval_ms,
            o.election_timeout_min_ms,
            o.election_timeout_max_ms,
            o.snapshot_logs_since_last,
            o.max_logs_kept_after_snapshot,
        );
        std::fs::write(&spec.config_path, text).map_err(|source| HarnessError::Io {
            what: format!("writing {}", spec.config_path.display()),
            source,
        })?;
        self.nodes.insert(
            id,
            NodeProc {
                spec: spec.clone(),
                child: None,
                env: Vec::new(),
            },
        );
        Ok(spec)
    }

    /// Sets `key=value` in the environment of node `id`'s agent from its next start on.
    pub fn set_env(&mut self, id: u64, key: &str, value: &str) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(HarnessError::UnknownNode(id))?;
        node.env.retain(|(k, _)| k != key);
        node.env.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Makes every node added so far hold its live migrations of `vm` in pre-copy, from
    /// its next start on ([`HOLD_PRECOPY_ENV`]).
    pub fn hold_precopy(&mut self, vm: &str) -> Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.set_env(id, HOLD_PRECOPY_ENV, vm)?;
        }
        Ok(())
    }

    /// Removes `key` from the environment of node `id`'s agent from its next start on.
    pub fn remove_env(&mut self, id: u64, key: &str) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(HarnessError::UnknownNode(id))?;
        node.env.retain(|(k, _)| k != key);
        Ok(())
    }

    pub fn spec(&self, id: u64) -> Result<&NodeSpec> {
        self.nodes
            .get(&id)
            .map(|n| &n.spec)
            .ok_or(HarnessError::UnknownNode(id))
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Ids of nodes whose process is running.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Spawn the agent for node `id` and wait until its management API answers.
    pub async fn start(&mut self, id: u64) -> Result<()> {
        self.spawn(id)?;
        self.wait_ready(id, Duration::from_secs(30)).await
    }

    /// Spawn without waiting.
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let bin = self.agent_bin.clone();
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(HarnessError::UnknownNode(id))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.spec.log_path)
            .map_err(|source| HarnessError::Io {
                what: format!("opening {}", node.spec.log_path.display()),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| HarnessError::Io {
            what: "cloning the log handle".into(),
            source,
        })?;
        let mut cmd = match &self.netns {
            Some(ns) => ns.exec(&bin),
            None => Command::new(&bin),
        };
        let child = cmd
            .arg("--config")
            .arg(&node.spec.config_path)
            .env("RUST_LOG", "info,openraft=warn")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| HarnessError::Io {
                what: format!("starting {}", bin.display()),
                source,
            })?;
        node.child = Some(child);
        Ok(())
    }

    /// Run the agent for node `id` to completion (for configs that must fail);
    /// returns (success, stderr+stdout).
    pub fn run_to_exit(&self, id: u64, timeout: Duration) -> Result<(bool, String)> {
        let node = self.nodes.get(&id).ok_or(HarnessError::UnknownNode(id))?;
        let mut child = Command::new(&self.agent_bin)
            .arg("--config")
            .arg(&node.spec.config_path)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Io {
                what: format!("starting {}", self.agent_bin.display()),
                source,
            })?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Timeout {
                        id,
                        what: "agent exit".into(),
                        waited_ms: timeout.as_millis() as u64,
                        last: "it kept running".into(),
                    });
                }
                // Paces the poll for the exit.
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(source) => {
                    return Err(HarnessError::Io {
                        what: "waiting for the agent".into(),
                        source,
                    })
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|source| HarnessError::Io {
                what: "collecting agent output".into(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok((out.status.success(), text))
    }

    /// The process id of node `id`'s agent, while it runs (e.g. to SIGSTOP/SIGCONT it).
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes
            .get(&id)
            .and_then(|n| n.child.as_ref())
            .map(Child::id)
    }

    /// Wait until node `id`'s agent exits on its own (e.g. a fail-stop) and return how
    /// it ended; a timeout leaves it running.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let node = self
                .nodes
                .get_mut(&id)
                .ok_or(HarnessError::UnknownNode(id))?;
            let Some(child) = node.child.as_mut() else {
                return Err(HarnessError::Timeout {
                    id,
                    what: "agent exit".into(),
                    waited_ms: 0,
                    last: "no agent process is running".into(),
                });
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    node.child = None;
                    return Ok(status);
                }
                Ok(None) if start.elapsed() > timeout => {
                    return Err(HarnessError::Timeout {
                        id,
                        what: "agent exit".into(),
                        waited_ms: timeout.as_millis() as u64,
                        last: "it kept running".into(),
                    })
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(source) => {
                    return Err(HarnessError::Io {
                        what: format!("waiting for node {id}'s agent"),
                        source,
                    })
                }
            }
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(HarnessError::UnknownNode(id))?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGTERM and wait up to 10 s (then SIGKILL). Returns whether it exited cleanly.
    pub fn stop(&mut self, id: u64) -> Result<bool> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(HarnessError::UnknownNode(id))?;
        let Some(mut c) = node.child.take() else {
            return Ok(true);
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = c.try_wait() {
                return Ok(st.success());
            }
            // Paces the poll for the exit.
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        Ok(false)
    }

    /// The value of `r`, or a panic carrying the error and the tail of every node's log
    /// (what a failing process test needs to be diagnosed).
    pub fn check<T>(&self, r: Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("{e}{}", self.logs()),
        }
    }

    /// Last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Ok(spec) = self.spec(id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Bytes in node `id`'s log so far: an offset for [`Cluster::log_since`].
    pub fn log_len(&self, id: u64) -> u64 {
        self.spec(id)
            .ok()
            .and_then(|s| std::fs::metadata(&s.log_path).ok())
            .map_or(0, |m| m.len())
    }

    /// Node `id`'s log from byte `offset` on (e.g. since a restart).
    pub fn log_since(&self, id: u64, offset: u64) -> String {
        let Ok(spec) = self.spec(id) else {
            return String::new();
        };
        let bytes = std::fs::read(&spec.log_path).unwrap_or_default();
        let from = (offset as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// Waits until node `id`'s log has a line for which `pred` holds, and returns it;
    /// panics with the logs after [`WAIT`].
    pub async fn wait_log_line(&self, id: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let found = Wait::new(WAIT)
            .until_some(&format!("node {id} logs {what}"), || async {
                let text = self.log_since(id, 0);
                Ok::<_, HarnessError>(text.lines().find(|l| pred(l)).map(str::to_owned))
            })
            .await;
        self.check(found)
    }

    pub async fn client(&self, id: u64) -> Result<ManagementServiceClient<Channel>> {
        self.spec(id)?;
        let ch = self
            .connect_channel(id)
            .await
            .map_err(|source| HarnessError::Connect { id, source })?;
        Ok(ManagementServiceClient::new(ch))
    }

    async fn wait_ready(&self, id: u64, timeout: Duration) -> Result<()> {
        let ready = Wait::new(timeout)
            .until(
                &format!("management API of node {id} ready"),
                || self.status(id),
                |_| true,
            )
            .await;
        match ready {
            Ok(_) => Ok(()),
            Err(e) => Err(HarnessError::Timeout {
                id,
                what: "management API ready".into(),
                waited_ms: timeout.as_millis() as u64,
                last: format!("{e}\n--- log ---\n{}", self.log_tail(id, 20)),
            }),
        }
    }

    pub async fn status(&self, id: u64) -> Result<pb::ClusterStatusResponse> {
        let mut c = self.client(id).await?;
        c.cluster_status(pb::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|status| HarnessError::Rpc {
                id,
                rpc: "ClusterStatus",
                status,
            })
    }

    pub async fn init(&self, id: u64) -> Result<pb::InitClusterResponse> {
        let mut c = self.client(id).await?;
        c.init_cluster(pb::InitClusterRequest {
            cluster_name: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| HarnessError::Rpc {
            id,
            rpc: "InitCluster",
            status,
        })
    }

    /// Ask node `id` to join through node `via`'s management address.
    pub async fn join(&self, id: u64, via: u64) -> Result<pb::JoinClusterResponse, HarnessError> {
        let via_addr = self.spec(via)?.mgmt_addr.to_string();
        self.join_addr(id, &via_addr).await
    }

    pub async fn join_addr(&self, id: u64, via: &str) -> Result<pb::JoinClusterResponse> {
        let mut c = self.client(id).await?;
        c.join_cluster(pb::JoinClusterRequest { via: via.into() })
            .await
            .map(|r| r.into_inner())
            .map_err(|status| HarnessError::Rpc {
                id,
                rpc: "JoinCluster",
                status,
            })
    }

    pub async fn leave(&self, via: u64, node_id: u64) -> Result<pb::LeaveClusterResponse> {
        let mut c = self.client(via).await?;
        c.leave_cluster(pb::LeaveClusterRequest { node_id })
            .await
            .map(|r| r.into_inner())
            .map_err(|status| HarnessError::Rpc {
                id: via,
                rpc: "LeaveCluster",
                status,
            })
    }

    pub async fn put(&self, via: u64, key: &str, value: &str) -> Result<pb::PutKvResponse> {
        let mut c = self.client(via).await?;
        c.put_kv(pb::PutKvRequest {
            key: key.into(),
            value: value.into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| HarnessError::Rpc {
            id: via,
            rpc: "PutKv",
            status,
        })
    }

    pub async fn get(&self, via: u64, key: &str) -> Result<Option<String>> {
        let mut c = self.client(via).await?;
        let r = c
            .get_kv(pb::GetKvRequest { key: key.into() })
            .await
            .map_err(|status| HarnessError::Rpc {
                id: via,
                rpc: "GetKv",
                status,
            })?
            .into_inner();
        Ok(r.found.then_some(r.value))
    }

    pub async fn nodes(&self, via: u64) -> Result<Vec<pb::NodeInfo>> {
        let mut c = self.client(via).await?;
        c.list_nodes(pb::ListNodesRequest::default())
            .await
            .map(|r| r.into_inner().nodes)
            .map_err(|status| HarnessError::Rpc {
                id: via,
                rpc: "ListNodes",
                status,
            })
    }

    pub async fn events(&self, via: u64) -> Result<Vec<pb::Event>> {
        let mut c = self.client(via).await?;
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = c
                .list_events(pb::ListEventsRequest {
                    after_seq: 0,
                    page_size: 1000,
                    page_token,
                })
                .await
                .map_err(|status| HarnessError::Rpc {
                    id: via,
                    rpc: "ListEvents",
                    status,
                })?
                .into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() {
                return Ok(events);
            }
            page_token = page.next_page_token;
        }
    }

    /// Poll `f` on node `id` until it returns `Some`, or time out (see [`Wait`]).
    pub async fn wait_for<T, F, Fut>(
        &self,
        id: u64,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T>
    where
        T: std::fmt::Debug,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        Wait::new(timeout)
            .until_some(&format!("node {id}: {what}"), f)
            .await
    }

    /// Polls `read` until `cond` holds for its value (see [`Wait::until`]) and returns
    /// it; on timeout panics with what was awaited, the last value seen and the tail of
    /// every node's log.
    pub async fn wait_until<T, E, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        read: F,
        cond: impl FnMut(&T) -> bool,
    ) -> T
    where
        T: std::fmt::Debug,
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let r = Wait::new(timeout).until(what, read, cond).await;
        self.check(r)
    }

    /// A write through a running node, then a wait until every running node (not one
    /// stopped with SIGSTOP) has applied it; returns its log index. Everything committed before the call is then applied on
    /// every running node: what a test reads afterwards shows whether it happened. (A
    /// refused request commits nothing; the barrier is what makes "nothing changed" a
    /// read of settled state rather than of a replica that is behind.)
    pub async fn barrier(&self) -> u64 {
        let running = self.running();
        let via = running.first().copied().unwrap_or(1);
        let put = Wait::new(WAIT)
            .until(
                "the barrier write",
                || self.put(via, "test-barrier", "x"),
                |_| true,
            )
            .await;
        let index = self.check(put).log_index;
        for id in running {
            self.wait_until(
                &format!("node {id} applied the barrier write (log index {index})"),
                WAIT,
                || self.status(id),
                |s| s.last_applied_index >= index,
            )
            .await;
        }
        index
    }

    /// Wait until every node in `among` reports the same leader (itself in `among`).
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> Result<u64> {
        let first = among.first().copied().unwrap_or(0);
        self.wait_for(first, "agreement on a leader", timeout, || async {
            let mut leader = None;
            for id in among {
                let s = self.status(*id).await?;
                if s.leader_id == 0 || !among.contains(&s.leader_id) {
                    return Ok(None);
                }
                match leader {
                    None => leader = Some(s.leader_id),
                    Some(l) if l != s.leader_id => return Ok(None),
                    _ => {}
                }
            }
            Ok(leader)
        })
        .await
    }

    /// Wait until node `via` reports node `node` in `state` ("up", "down", "paused").
    pub async fn wait_node_state(
        &self,
        via: u64,
        node: u64,
        state: &str,
        timeout: Duration,
    ) -> Result<pb::NodeInfo> {
        self.wait_for(via, &format!("node {node} {state}"), timeout, || async {
            let nodes = self.nodes(via).await?;
            Ok(nodes
                .into_iter()
                .find(|n| n.node_id == node && n.state().name() == state))
        })
        .await
    }

    /// Pause node `node` through node `via`, then wait until every running node's replica
    /// shows it paused (reads are served from each agent's own replica).
    pub async fn pause(&self, via: u64, node: u64) -> Result<()> {
        let mut c = self.client(via).await?;
        c.set_node_state(pb::SetNodeStateRequest {
            node_id: node,
            state: cluster_proto::management::NodeState::Paused as i32,
            reason: "test".into(),
        })
        .await
        .map_err(|status| HarnessError::Rpc {
            id: via,
            rpc: "SetNodeState",
            status,
        })?;
        for id in self.running() {
            self.wait_node_state(id, node, "paused", Duration::from_secs(10))
                .await?;
        }
        Ok(())
    }

    /// Start nodes 1..=n, init on 1, join the rest through 1, wait for a leader.
    pub async fn form(&mut self, n: u64) -> Result<u64> {
        for id in 1..=n {
            if !self.nodes.contains_key(&id) {
                self.add_node(id)?;
            }
            self.start(id).await?;
        }
        self.init(1).await?;
        for id in 2..=n {
            self.join(id, 1).await?;
        }
        let ids: Vec<u64> = (1..=n).collect();
        self.wait_leader(&ids, Duration::from_secs(20)).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // VM workers outlive their agent by design (up to an announced restart window):
        // a test's workers must not go on running guests while the next test runs.
        for pid in worker_pids_below(self.dir.path()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The VM worker processes (`cluster-agent vm-worker --dir D`) whose directory is below
/// `root`.
pub fn worker_pids_below(root: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_worker = args.iter().any(|a| *a == b"vm-worker");
            let below = args
                .iter()
                .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)).starts_with(root));
            (is_worker && below).then_some(pid)
        })
        .collect()
}

/// The value of the Prometheus sample `series` (name and labels exactly as printed) in
/// `text`, e.g. `cluster_balance_rounds_total{node="1"}`.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    let want = canonical_series(series);
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (canonical_series(k) == want).then(|| v.parse().ok())?
    })
}

/// A series name with its labels in alphabetical order (`m{b="1",a="2"}` →
/// `m{a="2",b="1"}`): the exposition format does not fix the order, the tests name series
/// in this one. Label values must not contain `",`.
pub fn canonical_series(series: &str) -> String {
    let Some((name, rest)) = series.split_once('{') else {
        return series.to_owned();
    };
    let inner = rest.strip_suffix('}').unwrap_or(rest);
    let mut labels: Vec<&str> = inner.split("\",").collect();
    let last = labels.len().saturating_sub(1);
    let mut owned: Vec<String> = labels
        .drain(..)
        .enumerate()
        .map(|(i, l)| {
            if i == last {
                l.to_owned()
            } else {
                format!("{l}\"")
            }
        })
        .collect();
    owned.sort();
    format!("{name}{{{}}}", owned.join(","))
}

/// A plain HTTP/1.1 `GET path` to `addr` (the agents' metrics endpoint); returns the
/// response head and body. Panics on I/O errors or a response without a blank line.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .unwrap_or_else(|e| panic!("{e}"));
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad response {resp:?}"));
    (head.to_string(), body.to_string())
}

#[cfg(test)]
mod metric_tests {
    use super::*;

    #[test]
    fn series_match_whatever_the_label_order() {
        assert_eq!(
            canonical_series(r#"m{vm="a",node="3"}"#),
            r#"m{node="3",vm="a"}"#
        );
        assert_eq!(canonical_series("plain"), "plain");
        let text =
            "# HELP m x\nm{state=\"running\",node=\"3\"} 2\nm{state=\"stopped\",node=\"3\"} 0\n";
        assert_eq!(
            metric_sample(text, r#"m{node="3",state="running"}"#),
            Some(2.0)
        );
        assert_eq!(metric_sample(text, r#"m{node="4",state="running"}"#), None);
    }
}
