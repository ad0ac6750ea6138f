//! Real network partitions between the agents of a [`Cluster`] on one machine, made of
//! iptables rules (the tests run as root; `deploy/setup.sh` installs `iptables`).
//!
//! Every agent listens on addresses of its own, 127.0.1.N (management and peer Raft) and
//! 127.0.2.N (migration), and opens its connections from them, so a rule on source and
//! destination address tells one node's traffic from another's. The rules live in a chain
//! of their own (`vmcl-<pid>-<n>`, created by [`Partition::new`] and jumped to from
//! `OUTPUT` for packets on `lo`): [`Partition::heal`] flushes it, and dropping the
//! [`Partition`] removes it, also when the test panics (a chain left behind by a killed
//! test process is removed by the next [`Partition::new`]). The harness's own gRPC
//! clients connect from 127.0.0.1, so a test still reaches every node, cut off or not.
//!
//! What a cut means on TCP:
//! * **both ways** ([`Partition::cut`], [`Partition::isolate`]): every packet between the
//!   two sets of nodes is dropped;
//! * **one way** ([`Partition::cut_oneway`]): the connections `from` opens to `to` carry
//!   nothing (their SYN, and any packet of one already open, is dropped: the rules match
//!   the server side's address and port), while the connections `to` opens to `from`
//!   work both ways. At the RPC level: `from`'s requests
//!   to `to` are lost, `to`'s requests to `from` are delivered and answered. (Dropping
//!   only `from`'s *packets* to `to`, [`Partition::drop_packets_oneway`], stalls every TCP
//!   connection between them in both directions within a retransmission timeout: the
//!   handshake's or the data's acknowledgements are lost too. It is there for
//!   completeness; the one-way scenarios use the connection-level cut.)
//! * **flapping** ([`Partition::flap`]): a both-ways cut installed and removed on a fixed
//!   schedule by a thread;
//! * **lossy** ([`Partition::lossy`]): each packet between two sets of nodes, either
//!   way, is dropped with a given probability (iptables' `statistic` match, random mode);
//! * **freeze** ([`Cluster::freeze`]/[`Cluster::thaw`]): SIGSTOP/SIGCONT of an agent
//!   (its VMs stop with it: they run in the agent's process).
//!
//! Not here: **delay and jitter**. The kernel of the project's machines has no `sch_netem`
//! qdisc (`tc qdisc add dev lo root netem delay 10ms` answers "Specified qdisc kind is
//! unknown"), and iptables can drop a packet but not hold it back (docs/known-limits.md).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{node_ip, Cluster, HarnessError, Result};

/// The prefix of every chain the harness creates.
const CHAIN_PREFIX: &str = "vmcl-";

static NEXT_CHAIN: AtomicU32 = AtomicU32::new(0);

/// A set of iptables rules between the nodes of a test cluster; see the module doc.
pub struct Partition {
    chain: String,
}

fn firewall_err(what: String, detail: String) -> HarnessError {
    HarnessError::Firewall { what, detail }
}

/// Runs `iptables ARGS`; an error carries its stderr.
fn iptables(args: &[&str]) -> Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| HarnessError::Io {
            what: "running iptables (is the `iptables` package installed? deploy/setup.sh installs it)"
                .into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(firewall_err(
            format!("iptables {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Applies `lines` (rule commands such as `-A chain ...`) to the filter table in one
/// transaction (`iptables-restore --noflush`): a cut between two sets appears at once.
fn restore(lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut script = String::from("*filter\n");
    for l in lines {
        script.push_str(l);
        script.push('\n');
    }
    script.push_str("COMMIT\n");
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HarnessError::Io {
            what: "running iptables-restore (is the `iptables` package installed?)".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| HarnessError::Io {
                what: "writing rules to iptables-restore".into(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| HarnessError::Io {
            what: "waiting for iptables-restore".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(firewall_err(
            format!("iptables-restore of:\n{script}"),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Both addresses of node `id` (management/Raft and migration), comma-separated as
/// iptables takes them.
fn addrs(ids: &[u64]) -> String {
    ids.iter()
        .flat_map(|id| [node_ip(1, *id), node_ip(2, *id)])
        .map(|ip| format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rules (without `-A`/`-D chain`) that drop packets from `from` to `to`, matching
/// `extra` too.
fn rules(from: &[u64], to: &[u64], extra: &str) -> Vec<String> {
    if from.is_empty() || to.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "-o lo -s {} -d {} {extra} -j DROP",
        addrs(from),
        addrs(to)
    )]
}

/// The rules of a both-ways cut between `a` and `b`.
fn both_ways(a: &[u64], b: &[u64]) -> Vec<String> {
    let mut r = rules(a, b, "");
    r.extend(rules(b, a, ""));
    r
}

/// The rules that make the connections the nodes `from` open to the listeners
/// `listeners` carry nothing: their packets to the listener and the listener's packets
/// back. A connection is told apart by its server side (the listener's address and port:
/// no client socket of that host can use the same address and port), not by conntrack,
/// which would guess the direction of connections opened before it started tracking.
fn connections_to(from: &[u64], listeners: &[SocketAddr]) -> Vec<String> {
    if from.is_empty() {
        return Vec::new();
    }
    let from = addrs(from);
    listeners
        .iter()
        .flat_map(|l| {
            let (ip, port) = (l.ip(), l.port());
            [
                format!("-o lo -p tcp -s {from} -d {ip} --dport {port} -j DROP"),
                format!("-o lo -p tcp -s {ip} --sport {port} -d {from} -j DROP"),
            ]
        })
        .collect()
}

/// The rules of a lossy link between `a` and `b`: each packet either way is dropped with
/// `probability`, independently (iptables' `statistic` match in random mode).
fn lossy_both_ways(a: &[u64], b: &[u64], probability: f64) -> Vec<String> {
    let extra = format!("-m statistic --mode random --probability {probability:.5}");
    let mut r = rules(a, b, &extra);
    r.extend(rules(b, a, &extra));
    r
}

/// Removes the chains earlier test processes (killed before their drop ran) left behind.
fn remove_stale_chains() {
    let Ok(out) = Command::new("iptables").args(["-w", "-S"]).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(chain) = line.strip_prefix("-N ") else {
            continue;
        };
        let Some(pid) = chain
            .strip_prefix(CHAIN_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_chain(chain);
        }
    }
}

fn remove_chain(chain: &str) {
    // Every jump to it, then its rules, then the chain (errors: already gone).
    while iptables(&["-D", "OUTPUT", "-o", "lo", "-j", chain]).is_ok() {}
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

impl Partition {
    /// A chain of this test's own, hooked into `OUTPUT` for packets on `lo`, with no rule
    /// yet. Fails (naming the cause) without iptables or without root.
    pub fn new() -> Result<Partition> {
        remove_stale_chains();
        let chain = format!(
            "{CHAIN_PREFIX}{}-{}",
            std::process::id(),
            NEXT_CHAIN.fetch_add(1, Ordering::Relaxed)
        );
        iptables(&["-N", &chain])?;
        let p = Partition { chain };
        iptables(&["-I", "OUTPUT", "-o", "lo", "-j", &p.chain])?;
        Ok(p)
    }

    /// The chain's name (to show the rules: `iptables -S NAME`).
    pub fn chain(&self) -> &str {
        &self.chain
    }

    fn add(&self, rules: &[String]) -> Result<()> {
        let lines: Vec<String> = rules
            .iter()
            .map(|r| format!("-A {} {r}", self.chain))
            .collect();
        restore(&lines)
    }

    /// Drops every packet between the nodes of `a` and those of `b`, both ways.
    pub fn cut(&self, a: &[u64], b: &[u64]) -> Result<()> {
        self.add(&both_ways(a, b))
    }

    /// Cuts node `node` from every other node of `all`, both ways.
    pub fn isolate(&self, node: u64, all: &[u64]) -> Result<()> {
        let others: Vec<u64> = all.iter().copied().filter(|id| *id != node).collect();
        self.cut(&[node], &others)
    }

    /// The connections the nodes of `from` open to those of `to` (to any of their
    /// listeners: management, peer, migration) carry nothing; those `to` opens to `from`
    /// work (see the module doc).
    pub fn cut_oneway(&self, cluster: &Cluster, from: &[u64], to: &[u64]) -> Result<()> {
        let mut listeners = Vec::new();
        for id in to {
            let s = cluster.spec(*id)?;
            listeners.extend([s.mgmt_addr, s.raft_addr, s.migration_addr]);
        }
        self.cut_connections_to(from, &listeners)
    }

    /// The connections the nodes of `from` open to `listeners` carry nothing.
    pub fn cut_connections_to(&self, from: &[u64], listeners: &[SocketAddr]) -> Result<()> {
        self.add(&connections_to(from, listeners))
    }

    /// Drops the packets of `from` to `to` and nothing else (on TCP this stalls the
    /// connections both ways, see the module doc).
    pub fn drop_packets_oneway(&self, from: &[u64], to: &[u64]) -> Result<()> {
        self.add(&rules(from, to, ""))
    }

    /// Drops each packet between the nodes of `a` and those of `b` (both ways) with
    /// `probability` (0 < p ≤ 1), independently: a lossy link, no delay added (see the
    /// module doc). On TCP the losses show as retransmissions (200 ms and more on
    /// loopback), so an RPC can stall for seconds.
    pub fn lossy(&self, a: &[u64], b: &[u64], probability: f64) -> Result<()> {
        if !(probability > 0.0 && probability <= 1.0) {
            return Err(firewall_err(
                format!("a lossy link with probability {probability}"),
                "the probability must be in (0, 1]".into(),
            ));
        }
        self.add(&lossy_both_ways(a, b, probability))
    }

    /// How many packets the rules in place have dropped so far (iptables' counters).
    pub fn dropped(&self) -> Result<u64> {
        let out = Command::new("iptables")
            .args(["-w", "-L", &self.chain, "-v", "-n", "-x"])
            .output()
            .map_err(|source| HarnessError::Io {
                what: "running iptables".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(firewall_err(
                format!("iptables -L {}", self.chain),
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        // Two header lines, then one line per rule: packets, bytes, target, ...
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// Removes every rule: all nodes reach each other again.
    pub fn heal(&self) -> Result<()> {
        iptables(&["-F", &self.chain])
    }

    /// Cuts `a` from `b` (both ways) for `period`, heals for `period`, and so on until
    /// `total` has passed, on a thread; the link ends healed. The schedule is the
    /// stimulus, not a wait: wait on the [`Flapper`] for it to end.
    pub fn flap(&self, a: &[u64], b: &[u64], period: Duration, total: Duration) -> Flapper {
        let cut: Vec<String> = both_ways(a, b)
            .iter()
            .map(|r| format!("-A {} {r}", self.chain))
            .collect();
        let uncut: Vec<String> = both_ways(a, b)
            .iter()
            .map(|r| format!("-D {} {r}", self.chain))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<u32> {
            let start = Instant::now();
            let mut cuts = 0;
            while start.elapsed() < total && !flag.load(Ordering::Acquire) {
                restore(&cut)?;
                cuts += 1;
                // The flapping schedule: the link stays cut for one period...
                std::thread::sleep(period);
                restore(&uncut)?;
                if start.elapsed() >= total || flag.load(Ordering::Acquire) {
                    break;
                }
                // ...and up for the next.
                std::thread::sleep(period);
            }
            Ok(cuts)
        });
        Flapper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        remove_chain(&self.chain);
    }
}

/// A link flapping on a thread ([`Partition::flap`]).
pub struct Flapper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u32>>>,
}

impl Flapper {
    /// Waits until the schedule ended (the link is up again); returns how many times the
    /// link was cut.
    pub async fn wait(mut self) -> Result<u32> {
        let Some(t) = self.thread.take() else {
            return Ok(0);
        };
        tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|e| firewall_err("the flapping thread".into(), e.to_string()))?
            .map_err(|_| firewall_err("the flapping thread".into(), "panicked".into()))?
    }
}

impl Drop for Flapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|source| HarnessError::Io {
            what: format!("kill -{sig} {pid}"),
            source,
        })?
        .success();
    if ok {
        Ok(())
    } else {
        Err(firewall_err(
            format!("kill -{sig} {pid}"),
            "the signal was not delivered".into(),
        ))
    }
}

impl Cluster {
    /// Freezes node `id`'s agent (SIGSTOP): it and its VMs stop in place, sending and
    /// answering nothing, until [`Cluster::thaw`].
    pub fn freeze(&self, id: u64) -> Result<()> {
        let pid = self.pid(id).ok_or(HarnessError::UnknownNode(id))?;
        signal(pid, "STOP")
    }

    /// Resumes a frozen agent (SIGCONT).
    pub fn thaw(&self, id: u64) -> Result<()> {
        let pid = self.pid(id).ok_or(HarnessError::UnknownNode(id))?;
        signal(pid, "CONT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// Node ids whose loopback addresses no test cluster uses.
    const A: u64 = 201;
    const B: u64 = 202;
    /// Those of the lossy-link test (the tests of this module run at once).
    const C: u64 = 203;
    const D: u64 = 204;

    fn listen(id: u64) -> TcpListener {
        TcpListener::bind(SocketAddr::from((node_ip(1, id), 0))).unwrap()
    }

    /// A connection from node `from` to `l`: the client end and the accepted end.
    fn open(from: u64, l: &TcpListener) -> Option<(TcpStream, TcpStream)> {
        let to = l.local_addr().unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from((node_ip(1, from), 0)).into())
            .unwrap();
        s.connect_timeout(&to.into(), Duration::from_millis(300))
            .ok()?;
        Some((s.into(), l.accept().unwrap().0))
    }

    /// Whether a byte written at `from` arrives at `to` within 300 ms.
    fn carries(from: &mut TcpStream, to: &mut TcpStream) -> bool {
        from.write_all(b"x").unwrap();
        to.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        std::io::Read::read_exact(to, &mut b).is_ok()
    }

    /// Whether node `from` can open a connection to `l` and get a byte back through it.
    fn talks(from: u64, l: &TcpListener) -> bool {
        open(from, l).is_some_and(|(mut c, mut s)| carries(&mut s, &mut c))
    }

    /// How many of `n` datagrams sent from node `from` to node `to` arrive.
    fn datagrams_through(from: u64, to: u64, n: u32) -> u32 {
        let rx = std::net::UdpSocket::bind(SocketAddr::from((node_ip(1, to), 0))).unwrap();
        let tx = std::net::UdpSocket::bind(SocketAddr::from((node_ip(1, from), 0))).unwrap();
        let dst = rx.local_addr().unwrap();
        // On loopback a datagram that is not dropped is queued at the receiver before
        // send_to returns: read it (if it came) before sending the next, so the
        // receive buffer never fills.
        rx.set_nonblocking(true).unwrap();
        let mut got = 0;
        let mut b = [0u8; 4];
        for i in 0..n {
            // A datagram the firewall drops fails its send with EPERM.
            if let Err(e) = tx.send_to(&i.to_be_bytes(), dst) {
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            }
            while rx.recv_from(&mut b).is_ok() {
                got += 1;
            }
        }
        got
    }

    #[test]
    fn a_lossy_link_drops_about_its_share_of_packets_both_ways() {
        let p = Partition::new().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(datagrams_through(C, D, 1000), 1000);
        assert!(p.lossy(&[C], &[D], 0.0).is_err());
        p.lossy(&[C], &[D], 0.3).unwrap();
        // 1000 trials at 0.7: mean 700, standard deviation 14.5; the bounds are 10 of them
        // away, so missing them means the rule is wrong, not bad luck.
        for (from, to) in [(C, D), (D, C)] {
            let got = datagrams_through(from, to, 1000);
            assert!(
                (555..=845).contains(&got),
                "{got} of 1000 from {from} to {to}"
            );
        }
        let dropped = p.dropped().unwrap();
        assert!((310..=890).contains(&dropped), "{dropped} of 2000 dropped");
        p.heal().unwrap();
        assert_eq!(datagrams_through(D, C, 1000), 1000);
    }

    #[test]
    fn cuts_both_ways_one_way_and_heals_and_removes_its_chain() {
        let (la, lb) = (listen(A), listen(B));
        let p = Partition::new().unwrap_or_else(|e| panic!("{e}"));
        assert!(talks(A, &lb) && talks(B, &la));
        p.cut(&[A], &[B]).unwrap();
        assert!(!talks(A, &lb) && !talks(B, &la), "cut both ways");
        p.heal().unwrap();
        assert!(talks(A, &lb) && talks(B, &la), "healed");
        // A's connection to B opened before the cut stops carrying data either way.
        let (mut a_end, mut b_end) = open(A, &lb).unwrap();
        p.cut_connections_to(&[A], &[lb.local_addr().unwrap()])
            .unwrap();
        assert!(!carries(&mut b_end, &mut a_end) && !carries(&mut a_end, &mut b_end));
        assert!(!talks(A, &lb), "A cannot open to B");
        assert!(talks(B, &la), "B's connections to A work both ways");
        let chain = p.chain().to_owned();
        drop(p);
        let out = Command::new("iptables")
            .args(["-w", "-S"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&chain),
            "chain {chain} removed"
        );
        assert!(talks(A, &lb));
    }
}
