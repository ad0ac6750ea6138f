//! Snapshot files: a versioned, checksummed state file plus a sparse memory file.
//!
//! `DIR/state.bin` layout (little endian):
//! ```text
//! 0   8  magic  "VMMNSNAP"
//! 8   4  format version (FORMAT_VERSION)
//! 12  4  CRC32 of the payload
//! 16  8  payload length in bytes (at most STATE_BYTES_MAX)
//! 24  …  payload: bincode of SnapshotPayload { config, state, memory_bytes }
//! ```
//! Format versions: 2 (written) has NICs in the config and the device states; 1 (read,
//! from before NICs existed) is decoded with its own types and loaded with no NICs.
//! `DIR/memory.bin`: guest RAM regions back to back, all-zero pages as holes. Both files
//! are written under temporary names, synced, then renamed into place.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::config::{BootProtocol, DiskSlotConfig, VmConfig};
use crate::memory::{self, MemoryError};
use crate::state::{VmState, VmStateV1};
use crate::vm::{Vm, VmError};

/// Magic at the start of a state file.
pub const MAGIC: [u8; 8] = *b"VMMNSNAP";
/// Current format version; newer files are rejected, version 1 is still read.
pub const FORMAT_VERSION: u32 = 2;
/// Largest state payload read.
pub const STATE_BYTES_MAX: u64 = 64 << 20;
/// Header size.
pub const HEADER_BYTES: usize = 24;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Memory file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File I/O.
    #[error("snapshot file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Wrong magic.
    #[error("{path} is not a vmm-node snapshot (bad magic)")]
    BadMagic { path: PathBuf },
    /// Written by a newer vmm-node.
    #[error("{path} has format version {found}, this vmm-node reads up to {FORMAT_VERSION}")]
    NewerVersion { path: PathBuf, found: u32 },
    /// Payload length beyond the limit.
    #[error("{path} declares a {len_bytes}-byte state, more than the {STATE_BYTES_MAX} allowed")]
    TooLarge { path: PathBuf, len_bytes: u64 },
    /// File shorter than declared.
    #[error("{path} is truncated: {expected_bytes} bytes expected, {actual_bytes} present")]
    Truncated {
        path: PathBuf,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    /// Checksum mismatch.
    #[error("{path} is corrupted: CRC32 {actual:#010x}, header says {expected:#010x}")]
    Crc {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    /// Payload does not decode.
    #[error("{path}: state payload does not decode")]
    Decode {
        path: PathBuf,
        #[source]
        source: bincode::Error,
    },
    /// Encoding the payload failed.
    #[error("encoding snapshot state")]
    Encode(#[source] bincode::Error),
    /// Memory file.
    #[error("snapshot memory")]
    Memory(#[from] MemoryError),
    /// VM operation.
    #[error("VM")]
    Vm(#[from] Box<VmError>),
}

impl From<VmError> for SnapshotError {
    fn from(e: VmError) -> Self {
        SnapshotError::Vm(Box::new(e))
    }
}

/// What the state file holds.
#[derive(Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_bytes: u64,
}

/// [`VmConfig`] as format version 1 stored it (before NICs existed).
#[derive(Serialize, Deserialize)]
struct VmConfigV1 {
    name: String,
    vcpus: u8,
    memory_mib: u64,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    boot: BootProtocol,
    disks: Vec<DiskSlotConfig>,
}

/// [`SnapshotPayload`] of format version 1.
#[derive(Serialize, Deserialize)]
struct SnapshotPayloadV1 {
    config: VmConfigV1,
    state: VmStateV1,
    memory_bytes: u64,
}

impl From<SnapshotPayloadV1> for SnapshotPayload {
    fn from(v1: SnapshotPayloadV1) -> Self {
        let c = v1.config;
        SnapshotPayload {
            config: VmConfig {
                name: c.name,
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
                kernel: c.kernel,
                initramfs: c.initramfs,
                cmdline: c.cmdline,
                boot: c.boot,
                disks: c.disks,
                nics: Vec::new(),
            },
            state: v1.state.into(),
            memory_bytes: v1.memory_bytes,
        }
    }
}

fn bincode_opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(STATE_BYTES_MAX)
}

/// Encode a state file.
pub fn encode_state(payload: &SnapshotPayload) -> Result<Vec<u8>, SnapshotError> {
    let body = bincode_opts()
        .serialize(payload)
        .map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode a state file's bytes (`path` only names it in errors).
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<SnapshotPayload, SnapshotError> {
    let p = || path.to_path_buf();
    if bytes.len() < HEADER_BYTES {
        return Err(if bytes.len() >= 8 && bytes[..8] != MAGIC {
            SnapshotError::BadMagic { path: p() }
        } else {
            SnapshotError::Truncated {
                path: p(),
                expected_bytes: HEADER_BYTES as u64,
                actual_bytes: bytes.len() as u64,
            }
        });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic { path: p() });
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(SnapshotError::NewerVersion {
            path: p(),
            found: version,
        });
    }
    let crc = u32_at(12);
    let len_bytes = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if len_bytes > STATE_BYTES_MAX {
        return Err(SnapshotError::TooLarge {
            path: p(),
            len_bytes,
        });
    }
    let body = &bytes[HEADER_BYTES..];
    if (body.len() as u64) < len_bytes {
        return Err(SnapshotError::Truncated {
            path: p(),
            expected_bytes: HEADER_BYTES as u64 + len_bytes,
            actual_bytes: bytes.len() as u64,
        });
    }
    let body = &body[..len_bytes as usize];
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(SnapshotError::Crc {
            path: p(),
            expected: crc,
            actual,
        });
    }
    let decoded = if version == 1 {
        bincode_opts()
            .deserialize::<SnapshotPayloadV1>(body)
            .map(SnapshotPayload::from)
    } else {
        bincode_opts().deserialize(body)
    };
    decoded.map_err(|source| SnapshotError::Decode { path: p(), source })
}

/// Read and check `DIR/state.bin` (reads at most the header plus [`STATE_BYTES_MAX`]).
pub fn read_state(dir: &Path) -> Result<SnapshotPayload, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let io = |source| SnapshotError::Io {
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(io)?;
    let mut bytes = Vec::new();
    f.take(HEADER_BYTES as u64 + STATE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode_state(&path, &bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Timing of a snapshot save.
#[derive(Clone, Copy, Debug)]
pub struct SaveStats {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub total_ms: f64,
}

/// Snapshot a **paused** VM into `dir` (created if missing).
pub fn save(vm: &Vm, dir: &Path) -> Result<SaveStats, SnapshotError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let state = vm.save_state()?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_tmp = mem_path.with_extension("tmp");
    let memory_bytes = memory::save_to_file(vm.memory(), &mem_tmp)?;
    std::fs::rename(&mem_tmp, &mem_path).map_err(|source| SnapshotError::Io {
        path: mem_path.clone(),
        source,
    })?;
    let payload = SnapshotPayload {
        config: vm.current_config(),
        state,
        memory_bytes,
    };
    let bytes = encode_state(&payload)?;
    write_atomically(&dir.join(STATE_FILE), &bytes)?;
    let stats = SaveStats {
        state_bytes: bytes.len() as u64,
        memory_bytes,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    tracing::info!(dir = %dir.display(), state_bytes = stats.state_bytes,
        memory_bytes, total_ms = stats.total_ms, "snapshot saved");
    Ok(stats)
}

/// Restore a VM from `dir`; it is returned **paused** (call `resume`). Memory is mapped
/// copy-on-write from the memory file.
pub fn restore(dir: &Path) -> Result<Vm, SnapshotError> {
    restore_with(dir, |_| Ok(()))
}

/// Like [`restore`], calling `install_devices` on the new VM before its state is loaded
/// (e.g. to create the virtio-blk slots with `Vm::install_disk_slots(.., false)`).
pub fn restore_with(
    dir: &Path,
    install_devices: impl FnOnce(&Vm) -> Result<(), VmError>,
) -> Result<Vm, SnapshotError> {
    restore_edited(dir, |_| Ok(()), install_devices)
}

/// Like [`restore_with`], letting `edit` change the saved configuration first (e.g. the TAP
/// devices of the NICs on this host); the edited configuration is validated again.
pub fn restore_edited(
    dir: &Path,
    edit: impl FnOnce(&mut VmConfig) -> Result<(), VmError>,
    install_devices: impl FnOnce(&Vm) -> Result<(), VmError>,
) -> Result<Vm, SnapshotError> {
    let mut payload = read_state(dir)?;
    edit(&mut payload.config)?;
    let mem = memory::map_file(&dir.join(MEMORY_FILE), payload.memory_bytes)?;
    let vm = Vm::with_memory(payload.config, mem)?;
    install_devices(&vm)?;
    vm.restore_state(&payload.state)?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_payload() -> SnapshotPayload {
        // A syntactically complete state with default KVM structs (no KVM needed).
        let vcpu = crate::state::VcpuState {
            id: 0,
            cpuid: vec![Default::default()],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: None,
            debugregs: Default::default(),
            lapic: None,
            msrs: vec![(0x174, 7)],
            tsc: 123,
            vcpu_events: Default::default(),
        };
        SnapshotPayload {
            config: VmConfig::new(1, 16, "/k"),
            state: VmState {
                vcpus: vec![vcpu],
                vm: crate::state::VmWideState {
                    clock: Default::default(),
                    irqchips: vec![],
                    pit: None,
                    tsc_khz: 1000,
                    saved_at_unix_ns: 5,
                },
                devices: Default::default(),
            },
            memory_bytes: 16 << 20,
        }
    }

    #[test]
    fn roundtrip() {
        let bytes = encode_state(&sample_payload()).unwrap();
        let p = decode_state(Path::new("x"), &bytes).unwrap();
        assert_eq!(p.state.vcpus[0].tsc, 123);
        assert_eq!(p.state.vcpus[0].msrs, vec![(0x174, 7)]);
        assert_eq!(p.config, VmConfig::new(1, 16, "/k"));
    }

    #[test]
    fn corrupted_truncated_newer_and_garbage_are_rejected() {
        let bytes = encode_state(&sample_payload()).unwrap();
        let path = Path::new("s");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            decode_state(path, &flipped),
            Err(SnapshotError::Crc { .. })
        ));
        assert!(matches!(
            decode_state(path, &bytes[..bytes.len() - 10]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            decode_state(path, &bytes[..10]),
            Err(SnapshotError::Truncated { .. })
        ));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = decode_state(path, &newer).err().unwrap();
        assert!(
            matches!(e, SnapshotError::NewerVersion { found, .. } if found == FORMAT_VERSION + 1),
            "{e}"
        );
        assert!(matches!(
            decode_state(path, b"garbage garbage garbage garbage"),
            Err(SnapshotError::BadMagic { .. })
        ));
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_state(path, &huge),
            Err(SnapshotError::TooLarge { .. })
        ));
        // Valid CRC over a payload that does not decode.
        let mut bad = bytes[..HEADER_BYTES].to_vec();
        let body = vec![0xffu8; 40];
        bad[12..16].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bad[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        bad.extend_from_slice(&body);
        assert!(matches!(
            decode_state(path, &bad),
            Err(SnapshotError::Decode { .. })
        ));
    }

    /// A state file written before NICs existed (format 1) still loads, with no NICs.
    #[test]
    fn format_1_files_from_before_nics_still_decode() {
        let p = sample_payload();
        let v1 = SnapshotPayloadV1 {
            config: VmConfigV1 {
                name: p.config.name.clone(),
                vcpus: 1,
                memory_mib: 16,
                kernel: "/k".into(),
                initramfs: None,
                cmdline: "workload=idle".into(),
                boot: BootProtocol::Pvh,
                disks: vec![DiskSlotConfig {
                    slot: 3,
                    path: "/d".into(),
                    read_only: true,
                }],
            },
            state: VmStateV1 {
                vcpus: p.state.vcpus,
                vm: p.state.vm,
                devices: crate::state::DeviceStatesV1 {
                    serial: Default::default(),
                    disks: vec![crate::state::DiskSlotState {
                        slot: 3,
                        device: vec![1, 2, 3],
                    }],
                },
            },
            memory_bytes: 16 << 20,
        };
        let body = bincode_opts().serialize(&v1).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let got = decode_state(Path::new("old"), &bytes).unwrap();
        assert!(got.config.nics.is_empty());
        assert_eq!(got.config.cmdline, "workload=idle");
        assert_eq!(got.config.disks[0].slot, 3);
        assert_eq!(got.state.devices.disks[0].device, vec![1, 2, 3]);
        assert!(got.state.devices.nics.is_empty());
        assert_eq!(got.state.vcpus[0].tsc, 123);
        assert_eq!(got.memory_bytes, 16 << 20);
        // The migration decoder takes both layouts too.
        let opts = bincode::DefaultOptions::new().with_fixint_encoding();
        let v1_state = opts.serialize(&v1.state).unwrap();
        let st = crate::state::decode_any_version(opts, &v1_state).unwrap();
        assert_eq!(st.devices.disks.len(), 1);
        let mut v2 = sample_payload().state;
        v2.devices.nics = vec![crate::state::NicState {
            slot: 0,
            device: vec![9],
        }];
        let v2_bytes = opts.serialize(&v2).unwrap();
        let st = crate::state::decode_any_version(opts, &v2_bytes).unwrap();
        assert_eq!(st.devices.nics[0].device, vec![9]);
        assert!(crate::state::decode_any_version(opts, &[1, 2, 3]).is_err());
    }

    #[test]
    fn missing_snapshot_dir_is_a_clear_error() {
        let e = read_state(Path::new("/nonexistent/snap")).err().unwrap();
        assert!(e.to_string().contains("state.bin"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The state decoder never panics on arbitrary bytes, with or without a valid header.
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..4096), valid_header in any::<bool>()) {
            let bytes = if valid_header {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
                b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
                b.extend_from_slice(&(body.len() as u64).to_le_bytes());
                b.extend_from_slice(&body);
                b
            } else {
                body
            };
            let _ = decode_state(Path::new("fuzz"), &bytes);
        }
    }
}
