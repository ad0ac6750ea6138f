//! Two disk backends on the same volume: after a takeover the old owner's writes are
//! refused and the disk holds only the new owner's writes. Also the handoff, shared
//! and stop paths of the hooks, driven by a real lock table.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use csv_volume::{
    discard_staged_handoff, disk_error, handoff_open, handoff_release, open_for_vm,
    release_on_stop, stage_handoff, staged_path, sync_handoff, takeover_open, ApplyContext,
    DiskError, DiskName, FenceRecord, FencingToken, HookError, LockCommand, LockGrant, LockMode,
    LockOutcome, LockTable, NodeId, VolumeRegistry,
};

const BLOCK: usize = 4096;
const DISK_SIZE_BYTES: u64 = 1 << 20;

/// A lock table driven like the agent drives it: one increasing log index per entry.
struct Raft {
    table: LockTable,
    index: u64,
    down: BTreeSet<NodeId>,
}

impl Raft {
    fn new() -> Self {
        Raft {
            table: LockTable::new(),
            index: 0,
            down: BTreeSet::new(),
        }
    }

    fn apply(&mut self, cmd: LockCommand) -> LockOutcome {
        self.index += 1;
        let ctx = ApplyContext {
            log_index: self.index,
            term: 1,
            down_nodes: self.down.clone(),
        };
        self.table.apply(cmd, &ctx).expect("lock command refused")
    }

    fn acquire(&mut self, disk: &DiskName, node: NodeId, mode: LockMode) -> LockGrant {
        self.grant(LockCommand::Acquire {
            disk: disk.clone(),
            node,
            mode,
        })
    }

    fn grant(&mut self, cmd: LockCommand) -> LockGrant {
        match self.apply(cmd) {
            LockOutcome::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }
}

fn setup() -> (tempfile::TempDir, VolumeRegistry, DiskName) {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = VolumeRegistry::new();
    reg.register("vol", dir.path()).unwrap();
    let name = DiskName::parse("vol/vms/web/root.img").unwrap();
    reg.create_disk(&name, DISK_SIZE_BYTES).unwrap();
    (dir, reg, name)
}

fn stale(err: &io::Error) -> Option<(FencingToken, FencingToken)> {
    match disk_error(err) {
        Some(DiskError::StaleToken { held, current, .. }) => Some((*held, *current)),
        _ => None,
    }
}

#[test]
fn after_takeover_old_owner_is_refused_and_disk_holds_only_new_writes() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();

    // Node 1 owns the disk; node 2 is another backend on the same volume.
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut old = open_for_vm(&reg, 1, &g1).unwrap();

    // Node 1 is declared Down; node 2 takes over (its lease wait has passed).
    raft.down.insert(1);
    let g2 = raft.grant(LockCommand::ForceTakeover {
        disk: name.clone(),
        node: 2,
        mode: LockMode::Exclusive,
    });
    assert!(g2.token > g1.token);
    let mut new = takeover_open(&reg, 2, &g2, Instant::now()).unwrap();

    // The old owner wakes up and tries to write everywhere: every write is refused
    // with its typed error, and so is its flush.
    for block in 0..(DISK_SIZE_BYTES as usize / BLOCK) {
        let err = old
            .write_at(&[0xAA; BLOCK], (block * BLOCK) as u64)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(stale(&err), Some((g1.token, g2.token)), "{err}");
    }
    assert!(stale(&old.flush().unwrap_err()).is_some());
    assert_eq!(old.fenced_by(), Some(g2.token));
    assert!(old.describe().contains("FENCED"));

    // The new owner writes a pattern to every other block.
    for block in (0..(DISK_SIZE_BYTES as usize / BLOCK)).step_by(2) {
        new.write_at(&[0xBB; BLOCK], (block * BLOCK) as u64)
            .unwrap();
    }
    new.flush().unwrap();

    // The file holds only node 2's bytes: 0xBB in even blocks, zeros elsewhere.
    let bytes = std::fs::read(reg.disk_path(&name).unwrap()).unwrap();
    assert_eq!(bytes.len() as u64, DISK_SIZE_BYTES);
    for (block, chunk) in bytes.chunks(BLOCK).enumerate() {
        let want = if block % 2 == 0 { 0xBB } else { 0 };
        assert!(chunk.iter().all(|&b| b == want), "block {block}");
    }

    // The old owner cannot reopen with its token either, nor roll the record back.
    let err = open_for_vm(&reg, 1, &g1).unwrap_err();
    assert!(matches!(err, HookError::Fence(_)), "{err}");
    // And it cannot release a lock that is no longer its own.
    assert!(matches!(release_on_stop(old), Err(HookError::Flush { .. })));
}

#[test]
fn writes_before_the_takeover_stay_and_later_ones_do_not() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut old = open_for_vm(&reg, 1, &g1).unwrap();
    old.write_at(b"written by node 1 while owner", 0).unwrap();
    old.flush().unwrap();

    raft.down.insert(1);
    let g2 = raft.grant(LockCommand::ForceTakeover {
        disk: name.clone(),
        node: 2,
        mode: LockMode::Exclusive,
    });
    let lease_deadline = Instant::now() + Duration::from_millis(50);
    let mut new = takeover_open(&reg, 2, &g2, lease_deadline).unwrap();
    assert!(Instant::now() >= lease_deadline, "takeover did not wait");

    assert!(stale(&old.write_at(b"late write by node 1", 4096).unwrap_err()).is_some());
    new.write_at(b"node 2", 8192).unwrap();

    let mut buf = [0u8; 29];
    new.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"written by node 1 while owner");
    let mut buf = [0u8; 20];
    new.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0u8; 20], "a fenced write reached the disk");
    let mut buf = [0u8; 6];
    new.read_at(&mut buf, 8192).unwrap();
    assert_eq!(&buf, b"node 2");
}

#[test]
fn migration_handoff_moves_the_disk() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut src = open_for_vm(&reg, 1, &g1).unwrap();
    src.write_at(b"before migration", 0).unwrap();

    // Source flushes and closes, then the lock moves.
    let cmd = handoff_release(src, 2).unwrap();
    assert_eq!(
        cmd,
        LockCommand::Handoff {
            disk: name.clone(),
            from: 1,
            to: 2
        }
    );
    let g2 = raft.grant(cmd);
    assert_eq!((g2.node, g2.mode), (2, LockMode::Exclusive));

    // A grant delivered to the wrong node is refused before anything is touched.
    assert!(matches!(
        handoff_open(&reg, 3, &g2),
        Err(HookError::WrongNode { .. })
    ));

    let mut dst = handoff_open(&reg, 2, &g2).unwrap();
    let mut buf = [0u8; 16];
    dst.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"before migration");
    dst.write_at(b"after migration", 16).unwrap();

    // Stop: flush, close, release; the table is empty again.
    let cmd = release_on_stop(dst).unwrap();
    raft.apply(cmd);
    assert!(raft.table.is_empty());
}

#[test]
fn stale_grant_cannot_open_and_wrong_epoch_is_refused() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let d1 = open_for_vm(&reg, 1, &g1).unwrap();
    let cmd = handoff_release(d1, 2).unwrap();
    let g2 = raft.grant(cmd);
    let _d2 = handoff_open(&reg, 2, &g2).unwrap();

    // Opening directly with the old token is refused as stale.
    let path = reg.disk_path(&name).unwrap();
    let err =
        csv_volume::FencedDisk::open(&path, None, 1, g1.token, LockMode::Exclusive).unwrap_err();
    assert!(matches!(err, DiskError::StaleToken { .. }), "{err}");
    // A token the record has not reached yet means the hook was skipped.
    let err = csv_volume::FencedDisk::open(
        &path,
        None,
        2,
        FencingToken(g2.token.0 + 5),
        LockMode::Exclusive,
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::FenceBehind { .. }), "{err}");
    // The right token for another node is not this node's epoch.
    let err =
        csv_volume::FencedDisk::open(&path, None, 7, g2.token, LockMode::Exclusive).unwrap_err();
    assert!(matches!(err, DiskError::NotOurEpoch { .. }), "{err}");
}

#[test]
fn shared_readers_read_but_never_write() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut w = open_for_vm(&reg, 1, &g).unwrap();
    w.write_at(b"golden image", 0).unwrap();
    raft.apply(release_on_stop(w).unwrap());

    let r1 = raft.acquire(&name, 1, LockMode::Shared);
    let r2 = raft.acquire(&name, 2, LockMode::Shared);
    assert_eq!(r1.token, r2.token);
    let mut a = open_for_vm(&reg, 1, &r1).unwrap();
    let mut b = open_for_vm(&reg, 2, &r2).unwrap();
    for d in [&mut a, &mut b] {
        let mut buf = [0u8; 12];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"golden image");
        let err = d.write_at(b"x", 0).unwrap_err();
        assert!(
            matches!(disk_error(&err), Some(DiskError::ReadOnly)),
            "{err}"
        );
    }
    // Out-of-range reads are typed errors, not short reads.
    let mut buf = [0u8; 8];
    let err = a.read_at(&mut buf, DISK_SIZE_BYTES - 4).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(matches!(
        disk_error(&err),
        Some(DiskError::OutOfRange { .. })
    ));
}

#[test]
fn removed_fence_record_stops_writes() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut d = open_for_vm(&reg, 1, &g).unwrap();
    d.write_at(b"ok", 0).unwrap();
    let path = reg.disk_path(&name).unwrap();
    std::fs::remove_file(csv_volume::fence::fence_path(&path)).unwrap();
    let err = d.write_at(b"no", 2).unwrap_err();
    assert!(
        matches!(disk_error(&err), Some(DiskError::Fence(_))),
        "{err}"
    );
    let mut buf = [0u8; 4];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"ok\0\0");
}

#[test]
fn relaxed_fence_check_still_fences_after_the_interval_and_on_flush() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let staleness = Duration::from_millis(30);
    let mut a = open_for_vm(&reg, 1, &g1).unwrap();
    let mut b = open_for_vm(&reg, 1, &g1).unwrap();
    for d in [&mut a, &mut b] {
        d.set_fence_check(csv_volume::FenceCheck::AtMostEvery {
            max_staleness: staleness,
        });
        d.write_at(b"ok", 0).unwrap();
    }

    raft.down.insert(1);
    let g2 = raft.grant(LockCommand::ForceTakeover {
        disk: name.clone(),
        node: 2,
        mode: LockMode::Exclusive,
    });
    let _new = takeover_open(&reg, 2, &g2, Instant::now()).unwrap();

    // Flush always checks, and the fence is sticky afterwards.
    assert!(stale(&a.flush().unwrap_err()).is_some());
    assert!(stale(&a.write_at(b"no", 0).unwrap_err()).is_some());
    // Writes are refused once the interval has passed.
    std::thread::sleep(staleness + Duration::from_millis(5));
    assert!(stale(&b.write_at(b"no", 0).unwrap_err()).is_some());
}

/// A writer thread runs flat out while another node takes over. Every write that
/// *began* after the new fence record was in place must be refused, and none of the
/// refused writes may reach the file.
#[test]
fn concurrent_writer_is_cut_off_at_the_fence() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut old = open_for_vm(&reg, 1, &g1).unwrap();
    let installed = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let writer = {
        let installed = Arc::clone(&installed);
        let started = Arc::clone(&started);
        std::thread::spawn(move || {
            // Each write stamps its sequence number into its own 8-byte slot.
            let slots = DISK_SIZE_BYTES / 8;
            let mut refused_after_install = 0u64;
            for seq in 1..slots {
                if seq == slots / 2 {
                    // Never run out of slots before the takeover, however slow it is.
                    while !installed.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                }
                let began_after_install = installed.load(Ordering::SeqCst);
                started.store(true, Ordering::SeqCst);
                match old.write_at(&seq.to_le_bytes(), seq * 8) {
                    Ok(()) => assert!(
                        !began_after_install,
                        "write {seq} began after the fence was installed and succeeded"
                    ),
                    Err(e) => {
                        assert!(stale(&e).is_some(), "{e}");
                        refused_after_install += 1;
                        if refused_after_install == 1 {
                            return seq;
                        }
                    }
                }
            }
            panic!("the writer was never fenced");
        })
    };
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    raft.down.insert(1);
    let g2 = raft.grant(LockCommand::ForceTakeover {
        disk: name.clone(),
        node: 2,
        mode: LockMode::Exclusive,
    });
    let new = takeover_open(&reg, 2, &g2, Instant::now()).unwrap();
    installed.store(true, Ordering::SeqCst);
    let first_refused = writer.join().unwrap();
    drop(new);

    // Slots up to the first refused write hold their numbers; nothing after it landed.
    let bytes = std::fs::read(reg.disk_path(&name).unwrap()).unwrap();
    for (slot, chunk) in bytes.chunks(8).enumerate().skip(1) {
        let v = u64::from_le_bytes(chunk.try_into().unwrap());
        if (slot as u64) < first_refused {
            assert_eq!(v, slot as u64, "slot {slot}");
        } else {
            assert_eq!(v, 0, "refused or never-issued write landed in slot {slot}");
        }
    }
}

#[test]
fn rolled_back_record_refuses_writes_until_restored() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    raft.index = 10;
    let g = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut d = open_for_vm(&reg, 1, &g).unwrap();
    let fence = csv_volume::fence::fence_path(&reg.disk_path(&name).unwrap());
    let replace = |token: u64| {
        let rec = csv_volume::FenceRecord {
            token: FencingToken(token),
            node: 1,
            mode: LockMode::Exclusive,
            term: 1,
        };
        let tmp = fence.with_extension("fence.test");
        std::fs::write(&tmp, rec.encode()).unwrap();
        std::fs::rename(&tmp, &fence).unwrap();
    };
    replace(3);
    let err = d.write_at(b"no", 0).unwrap_err();
    assert!(
        matches!(disk_error(&err), Some(DiskError::FenceBehind { .. })),
        "{err}"
    );
    replace(g.token.0);
    d.write_at(b"ok", 0).unwrap();
    assert_eq!(d.fenced_by(), None);
}

#[test]
fn fenced_disk_can_move_to_a_device_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<csv_volume::FencedDisk>();
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut d = open_for_vm(&reg, 1, &g).unwrap();
    let d = std::thread::spawn(move || {
        d.write_at(b"from another thread", 0).unwrap();
        d
    })
    .join()
    .unwrap();
    assert_eq!(d.len(), DISK_SIZE_BYTES);
    assert!(
        d.describe().contains("vol/vms/web/root.img"),
        "{}",
        d.describe()
    );
}

#[test]
fn owner_grows_an_open_disk_and_sees_the_new_size() {
    let (_dir, reg, name) = setup();
    let mut raft = Raft::new();
    let g = raft.acquire(&name, 1, LockMode::Exclusive);
    let mut d = open_for_vm(&reg, 1, &g).unwrap();
    let end = DISK_SIZE_BYTES;
    assert!(d.write_at(b"x", end).is_err());
    reg.grow_disk(&name, 2 * DISK_SIZE_BYTES, 1, &raft.table)
        .unwrap();
    assert_eq!(d.refresh_len().unwrap(), 2 * DISK_SIZE_BYTES);
    d.write_at(b"x", end).unwrap();
    // Another node may not grow it while node 1 holds it.
    assert!(reg
        .grow_disk(&name, 4 * DISK_SIZE_BYTES, 2, &raft.table)
        .is_err());
}

/// Staged handoff: the source keeps writing while the target's record is staged; the
/// source's flush and close and the target's install (one rename) are all the storage
/// stage does; the source's old token is refused from the rename on.
#[test]
fn staged_handoff_installs_the_reserved_record_with_one_rename() {
    let (_dir, reg, name) = setup();
    let path = reg.disk_path(&name).unwrap();
    let mut raft = Raft::new();
    let g1 = raft.acquire(&name, 1, LockMode::Exclusive);
    let src = open_for_vm(&reg, 1, &g1).unwrap();
    let src = std::sync::Arc::new(std::sync::Mutex::new(src));
    let reserved = match raft.apply(LockCommand::ReserveHandoff {
        disk: name.clone(),
        from: 1,
        to: 2,
    }) {
        LockOutcome::Reserved(g) => g,
        other => panic!("expected a reservation, got {other:?}"),
    };
    assert!(reserved.token > g1.token);

    // Staging refuses the wrong node, writes nothing the source would notice.
    assert!(matches!(
        stage_handoff(&reg, 3, &reserved),
        Err(HookError::WrongNode { .. })
    ));
    stage_handoff(&reg, 2, &reserved).unwrap();
    let staged = staged_path(&path, &FenceRecord::from(&reserved));
    assert!(staged.exists());
    {
        let mut s = src.lock().unwrap();
        s.write_at(b"written while staged", 0).unwrap();
        assert!(s.has_unsynced_writes());
        s.flush().unwrap();
        assert!(!s.has_unsynced_writes());
        // Nothing written since: the flush only checks the fence.
        s.flush().unwrap();
    }
    // A disk listing does not show the staged record.
    assert_eq!(reg.list(&raft.table).unwrap().len(), 1);

    // Storage stage: the source closes (no lock entry), the target installs and opens.
    let leftover = std::sync::Arc::try_unwrap(src)
        .unwrap()
        .into_inner()
        .unwrap();
    let mut late_writer = open_for_vm(&reg, 1, &g1).unwrap();
    let _ = handoff_release(leftover, 2).unwrap();
    let mut dst = handoff_open(&reg, 2, &reserved).unwrap();
    assert!(!staged.exists(), "the staged record was renamed into place");
    let mut buf = [0u8; 20];
    dst.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"written while staged");
    sync_handoff(&reg, &reserved).unwrap();
    // A writer still holding the old token is refused from now on.
    let err = late_writer.write_at(b"late", 0).unwrap_err();
    assert_eq!(stale(&err), Some((g1.token, reserved.token)));

    // The completion keeps the token the target opened with.
    let g2 = raft.grant(LockCommand::CompleteHandoff {
        disk: name.clone(),
        from: 1,
        to: 2,
    });
    assert_eq!(g2, reserved);
    dst.write_at(b"after", 0).unwrap();

    // A staged record of an epoch that ended first is discarded, and an old one can
    // never be installed over a newer record.
    let r2 = match raft.apply(LockCommand::ReserveHandoff {
        disk: name.clone(),
        from: 2,
        to: 1,
    }) {
        LockOutcome::Reserved(g) => g,
        other => panic!("expected a reservation, got {other:?}"),
    };
    stage_handoff(&reg, 1, &r2).unwrap();
    discard_staged_handoff(&reg, &r2);
    assert!(!staged_path(&path, &FenceRecord::from(&r2)).exists());
    stage_handoff(&reg, 1, &r2).unwrap();
    let back = raft.grant(LockCommand::Acquire {
        disk: name.clone(),
        node: 2,
        mode: LockMode::Exclusive,
    });
    assert!(back.token > r2.token);
    drop(dst);
    let _again = open_for_vm(&reg, 2, &back).unwrap();
    assert!(matches!(
        handoff_open(&reg, 1, &r2),
        Err(HookError::Fence(_))
    ));
}
