//! Helpers that the VM process tests (`cluster-agent/tests/*.rs`) and the bench binaries
//! share: typed gRPC clients for one node, test-guest specs, status-code checks and the
//! heartbeat line format of the test guest.
//!
//! The panicking helpers (`channel`, `vms`, ...) are for tests: their panic carries the
//! tail of every node's log. The `try_*` helpers return a `String` error for the benches.

use cluster_proto::drain::drain_service_client::DrainServiceClient;
use std::time::{Duration, Instant};

use cluster_proto::migrations as mpb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_proto::volumes::volume_service_client::VolumeServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::Cluster;

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
    /// node that produced it and the sequence number. Reopens the stream while the VM is
    /// between owners; panics with the logs after 30 s.
    pub async fn heartbeat_after(&self, via: u64, name: &str, after: u64) -> (u64, u64) {
        let mut c = self.vms(via).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let Ok(s) = c
                .stream_console(pb::ConsoleRequest {
                    name: name.into(),
                    follow: true,
                })
                .await
            else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let mut s = s.into_inner();
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(std::time::Duration::from_secs(3), s.message()).await
            {
                for line in chunk.text.lines() {
                    match hb_seq(line) {
                        Some(seq) if seq > after && line.contains("mem=ok") => {
                            return (chunk.node_id, seq)
                        }
                        _ => {}
                    }
                }
            }
        }
        panic!(
            "no heartbeat of {name} above {after} via {via}{}",
            self.logs()
        )
    }

    /// A channel to node `id`'s management address; panics with the logs if it cannot
    /// connect.
    pub async fn channel(&self, id: u64) -> Channel {
        let addr = self.check(self.spec(id)).mgmt_addr;
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|e| panic!("endpoint: {e}"))
            .connect()
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

    /// The running migration of `vm`, read through node `via`; panics (with the logs) when
    /// none is running within `wait`.
    pub async fn running_migration(
        &self,
        via: u64,
        vm: &str,
        wait: Duration,
    ) -> mpb::MigrationInfo {
        let mut m = self.migrations(via).await;
        let start = Instant::now();
        loop {
            let l = m
                .list_migrations(mpb::ListMigrationsRequest { vm: vm.into() })
                .await
                .unwrap_or_else(|e| panic!("list migrations: {e}"))
                .into_inner();
            if let Some(r) = l.migrations.iter().rev().find(|r| r.state == "running") {
                return r.clone();
            }
            assert!(
                start.elapsed() < wait,
                "no running migration of {vm}: {l:?}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Migration `id` once it has ended (neither queued nor running), read through node
    /// `via`; panics (with the logs) when it has not ended within `wait`.
    pub async fn migration_end(&self, via: u64, id: u64, wait: Duration) -> mpb::MigrationInfo {
        let mut m = self.migrations(via).await;
        let start = Instant::now();
        loop {
            let r = m
                .get_migration(mpb::MigrationId { id })
                .await
                .unwrap_or_else(|e| panic!("show migration {id}: {e}"))
                .into_inner()
                .migration
                .unwrap_or_default();
            if r.state != "running" && r.state != "queued" {
                return r;
            }
            assert!(
                start.elapsed() < wait,
                "migration {id} did not end: {r:?}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A channel to node `id`'s management address, for the benches.
    pub async fn try_channel(&self, id: u64) -> Result<Channel, String> {
        let addr = self.spec(id).map_err(|e| e.to_string())?.mgmt_addr;
        Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("node {id}: {e}"))
    }

    /// The VM service of node `id`, for the benches.
    pub async fn try_vms(&self, id: u64) -> Result<VmServiceClient<Channel>, String> {
        Ok(VmServiceClient::new(self.try_channel(id).await?))
    }
}

/// `GetVm` of `name`; an absent `vm` field reads as the default.
pub async fn get_vm(
    c: &mut VmServiceClient<Channel>,
    name: &str,
) -> Result<pb::VmInfo, tonic::Status> {
    c.get_vm(pb::VmName { name: name.into() })
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

/// The test guest checking 8 MiB of its memory, with a heartbeat every 100 ms.
pub fn mem_boot() -> pb::TestGuestBoot {
    pb::TestGuestBoot {
        workload: "mem".into(),
        wss_mib: 8,
        hb_ms: 100,
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
        if v.migrating_to == 0 && v.owner_id == to && v.runtime == "running" {
            return Ok(());
        }
        if v.migrating_to == 0 && v.owner_id != to {
            return Err(format!("migration failed: {}", v.reason));
        }
        if started.elapsed() > timeout {
            return Err("migration did not finish".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
