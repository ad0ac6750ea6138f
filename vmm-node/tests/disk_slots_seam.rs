//! Plumbing of the virtio-blk seam in core: `Vm` routes configuration, control commands,
//! snapshots and the migration hand-off through an installed `DiskSlots`. The provider here
//! only records calls: this tests core's routing, not virtio-blk (tested on branch virtio).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use vmm_node::config::DiskSlotConfig;
use vmm_node::devices::{DeviceError, DiskSlots};
use vmm_node::guest_protocol::{Workload, WorkloadKind};
use vmm_node::state::DiskSlotState;
use vmm_node::{snapshot, Vm, VmError};

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
}

impl DiskSlots for Recorder {
    fn attach(&self, d: &DiskSlotConfig) -> Result<(), DeviceError> {
        if !d.path.exists() {
            return Err(format!("{} does not exist", d.path.display()).into());
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("attach {}", d.slot));
        Ok(())
    }
    fn detach(&self, slot: u8) -> Result<(), DeviceError> {
        self.calls.lock().unwrap().push(format!("detach {slot}"));
        Ok(())
    }
    fn detach_all(&self) -> Result<(), DeviceError> {
        self.calls.lock().unwrap().push("detach-all".into());
        Ok(())
    }
    fn save(&self) -> Vec<DiskSlotState> {
        vec![DiskSlotState {
            slot: 3,
            device: vec![1, 2, 3],
        }]
    }
    fn restore(&self, s: &[DiskSlotState], d: &[DiskSlotConfig]) -> Result<(), DeviceError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("restore {:?} {}", s[0].device, d.len()));
        Ok(())
    }
}

#[test]
fn disk_slot_operations_are_routed_to_the_installed_slots() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut cfg = test_guest_config(1, 16, &Workload::new(WorkloadKind::Idle));
    cfg.disks = vec![DiskSlotConfig {
        slot: 3,
        path: img.clone(),
        read_only: false,
    }];
    require_kvm();
    let vm = Arc::new(Vm::create(cfg).unwrap());
    // Without slots installed, disk operations fail clearly.
    let e = vm
        .attach_disk(&DiskSlotConfig {
            slot: 1,
            path: img.clone(),
            read_only: false,
        })
        .unwrap_err();
    assert!(matches!(e, VmError::NoDiskSlots), "{e}");
    // Configured disks but no slots: start refuses instead of ignoring the disks.
    assert!(matches!(vm.start(), Err(VmError::NoDiskSlots)));
    let rec = Arc::new(Recorder::default());
    vm.install_disk_slots(rec.clone(), true).unwrap();
    vm.start().unwrap();

    let sock = dir.path().join("ctl");
    vmm_node::control::serve(&sock, vm.clone(), vec![]).unwrap();
    let r = vmm_node::control::request(
        &sock,
        &json!({"cmd": "attach-disk", "slot": 5, "path": img}),
    )
    .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = vmm_node::control::request(
        &sock,
        &json!({"cmd": "attach-disk", "slot": 6, "path": dir.path().join("missing.img")}),
    )
    .unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("missing.img does not exist"),
        "{r}"
    );
    let r = vmm_node::control::request(
        &sock,
        &json!({"cmd": "attach-disk", "slot": 9, "path": img}),
    )
    .unwrap();
    assert!(r["error"].as_str().unwrap().contains("slot 9"), "{r}");
    let r = vmm_node::control::request(&sock, &json!({"cmd": "detach-disk", "slot": 5})).unwrap();
    assert_eq!(r["ok"], true, "{r}");

    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    vm.pause().unwrap();
    let snap = dir.path().join("snap");
    snapshot::save(&vm, &snap).unwrap();
    vm.detach_all_disks().unwrap();
    assert_eq!(
        *rec.calls.lock().unwrap(),
        vec!["attach 3", "attach 5", "detach 5", "detach-all"]
    );
    vm.stop().unwrap();

    // A snapshot with disk state cannot be restored without slots...
    let e = snapshot::restore(&snap).err().unwrap();
    assert!(
        e.to_string().contains("VM") && format!("{e:?}").contains("NoDiskSlots"),
        "{e:?}"
    );
    // ...and is handed to the slots installed before the state is loaded.
    let rec2 = Arc::new(Recorder::default());
    let r2 = rec2.clone();
    let restored =
        snapshot::restore_with(&snap, move |vm| vm.install_disk_slots(r2, false)).unwrap();
    assert_eq!(*rec2.calls.lock().unwrap(), vec!["restore [1, 2, 3] 1"]);
    restored.resume().unwrap();
    restored.destroy().unwrap();
}
