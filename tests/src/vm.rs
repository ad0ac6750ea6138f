//! Helpers that the VM process tests (`cluster-agent/tests/*.rs`, `ctl/tests/*.rs`) and
//! the bench binaries share: typed gRPC clients for one node, test-guest specs, waits for
//! VM, lock, migration and heartbeat state, status-code checks.
//!
//! The panicking helpers (`channel`, `vms`, `wait_vm`, ...) are for tests: their panic
//! carries the last state seen and the tail of every node's log. The `try_*` helpers
//! return a `String` error for the benches.

use cluster_proto::drain::drain_service_client::DrainServiceClient;
use cluster_proto::EnumName;
use std::time::Duration;

use cluster_proto::migrations as mpb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_proto::volumes as vpb;
use cluster_proto::volumes::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use vmm_node::guest_protocol::{heartbeats, Heartbeat};

use crate::{Cluster, HarnessError, Wait, WAIT};

/// How long one console read may stay silent before the stream is reopened (the VM may
/// be between owners).
const CONSOLE_SILENCE: Duration = Duration::from_secs(5);

/// Log lines per node that a failing process test prints.
const FAILURE_LOG_LINES: usize = 30;

impl Cluster {
    /// The tail of every node's log, each under a `--- node N ---` header: what a
    /// failing process test appends to its panic message.
    pub fn logs(&self) -> String {
        self.ids()
            .iter()
            .map(|id| {
                format!(
                    "\n--- node {id} ---\n{}",
                    self.log_tail(*id, FAILURE_LOG_LINES)
                )
            })
            .collect()
    }

    /// The first test-guest heartbeat of VM `name` (console streamed through node `via`)
    /// with a sequence number above `after` and a passing memory check (`mem=ok`): the
    /// node that produced it and the sequence number (see [`Cluster::wait_heartbeat`]).
    pub async fn heartbeat_after(&self, via: u64, name: &str, after: u64) -> (u64, u64) {
        let (node, hb) = self
            .wait_heartbeat(via, name, |h| h.seq > after && h.mem == "ok")
            .await;
        (node, hb.seq)
    }

    /// Streams VM `name`'s console through node `via` (its retained log, then live lines)
    /// until a test-guest heartbeat satisfies `pred`; returns the node that produced it
    /// and the newest such heartbeat of that chunk. Reopens the stream while the VM is
    /// between owners; panics with the console tail and the logs after [`WAIT`].
    pub async fn wait_heartbeat(
        &self,
        via: u64,
        name: &str,
        pred: impl Fn(&Heartbeat) -> bool,
    ) -> (u64, Heartbeat) {
        let mut seen = String::new();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let mut c = self.vms(via).await;
                let stream = c
                    .stream_console(pb::StreamConsoleRequest {
                        name: name.into(),
                        follow: true,
                        ..Default::default()
                    })
                    .await;
                match stream {
                    Ok(s) => {
                        let mut stream = s.into_inner();
                        let mut partial = String::new();
                        while let Ok(Ok(Some(chunk))) =
                            tokio::time::timeout(CONSOLE_SILENCE, stream.message()).await
                        {
                            partial.push_str(&chunk.text);
                            let complete = partial.rfind('\n').map_or(0, |i| i + 1);
                            let text: String = partial.drain(..complete).collect();
                            if let Some(hb) = heartbeats(&text).into_iter().rev().find(|h| pred(h))
                            {
                                return (chunk.node_id, hb);
                            }
                            seen.push_str(&text);
                            keep_tail(&mut seen, 4096);
                        }
                    }
                    Err(e) => seen = format!("console: {e}"),
                }
                // Paces reopening the stream while the VM is between owners.
                tokio::time::sleep(crate::wait::POLL).await;
            }
        })
        .await;
        match found {
            Ok(v) => v,
            Err(_) => panic!(
                "no matching heartbeat of {name} through node {via} within {WAIT:?}; \
                 console tail: {seen}{}",
                self.logs()
            ),
        }
    }

    /// A channel to node `id`'s management address; panics with the logs if it cannot
    /// connect.
    pub async fn channel(&self, id: u64) -> Channel {
        self.check(self.spec(id));
        self.connect_channel(id)
            .await
            .unwrap_or_else(|e| panic!("connect to node {id}: {e}{}", self.logs()))
    }

    /// The VM service of node `id` (see [`Cluster::channel`]).
    pub async fn vms(&self, id: u64) -> VmServiceClient<Channel> {
        VmServiceClient::new(self.channel(id).await)
    }

    /// The drain service of node `id` (see [`Cluster::channel`]).
    pub async fn drains(&self, id: u64) -> DrainServiceClient<Channel> {
        DrainServiceClient::new(self.channel(id).await)
    }

    /// The volume service of node `id` (see [`Cluster::channel`]).
    pub async fn vols(&self, id: u64) -> VolumeServiceClient<Channel> {
        VolumeServiceClient::new(self.channel(id).await)
    }

    /// The migration service of node `id` (see [`Cluster::channel`]).
    pub async fn migrations(&self, id: u64) -> MigrationServiceClient<Channel> {
        MigrationServiceClient::new(self.channel(id).await)
    }

    /// VM `name` read through node `via` once `pred` holds for it; panics with the last
    /// state seen (and the logs) after [`WAIT`].
    pub async fn wait_vm(
        &self,
        via: u64,
        name: &str,
        what: &str,
        pred: impl FnMut(&pb::VmInfo) -> bool,
    ) -> pb::VmInfo {
        let c = self.vms(via).await;
        let r = Wait::new(WAIT)
            .until(
                &format!("VM {name}: {what}"),
                || {
                    let mut c = c.clone();
                    async move { get_vm(&mut c, name).await }
                },
                pred,
            )
            .await;
        self.check(r)
    }

    /// VM `name` once its runtime state is `runtime` (e.g. "running", "stopped").
    pub async fn wait_runtime(&self, via: u64, name: &str, runtime: &str) -> pb::VmInfo {
        self.wait_vm(via, name, runtime, |v| v.runtime().name() == runtime)
            .await
    }

    /// VM `name` once it runs with no migration under way.
    pub async fn wait_settled(&self, via: u64, name: &str) -> pb::VmInfo {
        self.wait_vm(via, name, "running, not migrating", |v| {
            v.runtime().name() == "running" && v.migrating_to == 0
        })
        .await
    }

    /// Every VM, read through node `via`.
    pub async fn read_vms(&self, via: u64) -> Result<Vec<pb::VmInfo>, tonic::Status> {
        let mut c = self.vms(via).await;
        c.list_vms(pb::ListVmsRequest::default())
            .await
            .map(|r| r.into_inner().vms)
    }

    /// Every VM read through node `via` once `pred` holds for the list.
    pub async fn wait_vms(
        &self,
        via: u64,
        what: &str,
        mut pred: impl FnMut(&[pb::VmInfo]) -> bool,
    ) -> Vec<pb::VmInfo> {
        self.wait_until(what, WAIT, || self.read_vms(via), |v| pred(v))
            .await
    }

    /// Every VM, read through node `via`; panics (with the logs) if the call fails. An
    /// `Unavailable` answer (the node could not confirm its view with the leader in time,
    /// as on a host saturated by other work) is asked again until [`WAIT`] has passed.
    pub async fn list_vms(&self, via: u64) -> Vec<pb::VmInfo> {
        let mut c = self.vms(via).await;
        let start = std::time::Instant::now();
        loop {
            match c.list_vms(pb::ListVmsRequest::default()).await {
                Ok(r) => return r.into_inner().vms,
                Err(e) if e.code() == Code::Unavailable && start.elapsed() < WAIT => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("list VMs through node {via}: {e}{}", self.logs()),
            }
        }
    }

    /// Creates and starts `spec` through node `via`; returns the VM once it runs.
    pub async fn create_running(&self, via: u64, spec: pb::VmSpec) -> pb::VmInfo {
        let name = spec.name.clone();
        let created = self
            .vms(via)
            .await
            .create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                start: true,
            })
            .await;
        if let Err(e) = created {
            panic!("create {name}: {e}{}", self.logs());
        }
        self.wait_runtime(via, &name, "running").await
    }

    /// The disk locks, read through node `via`.
    pub async fn locks(&self, via: u64) -> Vec<vpb::DiskLock> {
        match self
            .vols(via)
            .await
            .list_locks(vpb::ListLocksRequest::default())
            .await
        {
            Ok(r) => r.into_inner().locks,
            Err(e) => panic!("list locks through node {via}: {e}{}", self.logs()),
        }
    }

    /// The lock of `disk`, if any, read through node `via`.
    pub async fn lock_of(&self, via: u64, disk: &str) -> Option<vpb::DiskLock> {
        self.locks(via).await.into_iter().find(|l| l.disk == disk)
    }

    /// The lock of `disk` (or its absence) read through node `via` once `pred` holds.
    pub async fn wait_lock(
        &self,
        via: u64,
        disk: &str,
        what: &str,
        mut pred: impl FnMut(Option<&vpb::DiskLock>) -> bool,
    ) -> Option<vpb::DiskLock> {
        let r = Wait::new(WAIT)
            .until(
                &format!("lock of {disk}: {what}"),
                || async { Ok::<_, HarnessError>(self.lock_of(via, disk).await) },
                |l| pred(l.as_ref()),
            )
            .await;
        self.check(r)
    }

    /// The running migration of `vm`, read through node `via`; panics (with the logs) when
    /// none is running within `wait`.
    pub async fn running_migration(
        &self,
        via: u64,
        vm: &str,
        wait: Duration,
    ) -> mpb::MigrationInfo {
        let m = self.migrations(via).await;
        let r = Wait::new(wait)
            .until_some(&format!("a running migration of {vm}"), || {
                let mut m = m.clone();
                async move {
                    m.list_migrations(mpb::ListMigrationsRequest {
                        vm: vm.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|l| {
                        l.into_inner()
                            .migrations
                            .into_iter()
                            .rev()
                            .find(|r| r.state().name() == "running")
                    })
                }
            })
            .await;
        self.check(r)
    }

    /// Migration `id` once it has ended (neither queued nor running), read through node
    /// `via`; panics (with the logs) when it has not ended within `wait`.
    pub async fn migration_end(&self, via: u64, id: u64, wait: Duration) -> mpb::MigrationInfo {
        let m = self.migrations(via).await;
        let r = Wait::new(wait)
            .until(
                &format!("the end of migration {id}"),
                || {
                    let mut m = m.clone();
                    async move {
                        m.get_migration(mpb::GetMigrationRequest { id })
                            .await
                            .map(|r| r.into_inner().migration.unwrap_or_default())
                    }
                },
                |r| r.state().name() != "running" && r.state().name() != "queued",
            )
            .await;
        self.check(r)
    }

    /// The progress stream of migration `id` through node `via`. Opening it is retried:
    /// `via` proxies the stream from the source node, whose replica may not have applied
    /// the migration's start yet (NotFound for a moment).
    pub async fn watch_migration(
        &self,
        via: u64,
        id: u64,
    ) -> tonic::Streaming<mpb::WatchMigrationResponse> {
        let m = self.migrations(via).await;
        let opened = Wait::new(WAIT)
            .until(
                &format!("a progress stream of migration {id}"),
                || {
                    let mut m = m.clone();
                    async move {
                        m.watch_migration(mpb::WatchMigrationRequest { id })
                            .await
                            .map(|s| StreamOpened(s.into_inner()))
                    }
                },
                |_| true,
            )
            .await;
        self.check(opened).0
    }

    /// Watches migration `id`'s progress through node `via` until a message satisfies
    /// `pred`, and returns it; panics (with the last message and the logs) when the
    /// stream ends first or after [`WAIT`].
    pub async fn watch_migration_until(
        &self,
        via: u64,
        id: u64,
        what: &str,
        pred: impl Fn(&mpb::WatchMigrationResponse) -> bool,
    ) -> mpb::WatchMigrationResponse {
        let mut stream = self.watch_migration(via, id).await;
        let mut last = None;
        let found = tokio::time::timeout(WAIT, async {
            while let Ok(Some(p)) = stream.message().await {
                if pred(&p) {
                    return Some(p);
                }
                last = Some(p);
            }
            None
        })
        .await;
        match found {
            Ok(Some(p)) => p,
            _ => panic!(
                "migration {id}: {what} not seen (last progress: {last:?}){}",
                self.logs()
            ),
        }
    }

    /// Migration `id` watched through node `via` until its progress shows it in pre-copy
    /// with guest memory on the wire: a migration the test holds there (with a bandwidth
    /// cap) is then provably between setup and switchover.
    pub async fn wait_precopy(&self, via: u64, id: u64) -> mpb::WatchMigrationResponse {
        self.watch_migration_until(via, id, "pre-copy with bytes sent", |p| {
            p.phase() == mpb::MigrationPhase::PreCopy && p.bytes_sent > 0 && p.finished.is_none()
        })
        .await
    }

    /// A channel to node `id`'s management address, for the benches.
    pub async fn try_channel(&self, id: u64) -> Result<Channel, String> {
        let addr = self.spec(id).map_err(|e| e.to_string())?.mgmt_addr;
        crate::pki::admin_endpoint(addr)
            .connect()
            .await
            .map_err(|e| format!("node {id}: {e}"))
    }

    /// The VM service of node `id`, for the benches.
    pub async fn try_vms(&self, id: u64) -> Result<VmServiceClient<Channel>, String> {
        Ok(VmServiceClient::new(self.try_channel(id).await?))
    }
}

/// An open progress stream (for [`Wait`], which shows the last value it read).
struct StreamOpened(tonic::Streaming<mpb::WatchMigrationResponse>);

impl std::fmt::Debug for StreamOpened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an open progress stream")
    }
}

/// Keeps the last `max` bytes of `s` (cut at a character boundary).
fn keep_tail(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = (s.len() - max..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s.drain(..cut);
    }
}

/// `GetVm` of `name`; an absent `vm` field reads as the default.
pub async fn get_vm(
    c: &mut VmServiceClient<Channel>,
    name: &str,
) -> Result<pb::VmInfo, tonic::Status> {
    c.get_vm(pb::GetVmRequest { name: name.into() })
        .await
        .map(|r| r.into_inner().vm.unwrap_or_default())
}

/// Panics unless `r` is an error with `code` whose message contains `needle`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s}");
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        }
        Ok(v) => panic!("expected {code:?} ({needle}), got {v:?}"),
    }
}

/// The name of a VM as listed.
pub fn vm_name(v: &pb::VmInfo) -> &str {
    v.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// Config lines (for [`Cluster::add_node_with`], last) that make a node report `vendor`
/// as its CPU vendor. Tests that depend on vendors set it on every node involved: the
/// host's own vendor differs from one machine to the next.
pub fn cpu_vendor_toml(vendor: &str) -> String {
    format!("[facts_override]\ncpu_vendor = \"{vendor}\"\n")
}

/// The test guest checking 8 MiB of its memory, with a heartbeat every 100 ms.
pub fn mem_boot() -> pb::TestGuestBoot {
    pb::TestGuestBoot {
        workload: pb::Workload::Mem as i32,
        wss_mib: 8,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    }
}

/// A one-vCPU VM `name` of `memory_mib` booting the test guest with `boot`.
pub fn guest_spec(name: &str, memory_mib: u64, boot: pb::TestGuestBoot) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        boot: Some(pb::vm_spec::Boot::TestGuest(boot)),
        ..Default::default()
    }
}

/// The sequence number of a test-guest heartbeat line (`HB seq=N ...`; 0 if `N` does
/// not parse), or `None` for any other line.
pub fn hb_seq(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("HB seq=")?;
    Some(
        rest.split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    )
}

/// `GetVm` of `name`, or the default `VmInfo` if the call fails (for polling loops).
pub async fn vm_or_default(c: &mut VmServiceClient<Channel>, name: &str) -> pb::VmInfo {
    get_vm(c, name).await.unwrap_or_default()
}

/// `GetVm` of `name` with the status as a `String` error, for the benches.
pub async fn try_get_vm(
    c: &mut VmServiceClient<Channel>,
    name: &str,
) -> Result<pb::VmInfo, String> {
    get_vm(c, name).await.map_err(|s| s.to_string())
}

/// Polls `name` every 5 ms until it runs on `to` with no migration under way, for the
/// benches; an error if it ended up elsewhere or `timeout` passed since `started`.
pub async fn try_wait_migrated(
    c: &mut VmServiceClient<Channel>,
    name: &str,
    to: u64,
    started: std::time::Instant,
    timeout: std::time::Duration,
) -> Result<(), String> {
    loop {
        let v = try_get_vm(c, name).await?;
        if v.migrating_to == 0 && v.owner_id == to && v.runtime().name() == "running" {
            return Ok(());
        }
        if v.migrating_to == 0 && v.owner_id != to {
            return Err(format!("migration failed: {}", v.reason));
        }
        if started.elapsed() > timeout {
            return Err("migration did not finish".into());
        }
        // Paces the poll (a bench measures the switch, so it looks often).
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
