//! Volumes and disks on a real directory: the normal life of a disk, and bad input
//! that must give a clear error and leave the volume exactly as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use csv_volume::name::DISK_SIZE_MAX_BYTES;
use csv_volume::{
    ApplyContext, DiskName, LockCommand, LockMode, LockTable, NameError, SizeError, VolumeError,
    VolumeRegistry,
};

/// Everything on the volume: path → (kind, length, content or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u64, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (char, u64, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(p, ('l', 0, t.into_os_string().into_encoded_bytes()));
            } else if m.is_dir() {
                out.insert(p.clone(), ('d', 0, Vec::new()));
                walk(&p, out);
            } else {
                out.insert(p.clone(), ('f', m.len(), fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

fn name(s: &str) -> DiskName {
    DiskName::parse(s).unwrap()
}

fn lock(table: &mut LockTable, index: u64, cmd: LockCommand) {
    let ctx = ApplyContext {
        log_index: index,
        term: 1,
        down_nodes: BTreeSet::new(),
    };
    table.apply(cmd, &ctx).unwrap();
}

#[test]
fn create_grow_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut reg = VolumeRegistry::new();
    reg.register("a", dir.path()).unwrap();
    reg.register("b", other.path()).unwrap();
    let mut table = LockTable::new();

    let big = reg
        .create_disk(&name("a/vms/one/root.img"), 10 << 30)
        .unwrap();
    assert_eq!(big.size_bytes, 10 << 30);
    assert!(
        big.allocated_bytes < 1 << 20,
        "image is not sparse: {} bytes allocated",
        big.allocated_bytes
    );
    reg.create_disk(&name("a/vms/two.img"), 4096).unwrap();
    reg.create_disk(&name("b/data.img"), 512).unwrap();

    lock(
        &mut table,
        1,
        LockCommand::Acquire {
            disk: name("a/vms/two.img"),
            node: 7,
            mode: LockMode::Exclusive,
        },
    );
    // A fence record and a stray temporary must not show up as disks.
    let two = reg.disk_path(&name("a/vms/two.img")).unwrap();
    let g = csv_volume::LockGrant {
        disk: name("a/vms/two.img"),
        node: 7,
        mode: LockMode::Exclusive,
        token: table.lock(&name("a/vms/two.img")).unwrap().token,
        term: 1,
    };
    drop(csv_volume::open_for_vm(&reg, 7, &g).unwrap());
    fs::write(format!("{}.fence.tmp.7.1", two.display()), b"junk").unwrap();

    let listed = reg.list(&table).unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|d| {
            (
                d.name.to_string(),
                d.size_bytes,
                d.lock.as_ref().and_then(|l| l.exclusive_owner()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a/vms/one/root.img".to_string(), 10 << 30, None),
            ("a/vms/two.img".to_string(), 4096, Some(7)),
            ("b/data.img".to_string(), 512, None),
        ]
    );

    // Grow: only larger, only by the owner while locked.
    let grown = reg
        .grow_disk(&name("a/vms/two.img"), 8192, 7, &table)
        .unwrap();
    assert_eq!(grown.size_bytes, 8192);
    assert!(matches!(
        reg.grow_disk(&name("a/vms/two.img"), 16384, 8, &table),
        Err(VolumeError::Locked { .. })
    ));
    assert!(matches!(
        reg.grow_disk(&name("a/vms/two.img"), 8192, 7, &table),
        Err(VolumeError::NotLarger {
            current_bytes: 8192,
            requested_bytes: 8192,
            ..
        })
    ));

    // Delete: refused while locked, then removes the image and its fence record.
    let err = reg.delete_disk(&name("a/vms/two.img"), &table).unwrap_err();
    assert!(err.to_string().contains("node(s) {7}"), "{err}");
    lock(
        &mut table,
        2,
        LockCommand::Release {
            disk: name("a/vms/two.img"),
            node: 7,
        },
    );
    reg.delete_disk(&name("a/vms/two.img"), &table).unwrap();
    assert!(!two.exists());
    assert!(!csv_volume::fence::fence_path(&two).exists());
    assert!(matches!(
        reg.delete_disk(&name("a/vms/two.img"), &table),
        Err(VolumeError::DiskNotFound { .. })
    ));
    assert_eq!(reg.list(&table).unwrap().len(), 2);
    let info = reg.info(&name("b/data.img"), &table).unwrap();
    assert_eq!(info.size_bytes, 512);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut reg = VolumeRegistry::new();
    reg.register("vol", root).unwrap();
    let table = LockTable::new();

    // Some existing content: a disk, a directory, a symlink to outside the volume,
    // a symlink to a file, and a plain file where a directory is expected.
    reg.create_disk(&name("vol/dir/existing.img"), 1 << 20)
        .unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
    std::os::unix::fs::symlink(root.join("dir/existing.img"), root.join("dir/link.img")).unwrap();
    fs::write(root.join("notadir"), b"plain file").unwrap();
    fs::write(outside.path().join("secret.img"), b"outside").unwrap();

    let before = snapshot(root);
    let outside_before = snapshot(outside.path());
    let existing_ino = fs::metadata(root.join("dir/existing.img")).unwrap().ino();

    // Names that never parse.
    for bad in [
        "vol/../x.img",
        "/etc/passwd",
        "vol/dir/../../x.img",
        "vol//x.img",
        "vol/x\u{7}.img",
        "vol",
        "vol/x.img.fence",
    ] {
        assert!(DiskName::parse(bad).is_err(), "{bad:?} parsed");
    }
    assert!(matches!(
        DiskName::parse("vol/../../etc/shadow"),
        Err(NameError::DotComponent { .. })
    ));

    // Symlink escape: through a linked directory, and to a linked file.
    for n in ["vol/escape/new.img", "vol/escape/secret.img"] {
        let err = reg.create_disk(&name(n), 4096).unwrap_err();
        assert!(matches!(err, VolumeError::Symlink { .. }), "{n}: {err}");
        assert!(err.to_string().contains("symlink"), "{err}");
    }
    let err = reg.disk_path(&name("vol/escape/secret.img")).unwrap_err();
    assert!(matches!(err, VolumeError::Symlink { .. }));
    let err = reg
        .grow_disk(&name("vol/dir/link.img"), 2 << 20, 1, &table)
        .unwrap_err();
    assert!(matches!(err, VolumeError::Symlink { .. }), "{err}");
    let err = reg
        .delete_disk(&name("vol/dir/link.img"), &table)
        .unwrap_err();
    assert!(matches!(err, VolumeError::Symlink { .. }), "{err}");

    // A file where a directory should be.
    let err = reg
        .create_disk(&name("vol/notadir/x.img"), 4096)
        .unwrap_err();
    assert!(matches!(err, VolumeError::NotADirectory { .. }), "{err}");
    // A directory where a disk should be.
    let err = reg.create_disk(&name("vol/dir"), 4096).unwrap_err();
    assert!(matches!(err, VolumeError::NotAFile { .. }), "{err}");

    // Missing volume.
    let err = reg
        .create_disk(&name("nosuch/dir/x.img"), 4096)
        .unwrap_err();
    assert!(
        matches!(&err, VolumeError::UnknownVolume { volume } if volume == "nosuch"),
        "{err}"
    );

    // Disk already exists: not clobbered.
    let err = reg
        .create_disk(&name("vol/dir/existing.img"), 4096)
        .unwrap_err();
    assert!(matches!(err, VolumeError::DiskExists { .. }), "{err}");

    // Sizes: zero, absurd, not whole sectors; also in new directories.
    for (size, want) in [
        (0u64, SizeError::Zero),
        (
            DISK_SIZE_MAX_BYTES + 512,
            SizeError::TooLarge {
                size_bytes: DISK_SIZE_MAX_BYTES + 512,
            },
        ),
        (
            u64::MAX,
            SizeError::TooLarge {
                size_bytes: u64::MAX,
            },
        ),
        (1000, SizeError::NotSectorMultiple { size_bytes: 1000 }),
    ] {
        let err = reg
            .create_disk(&name("vol/new/dir/x.img"), size)
            .unwrap_err();
        assert!(
            matches!(&err, VolumeError::Size { source, .. } if *source == want),
            "{size}: {err}"
        );
        let err = reg
            .grow_disk(&name("vol/dir/existing.img"), size, 1, &table)
            .unwrap_err();
        assert!(matches!(err, VolumeError::Size { .. }), "{err}");
    }
    // Shrinking is refused.
    let err = reg
        .grow_disk(&name("vol/dir/existing.img"), 512, 1, &table)
        .unwrap_err();
    assert!(matches!(err, VolumeError::NotLarger { .. }), "{err}");

    // Volume registration errors.
    assert!(matches!(
        reg.register("vol", root),
        Err(VolumeError::VolumeExists { .. })
    ));
    assert!(matches!(
        reg.register("gone", &root.join("does-not-exist")),
        Err(VolumeError::RootUnreachable { .. })
    ));
    assert!(matches!(
        reg.register("file", &root.join("notadir")),
        Err(VolumeError::RootNotDirectory { .. })
    ));
    assert!(matches!(
        reg.register("a/b", root),
        Err(VolumeError::Name(NameError::VolumeNameHasSlash { .. }))
    ));

    // Nothing changed, inside or outside the volume.
    assert_eq!(snapshot(root), before);
    assert_eq!(snapshot(outside.path()), outside_before);
    assert_eq!(
        fs::metadata(root.join("dir/existing.img")).unwrap().ino(),
        existing_ino
    );
    // Symlinks and the plain file do not appear in the listing.
    let listed: Vec<_> = reg
        .list(&table)
        .unwrap()
        .into_iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(listed, vec!["vol/dir/existing.img", "vol/notadir"]);
}

#[test]
fn error_messages_name_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = VolumeRegistry::new();
    reg.register("vol", dir.path()).unwrap();
    let err = reg.create_disk(&name("vol/x.img"), 0).unwrap_err();
    // Top level names the disk; the source says what about it.
    assert_eq!(err.to_string(), "invalid size for disk vol/x.img");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert_eq!(source, "disk size is zero");
    let err = reg
        .create_disk(&name("missing/x.img"), 512)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "no volume named missing is registered");
}

#[test]
fn registry_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<csv_volume::VolumeConfig> = configs_for(dir.path());
    let reg = VolumeRegistry::from_config(&configs).unwrap();
    let names: Vec<_> = reg.volumes().map(|v| v.name().to_owned()).collect();
    assert_eq!(names, vec!["a"]);
    assert_eq!(
        reg.volume("a").unwrap().root(),
        fs::canonicalize(dir.path()).unwrap()
    );
    // A bad second entry is reported, naming the volume.
    let bad = vec![
        configs[0].clone(),
        csv_volume::VolumeConfig {
            name: "a".into(),
            path: dir.path().to_owned(),
        },
    ];
    let err = VolumeRegistry::from_config(&bad).unwrap_err();
    assert_eq!(err.to_string(), "volume a is already registered");
}

fn configs_for(root: &Path) -> Vec<csv_volume::VolumeConfig> {
    let json = format!(
        r#"[{{"name": "a", "path": {:?}}}]"#,
        root.display().to_string()
    );
    let configs: Vec<csv_volume::VolumeConfig> = serde_json::from_str(&json).unwrap();
    // Unknown fields are refused, not ignored.
    let typo = format!(
        r#"[{{"name": "a", "pth": {:?}}}]"#,
        root.display().to_string()
    );
    let err = serde_json::from_str::<Vec<csv_volume::VolumeConfig>>(&typo).unwrap_err();
    assert!(err.to_string().contains("unknown field `pth`"), "{err}");
    configs
}

#[test]
fn concurrent_creates_in_one_new_directory_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = VolumeRegistry::new();
    reg.register("vol", dir.path()).unwrap();
    let reg = std::sync::Arc::new(reg);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let reg = std::sync::Arc::clone(&reg);
            std::thread::spawn(move || {
                reg.create_disk(&name(&format!("vol/new/deep/dir/d{i}.img")), 4096)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert_eq!(reg.list(&LockTable::new()).unwrap().len(), 8);
}
