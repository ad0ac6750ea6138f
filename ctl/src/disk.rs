//! `clusterctl disk ...` and `clusterctl vm disk attach|detach`: shared-volume disks, the
//! replicated lock table and hot-plug (`cluster.volumes.v1.VolumeService`).

use clap::Subcommand;
use cluster_proto::volumes as pb;
use cluster_proto::volumes::volume_service_client::VolumeServiceClient;
use cluster_proto::EnumName;
use serde::Serialize;

use crate::client::{call, service, CtlError};
use crate::output::table;
use crate::{Cli, Format};

#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// Create a sparse disk image on a shared volume (volume/dir/disk.img).
    Create {
        name: String,
        /// Size in MiB.
        #[arg(long)]
        size_mib: u64,
    },
    /// Every disk on the shared volumes, with its lock and the VMs using it.
    List,
    /// The replicated lock table: disk, mode, holder node(s), fencing token.
    Locks,
}

#[derive(Debug, Subcommand)]
pub enum VmDiskCmd {
    /// Hot-add a disk to a VM (a running VM gets it in a free virtio-blk slot).
    Attach {
        name: String,
        disk: String,
        /// Attach read-only (shared lock).
        #[arg(long)]
        read_only: bool,
    },
    /// Hot-remove a disk from a VM (flushed, closed, lock released).
    Detach { name: String, disk: String },
}

#[derive(Serialize)]
struct LockJson<'a> {
    disk: &'a str,
    mode: &'a str,
    holders: &'a [u64],
    token: u64,
    term: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    handoff: Option<HandoffJson>,
}

/// A staged live-migration handoff: the next holder and its reserved token.
#[derive(Serialize)]
struct HandoffJson {
    to: u64,
    token: u64,
}

fn lock_json(l: &pb::DiskLock) -> LockJson<'_> {
    LockJson {
        disk: &l.disk,
        mode: l.mode().name(),
        holders: &l.holders,
        token: l.token,
        term: l.term,
        handoff: (l.handoff_to != 0).then_some(HandoffJson {
            to: l.handoff_to,
            token: l.handoff_token,
        }),
    }
}

/// The HANDOFF column: `node N, token T` while a staged handoff is reserved.
fn handoff_cell(l: &pb::DiskLock) -> String {
    if l.handoff_to == 0 {
        "-".into()
    } else {
        format!("node {}, token {}", l.handoff_to, l.handoff_token)
    }
}

fn holders(h: &[u64]) -> String {
    h.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `disk list` as a table; `-o wide` adds the space each image takes on its volume
/// (sparse images grow as written) and the Raft term of its lock.
fn render_disks(fmt: Format, disks: &[pb::DiskInfo]) -> String {
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = disks
        .iter()
        .map(|d| {
            let (mode, holder, token, term) = match &d.lock {
                Some(l) => (
                    l.mode().name().to_owned(),
                    holders(&l.holders),
                    l.token.to_string(),
                    l.term.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            let mut row = vec![d.name.clone(), format!("{}", d.size_bytes >> 20)];
            if wide {
                row.push(format!("{}", d.allocated_bytes >> 20));
            }
            row.extend([mode, holder, token]);
            if wide {
                row.push(term);
            }
            row.push(if d.used_by.is_empty() && wide {
                "-".into()
            } else {
                d.used_by.join(",")
            });
            row
        })
        .collect();
    let mut headers = vec!["DISK", "SIZE_MIB"];
    if wide {
        headers.push("ALLOCATED_MIB");
    }
    headers.extend(["LOCK", "HOLDERS", "TOKEN"]);
    if wide {
        headers.push("TERM");
    }
    headers.push("USED_BY");
    table(&headers, &rows)
}

pub async fn run(cli: &Cli, cmd: &DiskCmd) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, VolumeServiceClient::new).await?;
    match cmd {
        DiskCmd::Create { name, size_mib } => {
            let d = call(
                ep,
                timeout,
                c.create_disk(pb::CreateDiskRequest {
                    name: name.clone(),
                    size_mib: *size_mib,
                }),
            )
            .await?;
            let d = crate::client::required(d.disk, "disk")?;
            Ok(match cli.output {
                Format::Json | Format::Yaml => json(&serde_json::json!({
                    "name": d.name, "size_bytes": d.size_bytes,
                })),
                Format::Table | Format::Wide => {
                    format!("disk {} created ({} MiB)\n", d.name, d.size_bytes >> 20)
                }
            })
        }
        DiskCmd::List => {
            let volumes = std::cell::RefCell::new(Vec::new());
            let disks = crate::client::all_pages(|page_token| {
                let mut c = c.clone();
                let volumes = &volumes;
                async move {
                    let req = pb::ListDisksRequest {
                        page_size: crate::client::PAGE_SIZE,
                        page_token,
                    };
                    let r = call(ep, timeout, c.list_disks(req)).await?;
                    *volumes.borrow_mut() = r.volumes;
                    Ok((r.disks, r.next_page_token))
                }
            })
            .await?;
            let r = pb::ListDisksResponse {
                volumes: volumes.into_inner(),
                disks,
                next_page_token: String::new(),
            };
            Ok(match cli.output {
                Format::Json | Format::Yaml => json(&serde_json::json!({
                    "volumes": r.volumes,
                    "disks": r.disks.iter().map(|d| serde_json::json!({
                        "name": d.name,
                        "size_bytes": d.size_bytes,
                        "allocated_bytes": d.allocated_bytes,
                        "lock": d.lock.as_ref().map(lock_json),
                        "used_by": d.used_by,
                    })).collect::<Vec<_>>(),
                })),
                Format::Table | Format::Wide => {
                    if r.volumes.is_empty() {
                        return Ok("this agent has no shared volumes configured ([[volumes]] in its config)\n".into());
                    }
                    render_disks(cli.output, &r.disks)
                }
            })
        }
        DiskCmd::Locks => {
            let locks = crate::client::all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let req = pb::ListLocksRequest {
                        page_size: crate::client::PAGE_SIZE,
                        page_token,
                    };
                    let r = call(ep, timeout, c.list_locks(req)).await?;
                    Ok((r.locks, r.next_page_token))
                }
            })
            .await?;
            let r = pb::ListLocksResponse {
                locks,
                next_page_token: String::new(),
            };
            Ok(match cli.output {
                Format::Json | Format::Yaml => {
                    json(&r.locks.iter().map(lock_json).collect::<Vec<_>>())
                }
                Format::Table | Format::Wide => {
                    let rows: Vec<Vec<String>> = r
                        .locks
                        .iter()
                        .map(|l| {
                            vec![
                                l.disk.clone(),
                                l.mode().name().to_owned(),
                                holders(&l.holders),
                                l.token.to_string(),
                                l.term.to_string(),
                                handoff_cell(l),
                            ]
                        })
                        .collect();
                    table(
                        &["DISK", "MODE", "HOLDERS", "TOKEN", "TERM", "HANDOFF"],
                        &rows,
                    )
                }
            })
        }
    }
}

pub async fn run_vm_disk(cli: &Cli, cmd: &VmDiskCmd) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, VolumeServiceClient::new).await?;
    let r = match cmd {
        VmDiskCmd::Attach {
            name,
            disk,
            read_only,
        } => call(
            ep,
            timeout,
            c.attach_disk(pb::AttachDiskRequest {
                vm: name.clone(),
                disk: disk.clone(),
                read_only: *read_only,
            }),
        )
        .await
        .map(|r| (r.vm, r.disks))?,
        VmDiskCmd::Detach { name, disk } => call(
            ep,
            timeout,
            c.detach_disk(pb::DetachDiskRequest {
                vm: name.clone(),
                disk: disk.clone(),
            }),
        )
        .await
        .map(|r| (r.vm, r.disks))?,
    };
    let (vm, disks) = r;
    Ok(match cli.output {
        Format::Json | Format::Yaml => json(&serde_json::json!({"vm": vm, "disks": disks})),
        Format::Table | Format::Wide => format!("VM {} disks: {}\n", vm, disks.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_disk_list_adds_allocation_and_lock_term() {
        let disks = [
            pb::DiskInfo {
                name: "vol/vms/db1.img".into(),
                size_bytes: 256 << 20,
                allocated_bytes: 12 << 20,
                lock: Some(pb::DiskLock {
                    disk: "vol/vms/db1.img".into(),
                    mode: pb::LockMode::Exclusive as i32,
                    holders: vec![2],
                    token: 41,
                    term: 3,
                    ..Default::default()
                }),
                used_by: vec!["db1".into()],
            },
            pb::DiskInfo {
                name: "vol/spare.img".into(),
                size_bytes: 64 << 20,
                ..Default::default()
            },
        ];
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let t = render_disks(Format::Wide, &disks);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            cells(lines[0]),
            [
                "DISK",
                "SIZE_MIB",
                "ALLOCATED_MIB",
                "LOCK",
                "HOLDERS",
                "TOKEN",
                "TERM",
                "USED_BY"
            ],
            "{t}"
        );
        assert_eq!(
            cells(lines[1]),
            [
                "vol/vms/db1.img",
                "256",
                "12",
                "exclusive",
                "2",
                "41",
                "3",
                "db1"
            ],
            "{t}"
        );
        assert_eq!(
            cells(lines[2]),
            ["vol/spare.img", "64", "0", "-", "-", "-", "-", "-"],
            "{t}"
        );
        // The default table is unchanged.
        let plain = render_disks(Format::Table, &disks);
        assert_eq!(
            cells(plain.lines().next().unwrap_or_default()),
            ["DISK", "SIZE_MIB", "LOCK", "HOLDERS", "TOKEN", "USED_BY"],
            "{plain}"
        );
        assert_eq!(
            cells(plain.lines().nth(1).unwrap_or_default()),
            ["vol/vms/db1.img", "256", "exclusive", "2", "41", "db1"],
            "{plain}"
        );
    }

    #[test]
    fn a_reserved_handoff_shows_its_target_and_token() {
        let mut l = pb::DiskLock {
            disk: "vol/vms/db1.img".into(),
            mode: pb::LockMode::Exclusive as i32,
            holders: vec![1],
            token: 7,
            term: 2,
            ..Default::default()
        };
        assert_eq!(handoff_cell(&l), "-");
        assert!(!json(&lock_json(&l)).contains("handoff"));
        l.handoff_to = 3;
        l.handoff_token = 12;
        assert_eq!(handoff_cell(&l), "node 3, token 12");
        let j: serde_json::Value = serde_json::from_str(&json(&lock_json(&l))).unwrap();
        assert_eq!(j["handoff"]["to"], 3);
        assert_eq!(j["handoff"]["token"], 12);
        assert_eq!(j["holders"][0], 1);
    }
}
