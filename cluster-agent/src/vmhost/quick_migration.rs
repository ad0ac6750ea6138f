//! Quick migration: pause, save the VM (vmm-node snapshot: state + memory) and its disk
//! slots into `<volume root>/.quick/<vm>/` on a shared volume, close the disks (the
//! agent commits the returned `Handoff`s), then restore on the target host with the
//! grants the handoff produced. Downtime = save + handoff + restore.
//!
//! The slot states and disk layout go into a sidecar file `vmhost.bin` beside vmm-node's
//! snapshot files: magic, format version, CRC32, length, JSON payload, read-size limit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use csv_volume::{LockCommand, LockGrant, NodeId};
use serde::{Deserialize, Serialize};
use vmm_node::migration::quick::QuickSaveStats;
use vmm_node::state::DiskSlotState;

use super::machine::{open_disk, CloseFor, HostedVm, OpenMode, SlotDisk};
use super::spec::{valid_vm_name, VmSpec};
use super::{VmHost, VmHostError, VmInfo};

/// Directory under a volume root that holds quick-migration images.
pub const QUICK_DIR: &str = ".quick";
/// Sidecar file name.
pub const SIDECAR_FILE: &str = "vmhost.bin";
const SIDECAR_MAGIC: &[u8; 8] = b"VMHQUICK";
const SIDECAR_VERSION: u32 = 1;
const SIDECAR_HEADER_BYTES: usize = 8 + 4 + 4 + 8;
/// Largest sidecar accepted.
pub const SIDECAR_BYTES_MAX: u64 = 1 << 20;

/// A VM saved for quick migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuickImage {
    pub vm: String,
    /// Snapshot directory on the shared volume; pass it to [`VmHost::quick_restore`].
    pub dir: PathBuf,
    /// Lock commands to commit before the target restores (Handoff / Release).
    pub release: Vec<LockCommand>,
    pub save: QuickSaveStats,
}

/// Target-side figures of a quick migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuickRestoreStats {
    pub restore_us: u64,
    pub resume_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    spec: VmSpec,
    layout: Vec<SlotDisk>,
    slots: Vec<DiskSlotState>,
    source_node: NodeId,
}

/// Why a sidecar could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes, over the {SIDECAR_BYTES_MAX}-byte limit")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is not a quick-migration sidecar (bad magic or truncated header)")]
    BadMagic { path: PathBuf },
    #[error("{path} has format version {found}, this node reads version {SIDECAR_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: payload length does not match the file")]
    Truncated { path: PathBuf },
    #[error("{path}: CRC mismatch")]
    Crc { path: PathBuf },
    #[error("{path}: payload does not decode")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn encode_sidecar(s: &Sidecar) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(s)?;
    let mut out = Vec::with_capacity(SIDECAR_HEADER_BYTES + body.len());
    out.extend_from_slice(SIDECAR_MAGIC);
    out.extend_from_slice(&SIDECAR_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_sidecar(path: &Path, bytes: &[u8]) -> Result<Sidecar, SidecarError> {
    let p = || path.to_path_buf();
    if bytes.len() < SIDECAR_HEADER_BYTES || &bytes[..8] != SIDECAR_MAGIC {
        return Err(SidecarError::BadMagic { path: p() });
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != SIDECAR_VERSION {
        return Err(SidecarError::Version {
            path: p(),
            found: version,
        });
    }
    let crc = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    let body = &bytes[SIDECAR_HEADER_BYTES..];
    if body.len() as u64 != len {
        return Err(SidecarError::Truncated { path: p() });
    }
    if crc32fast::hash(body) != crc {
        return Err(SidecarError::Crc { path: p() });
    }
    serde_json::from_slice(body).map_err(|source| SidecarError::Decode { path: p(), source })
}

fn read_sidecar(dir: &Path) -> Result<Sidecar, SidecarError> {
    let path = dir.join(SIDECAR_FILE);
    let io = |source| SidecarError::Io {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(&path).map_err(io)?.len();
    if len > SIDECAR_BYTES_MAX {
        return Err(SidecarError::TooLarge { path, len });
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    decode_sidecar(&path, &bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn quick_err<'a>(
    vm: &'a str,
    what: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> VmHostError + 'a {
    move |source| VmHostError::Quick {
        vm: vm.to_owned(),
        what,
        source,
    }
}

impl VmHost {
    /// The quick-migration directory of `vm` on `volume`.
    pub fn quick_dir(&self, volume: &str, vm: &str) -> Result<PathBuf, VmHostError> {
        if !valid_vm_name(vm) {
            return Err(VmHostError::NotFound(vm.to_owned()));
        }
        let v = self
            .registry()
            .volume(volume)
            .map_err(|source| VmHostError::Volume {
                disk: format!("{volume} (quick migration volume)"),
                source,
            })?;
        Ok(v.root().join(QUICK_DIR).join(vm))
    }

    /// Quick migration, source half: pauses `name`, saves it into the shared `volume`,
    /// closes its disks for `target_node` and removes it from this host. On error the VM
    /// runs on here as before.
    #[tracing::instrument(skip(self))]
    pub fn quick_save(
        &self,
        name: &str,
        volume: &str,
        target_node: NodeId,
    ) -> Result<QuickImage, VmHostError> {
        let dir = self.quick_dir(volume, name)?;
        if let Some(w) = self.worker(name) {
            let image =
                w.quick_save(volume, target_node)
                    .map_err(|source| VmHostError::Worker {
                        vm: name.to_owned(),
                        source,
                    })?;
            self.forget_worker(name);
            return Ok(image);
        }
        let vm = self.get(name)?;
        let claim = vm.claim()?;
        self.require_running(&vm)?;
        let t = Instant::now();
        vm.vm.pause().map_err(|source| VmHostError::Vm {
            vm: name.to_owned(),
            op: "pause",
            source,
        })?;
        let pause_us = t.elapsed().as_micros() as u64;
        let result = self.save_paused(&vm, &dir, target_node);
        match result {
            Ok((release, mut save)) => {
                save.pause_us = pause_us;
                self.unregister(&vm);
                if let Err(e) = vm.vm.stop() {
                    tracing::error!(vm = name, error = %e, "stopping the saved VM");
                }
                self.delete_taps(&vm.current_spec());
                drop(claim);
                tracing::info!(vm = name, dir = %dir.display(), save_us = save.save_us, "quick migration saved");
                Ok(QuickImage {
                    vm: name.to_owned(),
                    dir,
                    release,
                    save,
                })
            }
            Err(e) => {
                if let Err(r) = vm.vm.resume() {
                    tracing::error!(vm = name, error = %r, "cannot resume after a failed quick save");
                }
                Err(e)
            }
        }
    }

    fn save_paused(
        &self,
        vm: &Arc<HostedVm>,
        dir: &Path,
        target_node: NodeId,
    ) -> Result<(Vec<LockCommand>, QuickSaveStats), VmHostError> {
        let name = vm.name();
        let t = Instant::now();
        let slots = vm.save_slots();
        let sidecar = Sidecar {
            spec: vm.current_spec(),
            layout: vm.slot_disks(),
            slots: slots.clone(),
            source_node: self.node(),
        };
        let stats = vmm_node::migration::quick::save(&vm.vm, dir)
            .map_err(|e| quick_err(name, "saving the snapshot")(Box::new(e)))?;
        let bytes = encode_sidecar(&sidecar)
            .map_err(|e| quick_err(name, "encoding the disk sidecar")(Box::new(e)))?;
        write_atomically(&dir.join(SIDECAR_FILE), &bytes)
            .map_err(|e| quick_err(name, "writing the disk sidecar")(Box::new(e)))?;
        let release = vm.detach_all(
            CloseFor::Handoff { to: target_node },
            &slots,
            self.registry(),
            self.node(),
        )?;
        Ok((
            release,
            QuickSaveStats {
                save_us: t.elapsed().as_micros() as u64,
                ..stats
            },
        ))
    }

    /// Quick migration, target half (or the source taking its VM back): restores the VM
    /// saved in `dir`, opening its disks with `grants`, resumes and registers it, then
    /// deletes the image.
    #[tracing::instrument(skip(self, grants))]
    pub fn quick_restore(
        &self,
        dir: &Path,
        grants: &[LockGrant],
    ) -> Result<(VmInfo, QuickRestoreStats), VmHostError> {
        let dir_name = dir.display().to_string();
        let sidecar = read_sidecar(dir).map_err(|e| VmHostError::Quick {
            vm: dir_name.clone(),
            what: "reading the disk sidecar",
            source: Box::new(e),
        })?;
        let name = sidecar.spec.name.clone();
        sidecar.spec.validate().map_err(VmHostError::Spec)?;
        for d in &sidecar.layout {
            super::machine::check_grant(
                &d.disk,
                super::machine::grant_for(grants, &d.disk.name)?,
                self.node(),
            )?;
        }
        let settings = self.worker_settings();
        if let Some(settings) = settings {
            return self.start_in_worker(
                &settings,
                sidecar.spec,
                grants,
                OpenMode::Start,
                Some(dir.to_owned()),
            );
        }
        let reservation = self.reserve(&name)?;
        let taps = self.create_taps(&sidecar.spec)?;
        let tap_names = super::nics::tap_names(self.node(), &sidecar.spec);
        let t = Instant::now();
        let vm = vmm_node::snapshot::restore_edited(
            dir,
            |c| Ok(c.set_nic_taps(&tap_names)?),
            |vm| vmm_node::devices::virtio::net::install_virtio_nics(vm).map(|_| ()),
        )
        .map_err(|e| quick_err(&name, "restoring the snapshot")(Box::new(e)))?;
        let hosted = Arc::new(HostedVm::new(sidecar.spec, vm)?);
        self.journal_console(&hosted);
        hosted.restore_slots(&sidecar.slots, &sidecar.layout, grants, |d, g| {
            open_disk(self.registry(), self.node(), d, g, OpenMode::Handoff)
        })?;
        let restore_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        hosted.vm.resume().map_err(|source| VmHostError::Vm {
            vm: name.clone(),
            op: "resume",
            source,
        })?;
        let stats = QuickRestoreStats {
            restore_us,
            resume_us: t.elapsed().as_micros() as u64,
        };
        reservation.commit(hosted.clone());
        taps.keep();
        // The memory file stays mapped (copy-on-write) until the VM ends; unlinking it
        // now is safe.
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the quick-migration image");
        }
        tracing::info!(vm = %name, restore_us, "quick migration restored");
        Ok((self.info_of(&hosted), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sidecar {
        Sidecar {
            spec: VmSpec::test_guest(
                "q",
                1,
                32,
                super::super::spec::TestWorkload::new(super::super::spec::WorkloadName::Idle),
            ),
            layout: vec![],
            slots: vec![DiskSlotState {
                slot: 0,
                device: vec![1, 2, 3],
            }],
            source_node: 7,
        }
    }

    #[test]
    fn sidecar_round_trips_and_rejects_damage() {
        let p = Path::new("x");
        let bytes = encode_sidecar(&sample()).unwrap();
        let back = decode_sidecar(p, &bytes).unwrap();
        assert_eq!(back.source_node, 7);
        assert_eq!(back.slots[0].device, vec![1, 2, 3]);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            decode_sidecar(p, &flipped),
            Err(SidecarError::Crc { .. })
        ));
        assert!(matches!(
            decode_sidecar(p, &bytes[..bytes.len() - 1]),
            Err(SidecarError::Truncated { .. })
        ));
        assert!(matches!(
            decode_sidecar(p, b"short"),
            Err(SidecarError::BadMagic { .. })
        ));
        let mut newer = bytes.clone();
        newer[8] = 9;
        assert!(matches!(
            decode_sidecar(p, &newer),
            Err(SidecarError::Version { found: 9, .. })
        ));
    }
}
