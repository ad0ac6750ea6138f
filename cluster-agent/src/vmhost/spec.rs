//! Translation of the stored [`VmSpec`] into vmm-node's [`VmConfig`].

use std::path::{Path, PathBuf};

use csv_volume::VolumeRegistry;
use vmm_node::guest_protocol::{Workload, WorkloadKind};
use vmm_node::{BootProtocol, VmConfig};

pub use crate::state::vm_spec::{
    valid_vm_name, BootSpec, DiskSpec, NicSpec, SpecError, TestWorkload, VmSpec, WorkloadName,
};

use super::VmHostError;

/// The guest-side workload of a test-guest VM.
pub fn workload(w: TestWorkload) -> Workload {
    Workload {
        kind: match w.kind {
            WorkloadName::Idle => WorkloadKind::Idle,
            WorkloadName::Dirty => WorkloadKind::Dirty,
            WorkloadName::Mem => WorkloadKind::Mem,
            WorkloadName::Disk => WorkloadKind::Disk,
            WorkloadName::Net => WorkloadKind::Net,
        },
        wss_mib: w.wss_mib,
        rate_mbps: w.rate_mbps,
        seed: w.seed,
        hb_ms: w.hb_ms,
    }
}

/// Largest kernel image a VM may boot from.
pub const KERNEL_BYTES_MAX: u64 = 256 << 20;
/// Largest initrd a VM may boot with.
pub const INITRD_BYTES_MAX: u64 = 1 << 30;

/// Why a kernel or initrd is refused (nothing is read from it).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("this node allows no kernel images: list the directories they may come from in `image_dirs` of its config")]
    NoImageDirs,
    #[error("{what} {path} cannot be used")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is outside this node's image_dirs ({dirs})")]
    OutsideImageDirs {
        what: &'static str,
        path: PathBuf,
        dirs: String,
    },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {path} is {len} bytes; at most {max} are allowed")]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        len: u64,
        max: u64,
    },
}

/// `path` resolved (symlinks included) lies in one of `dirs`, is a regular file and at
/// most `max` bytes. Checked before vmm-node opens it: a FIFO, a device or a file of
/// another service is never read.
fn check_image(
    what: &'static str,
    path: &Path,
    dirs: &[PathBuf],
    max: u64,
) -> Result<(), ImageError> {
    if dirs.is_empty() {
        return Err(ImageError::NoImageDirs);
    }
    let io = |source| ImageError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    };
    let real = path.canonicalize().map_err(io)?;
    let inside = dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(&d));
    if !inside {
        return Err(ImageError::OutsideImageDirs {
            what,
            path: path.to_owned(),
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let meta = std::fs::metadata(&real).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ImageError::NotAFile {
            what,
            path: path.to_owned(),
        });
    }
    if meta.len() > max {
        return Err(ImageError::TooLarge {
            what,
            path: path.to_owned(),
            len: meta.len(),
            max,
        });
    }
    Ok(())
}

/// The kernel and initrd of `spec` may be read on this node (see `check_image`); the
/// project's test guest is built in and always may.
pub fn check_images(spec: &VmSpec, image_dirs: &[PathBuf]) -> Result<(), ImageError> {
    if let BootSpec::Kernel { kernel, initrd, .. } = &spec.boot {
        check_image("kernel", kernel, image_dirs, KERNEL_BYTES_MAX)?;
        if let Some(i) = initrd {
            check_image("initrd", i, image_dirs, INITRD_BYTES_MAX)?;
        }
    }
    Ok(())
}

/// The vmm-node configuration. It lists no disks: vmhost opens them through their
/// lock grants into the slots it owns (disk `i` in slot `i`); each name must resolve
/// on `registry`.
/// The NICs are on this node's TAPs (`nics::tap_names(node, spec)`), which must exist.
pub fn to_config(
    spec: &VmSpec,
    registry: &VolumeRegistry,
    node: u64,
) -> Result<VmConfig, VmHostError> {
    spec.validate().map_err(VmHostError::Spec)?;
    let (kernel, cmdline, initramfs, boot) = match &spec.boot {
        BootSpec::TestGuest(w) => (
            PathBuf::from(vmm_node::test_guest::PATH),
            match w.net_ip {
                Some(ip) => format!(
                    "{} {}",
                    workload(*w).cmdline(),
                    vmm_node::guest_protocol::net_cmdline(ip)
                ),
                None => workload(*w).cmdline(),
            },
            None,
            BootProtocol::Pvh,
        ),
        BootSpec::Kernel {
            kernel,
            cmdline,
            initrd,
        } => (
            kernel.clone(),
            cmdline.clone(),
            initrd.clone(),
            BootProtocol::Auto,
        ),
    };
    // The disks are opened by vmhost through their grants and put in slots vmhost
    // owns, so the VMM config lists none (vmm-node refuses to start a config with disks
    // unless its own `DiskSlots` is installed). Their names must still resolve.
    for d in &spec.disks {
        registry
            .disk_path(&d.name)
            .map_err(|source| VmHostError::Volume {
                disk: d.name.to_string(),
                source,
            })?;
    }
    Ok(VmConfig {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel,
        initramfs,
        cmdline,
        boot,
        disks: Vec::new(),
        nics: spec
            .nics
            .iter()
            .zip(super::nics::tap_names(node, spec))
            .enumerate()
            .map(|(i, (n, tap))| vmm_node::config::NicConfig {
                slot: Some(spec.nic_slot(i)),
                mtu: n.mtu(),
                ..vmm_node::config::NicConfig::new(tap, n.mac.clone())
            })
            .collect(),
    })
}

#[cfg(test)]
mod image_tests {
    use super::*;

    fn kernel_spec(kernel: &Path, initrd: Option<&Path>) -> VmSpec {
        let mut s = VmSpec::test_guest(
            "k",
            1,
            64,
            crate::vmhost::TestWorkload::new(crate::vmhost::WorkloadName::Idle),
        );
        s.boot = BootSpec::Kernel {
            kernel: kernel.to_owned(),
            cmdline: "console=ttyS0".into(),
            initrd: initrd.map(Path::to_owned),
        };
        s
    }

    #[test]
    fn kernels_come_only_from_image_dirs_as_bounded_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let images = d.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let dirs = vec![images.clone()];
        let ok = images.join("vmlinux");
        std::fs::write(&ok, b"kernel").unwrap();
        check_images(&kernel_spec(&ok, None), &dirs).unwrap();
        // No image_dirs: every kernel refused.
        assert!(matches!(
            check_images(&kernel_spec(&ok, None), &[]),
            Err(ImageError::NoImageDirs)
        ));
        // Outside, directly or through a symlink or `..`.
        let secret = Path::new("/etc/shadow");
        let e = check_images(&kernel_spec(secret, None), &dirs).unwrap_err();
        assert!(matches!(e, ImageError::OutsideImageDirs { .. }), "{e}");
        std::os::unix::fs::symlink("/etc/passwd", images.join("link")).unwrap();
        let e = check_images(&kernel_spec(&images.join("link"), None), &dirs).unwrap_err();
        assert!(matches!(e, ImageError::OutsideImageDirs { .. }), "{e}");
        let dots = images
            .join("../images/../../")
            .join(d.path().file_name().unwrap());
        assert!(check_images(&kernel_spec(&dots, None), &dirs).is_err());
        // A device through a symlink inside: outside once resolved.
        std::os::unix::fs::symlink("/dev/zero", images.join("zero")).unwrap();
        let e = check_images(&kernel_spec(&ok, Some(&images.join("zero"))), &dirs).unwrap_err();
        assert!(
            matches!(e, ImageError::OutsideImageDirs { what: "initrd", .. }),
            "{e}"
        );
        // A FIFO inside: not a regular file (never opened, so nothing hangs).
        let fifo = images.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = check_images(&kernel_spec(&fifo, None), &dirs).unwrap_err();
        assert!(matches!(e, ImageError::NotAFile { .. }), "{e}");
        // Oversized (sparse, so the test costs no disk).
        let big = images.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(KERNEL_BYTES_MAX + 1)
            .unwrap();
        let e = check_images(&kernel_spec(&big, None), &dirs).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        // Missing: a clear I/O error naming it.
        let e = check_images(&kernel_spec(&images.join("nope"), None), &dirs).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
