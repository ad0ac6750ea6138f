//! The partition scenarios' two safety checks, judged from what the nodes themselves saw:
//!
//! * **No VM ever ran on two nodes at once.** [`RunChecker`] follows, on every node, that
//!   node's own console journal of each VM (`StreamConsole` with `local_only`: the lines any
//!   copy of the VM printed *there*, stamped with the host's clock as the agent received
//!   them, kept after the copy stopped — so a copy that ran for a moment and was fenced
//!   again is still seen). Each line is evidence that the VM ran on that node at that
//!   instant. A node's lines closer than [`RUN_GAP`] form one run; runs of the same VM on
//!   two nodes that overlap in time are a **double run**. All agents share the machine's
//!   clock, so the stamps compare directly. The harness's clients connect from 127.0.0.1,
//!   which no partition cuts; a journal lives in the agent process, so a node that is
//!   killed loses the lines not yet streamed (its VMs died with it).
//! * **No acknowledged write is lost.** [`Writer`] puts a fresh key every few ms through
//!   the nodes it is given while the scenario runs; a put that was answered OK is
//!   *acknowledged*. After the heal, [`AckedWrites::verify`] reads every acknowledged key
//!   back. (A put that failed or timed out may or may not have been committed; it is not
//!   counted.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster_proto::management as mpb;
use cluster_proto::management::management_service_client::ManagementServiceClient;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use tokio::task::JoinHandle;

use crate::{Cluster, Wait, WAIT};

/// Console lines of one node closer than this belong to one run of the VM there (the
/// test guest prints a heartbeat every 100 ms; a busy 2-core host delays some).
pub const RUN_GAP: Duration = Duration::from_secs(1);

/// One console line of a VM, as a node journaled it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sighting {
    pub at_unix_us: u64,
    pub node: u64,
    pub text: String,
}

/// A stretch of time a VM ran on one node (from its first to its last line there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub node: u64,
    pub from_unix_us: u64,
    pub to_unix_us: u64,
    pub lines: usize,
}

/// Two runs of one VM on two nodes that overlap in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleRun {
    pub vm: String,
    pub a: Run,
    pub b: Run,
    /// How long both ran, in microseconds (0: they touch at one instant).
    pub overlap_us: u64,
}

type Sightings = Arc<Mutex<BTreeMap<String, BTreeSet<Sighting>>>>;

/// Follows every node's console journal of some VMs (see the module doc).
pub struct RunChecker {
    sightings: Sightings,
    tasks: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows node `node`'s journal of `vm` at `addr`, reconnecting whenever the stream
/// ends (the agent restarted, or was frozen long enough for the keepalive to end it).
async fn follow(node: u64, addr: SocketAddr, vm: String, sightings: Sightings) {
    loop {
        {
            let ep = crate::pki::admin_endpoint(addr);
            let ch = ep.connect_timeout(Duration::from_secs(2)).connect_lazy();
            let mut c = VmServiceClient::new(ch);
            let req = pb::StreamConsoleRequest {
                name: vm.clone(),
                follow: true,
                local_only: true,
            };
            if let Ok(s) = c.stream_console(req).await {
                let mut s = s.into_inner();
                while let Ok(Some(chunk)) = s.message().await {
                    let text = chunk.text.trim_end().to_owned();
                    lock(&sightings)
                        .entry(vm.clone())
                        .or_default()
                        .insert(Sighting {
                            at_unix_us: cluster_proto::times::unix_us(chunk.received_at.as_ref()),
                            node,
                            text,
                        });
                }
            }
        }
        // Paces reconnecting to an agent that is down or restarting.
        tokio::time::sleep(crate::wait::POLL).await;
    }
}

impl RunChecker {
    /// Starts following `vms` on every node of `cluster` (running or not: a node
    /// started later is followed once it answers).
    pub fn start(cluster: &Cluster, vms: &[&str]) -> RunChecker {
        let sightings: Sightings = Arc::new(Mutex::new(
            vms.iter()
                .map(|v| ((*v).to_owned(), BTreeSet::new()))
                .collect(),
        ));
        let mut tasks = Vec::new();
        for id in cluster.ids() {
            let addr = cluster.check(cluster.spec(id)).mgmt_addr;
            for vm in vms {
                tasks.push(tokio::spawn(follow(
                    id,
                    addr,
                    (*vm).to_owned(),
                    sightings.clone(),
                )));
            }
        }
        RunChecker { sightings, tasks }
    }

    /// Reads the whole journal of every followed VM once from every running node of
    /// `cluster` (not following) and adds what the streams have not delivered yet: after
    /// this, every line a running node journaled before the call is judged.
    pub async fn sync(&self, cluster: &Cluster) {
        let vms: Vec<String> = lock(&self.sightings).keys().cloned().collect();
        for id in cluster.running() {
            let mut c = cluster.vms(id).await;
            for vm in &vms {
                let req = pb::StreamConsoleRequest {
                    name: vm.clone(),
                    follow: false,
                    local_only: true,
                };
                let mut s = match c.stream_console(req).await {
                    Ok(s) => s.into_inner(),
                    Err(e) => panic!("journal of {vm} on node {id}: {e}{}", cluster.logs()),
                };
                while let Ok(Some(chunk)) = s.message().await {
                    lock(&self.sightings)
                        .entry(vm.clone())
                        .or_default()
                        .insert(Sighting {
                            at_unix_us: cluster_proto::times::unix_us(chunk.received_at.as_ref()),
                            node: id,
                            text: chunk.text.trim_end().to_owned(),
                        });
                }
            }
        }
    }

    /// Every line of `vm` seen so far, oldest first.
    pub fn sightings(&self, vm: &str) -> Vec<Sighting> {
        lock(&self.sightings)
            .get(vm)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The runs of `vm` seen so far, by start time.
    pub fn runs(&self, vm: &str) -> Vec<Run> {
        runs(&self.sightings(vm))
    }

    /// Every double run seen so far.
    pub fn double_runs(&self) -> Vec<DoubleRun> {
        let all = lock(&self.sightings).clone();
        all.iter()
            .flat_map(|(vm, s)| double_runs(vm, &runs(&s.iter().cloned().collect::<Vec<_>>())))
            .collect()
    }

    /// Waits until node `node` journaled a line of `vm` that satisfies `pred` after
    /// `after_unix_us` (e.g. a heartbeat after the heal), and returns it.
    pub async fn wait_line(
        &self,
        cluster: &Cluster,
        vm: &str,
        what: &str,
        after_unix_us: u64,
        pred: impl Fn(&Sighting) -> bool,
    ) -> Sighting {
        let found = Wait::new(WAIT)
            .until_some(what, || async {
                Ok::<_, String>(
                    self.sightings(vm)
                        .into_iter()
                        .find(|s| s.at_unix_us > after_unix_us && pred(s)),
                )
            })
            .await;
        cluster.check(found)
    }

    /// Syncs with every running node ([`RunChecker::sync`]), then panics (with the runs of
    /// every VM and the logs) if any VM ran on two nodes at once; returns the runs per VM
    /// otherwise.
    pub async fn assert_no_double_run(&self, cluster: &Cluster) -> BTreeMap<String, Vec<Run>> {
        self.sync(cluster).await;
        let all: BTreeMap<String, Vec<Run>> = lock(&self.sightings)
            .iter()
            .map(|(vm, s)| (vm.clone(), runs(&s.iter().cloned().collect::<Vec<_>>())))
            .collect();
        let doubles = self.double_runs();
        if !doubles.is_empty() {
            panic!(
                "a VM ran on two nodes at once: {doubles:#?}\nruns: {all:#?}{}",
                cluster.logs()
            );
        }
        all
    }
}

impl Drop for RunChecker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The runs in `sightings` (any order): per node, lines closer than [`RUN_GAP`] form a run.
pub fn runs(sightings: &[Sighting]) -> Vec<Run> {
    let mut by_node: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in sightings {
        by_node.entry(s.node).or_default().push(s.at_unix_us);
    }
    let gap = RUN_GAP.as_micros() as u64;
    let mut out = Vec::new();
    for (node, mut at) in by_node {
        at.sort_unstable();
        let mut cur: Option<Run> = None;
        for t in at {
            match &mut cur {
                Some(r) if t.saturating_sub(r.to_unix_us) <= gap => {
                    r.to_unix_us = t;
                    r.lines += 1;
                }
                _ => {
                    out.extend(cur.take());
                    cur = Some(Run {
                        node,
                        from_unix_us: t,
                        to_unix_us: t,
                        lines: 1,
                    });
                }
            }
        }
        out.extend(cur);
    }
    out.sort_by_key(|r| (r.from_unix_us, r.node));
    out
}

/// The pairs of runs on different nodes that overlap in time.
pub fn double_runs(vm: &str, runs: &[Run]) -> Vec<DoubleRun> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.node != b.node && a.from_unix_us <= b.to_unix_us && b.from_unix_us <= a.to_unix_us
            {
                let overlap_us =
                    a.to_unix_us.min(b.to_unix_us) - a.from_unix_us.max(b.from_unix_us);
                out.push(DoubleRun {
                    vm: vm.to_owned(),
                    a: *a,
                    b: *b,
                    overlap_us,
                });
            }
        }
    }
    out
}

/// Now on the host's wall clock, in microseconds (the clock journal stamps use).
pub fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a [`Writer`] did: the writes it got an OK for, and how many failed.
#[derive(Debug, Default, Clone)]
pub struct AckedWrites {
    /// Key -> value of every acknowledged put.
    pub acked: BTreeMap<String, String>,
    /// Puts that failed or timed out (their outcome is unknown).
    pub failed: u64,
}

impl AckedWrites {
    /// The acknowledged writes that reading through node `via` does not return as
    /// written (`key=value, read: ...`). One linearizable read first makes `via`'s replica
    /// hold every acknowledged write; the keys are then read from it as stale reads (one
    /// quorum round instead of one per key).
    pub async fn missing(&self, cluster: &Cluster, via: u64) -> Vec<String> {
        let synced = Wait::new(WAIT)
            .until(
                &format!("a linearizable read through node {via}"),
                || cluster.get(via, "checker-sync"),
                |_| true,
            )
            .await;
        if let Err(e) = synced {
            return vec![format!("no linearizable read through node {via}: {e}")];
        }
        let mut c = match cluster.client(via).await {
            Ok(c) => c,
            Err(e) => return vec![format!("node {via}: {e}")],
        };
        let mut out = Vec::new();
        for (k, v) in &self.acked {
            let mut req = tonic::Request::new(mpb::GetKvRequest { key: k.clone() });
            req.metadata_mut().insert(
                cluster_proto::STALE_READ_HEADER,
                tonic::metadata::MetadataValue::from_static("true"),
            );
            match c.get_kv(req).await.map(tonic::Response::into_inner) {
                Ok(r) if r.found && r.value == *v => {}
                Ok(r) => out.push(format!("{k}={v}, read: {:?}", r.found.then_some(r.value))),
                Err(e) => out.push(format!("{k}={v}, read failed: {e}")),
            }
        }
        out
    }

    /// Reads every acknowledged key through node `via` and panics (with the logs) naming
    /// those missing or different. Returns how many were checked.
    pub async fn verify(&self, cluster: &Cluster, via: u64) -> usize {
        let missing = self.missing(cluster, via).await;
        assert!(
            missing.is_empty(),
            "acknowledged writes lost (read through node {via}; {} acknowledged, {} failed): {missing:?}{}",
            self.acked.len(),
            self.failed,
            cluster.logs()
        );
        self.acked.len()
    }
}

/// How long one put of the [`Writer`] may take before it counts as failed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Puts `prefix-NODE-N` = `N` through each of the given nodes while a scenario runs.
pub struct Writer {
    acked: Arc<Mutex<AckedWrites>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing through each node of `via` (one task per node, one put at a time,
    /// a put every `every`): a node cut off stalls only its own writes.
    pub fn start(cluster: &Cluster, via: &[u64], prefix: &str, every: Duration) -> Writer {
        let acked: Arc<Mutex<AckedWrites>> = Arc::default();
        let mut tasks = Vec::new();
        for id in via {
            let addr = cluster.check(cluster.spec(*id)).mgmt_addr;
            let ep = crate::pki::admin_endpoint(addr);
            let c = ManagementServiceClient::new(
                ep.connect_timeout(Duration::from_secs(1)).connect_lazy(),
            );
            let out = acked.clone();
            let prefix = format!("{prefix}-{id}");
            tasks.push(tokio::spawn(async move {
                for n in 1u64.. {
                    let (key, value) = (format!("{prefix}-{n}"), n.to_string());
                    let mut c = c.clone();
                    let put = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        c.put_kv(mpb::PutKvRequest {
                            key: key.clone(),
                            value: value.clone(),
                        }),
                    )
                    .await;
                    {
                        let mut a = lock(&out);
                        match put {
                            Ok(Ok(_)) => {
                                a.acked.insert(key, value);
                            }
                            _ => a.failed += 1,
                        }
                    }
                    // The write load's pace (a stimulus, not a wait).
                    tokio::time::sleep(every).await;
                }
            }));
        }
        Writer { acked, tasks }
    }

    /// Acknowledged puts so far.
    pub fn acked(&self) -> usize {
        lock(&self.acked).acked.len()
    }

    /// Waits until at least `more` puts beyond `than` were acknowledged (the cluster
    /// takes writes); returns the count then.
    pub async fn wait_acked(&self, cluster: &Cluster, than: usize, more: usize) -> usize {
        let n = Wait::new(WAIT)
            .until(
                &format!("{more} more acknowledged writes than {than}"),
                || async { Ok::<_, String>(self.acked()) },
                |n| *n >= than + more,
            )
            .await;
        cluster.check(n)
    }

    /// Stops writing and returns what was acknowledged.
    pub fn stop(self) -> AckedWrites {
        for t in &self.tasks {
            t.abort();
        }
        lock(&self.acked).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(node: u64, ms: u64) -> Sighting {
        Sighting {
            at_unix_us: ms * 1000,
            node,
            text: String::new(),
        }
    }

    #[test]
    fn a_failover_is_two_runs_and_a_copy_that_ran_again_is_a_double_run() {
        // Node 1 until 1.0 s, node 2 from 2.8 s: a failover.
        let mut seen: Vec<Sighting> = (0..=10).map(|i| s(1, i * 100)).collect();
        seen.extend((28..=40).map(|i| s(2, i * 100)));
        let r = runs(&seen);
        assert_eq!(r.len(), 2);
        assert!(double_runs("vm", &r).is_empty());
        // Node 1 prints one line at 3.5 s: it ran again beside node 2's copy.
        seen.push(s(1, 3500));
        let d = double_runs("vm", &runs(&seen));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].a.node, d[0].b.node, d[0].overlap_us), (2, 1, 0));
        // A live migration: the source's last line before the target's first.
        let mut mig: Vec<Sighting> = (0..10).map(|i| s(1, i * 100)).collect();
        mig.extend((10..20).map(|i| s(2, i * 100 + 5)));
        assert!(double_runs("vm", &runs(&mig)).is_empty());
    }
}
