//! The engine's seam traits implemented for the real [`Vm`] of this crate.

use std::sync::{Arc, Mutex, Weak};

use bincode::Options;

use super::protocol::MAX_STATE_PAYLOAD_BYTES;
use super::seam::{
    host_cpu_features, host_memory_available_bytes, NodeFacts, OpError, Requirements, SourceVm,
    TargetFactory, TargetVm,
};
use super::transport::{DirtyPages, PageMap};
use crate::{GuestMem, Vm, VmConfig, VmState};

fn state_opts() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(u64::from(MAX_STATE_PAYLOAD_BYTES))
}

/// This host's facts as the migration compatibility check sees them.
pub fn local_facts() -> NodeFacts {
    NodeFacts {
        cpu_vendor: crate::facts::cpu_vendor(),
        cpu_features: host_cpu_features(),
        memory_available_bytes: host_memory_available_bytes(),
    }
}

/// A running [`Vm`] as a migration source.
pub struct LocalSource {
    vm: Arc<Vm>,
}

impl LocalSource {
    pub fn new(vm: Arc<Vm>) -> Self {
        LocalSource { vm }
    }
}

impl SourceVm for LocalSource {
    fn memory(&self) -> &GuestMem {
        self.vm.memory()
    }
    fn config_blob(&self) -> Result<Vec<u8>, OpError> {
        Ok(serde_json::to_vec(&self.vm.current_config())?)
    }
    fn requirements(&self) -> Requirements {
        let c = self.vm.config();
        Requirements {
            vm_name: c.name.clone(),
            cpu_vendor: crate::facts::cpu_vendor(),
            cpu_features: host_cpu_features(),
            memory_bytes: PageMap::from_memory(self.vm.memory()).total_bytes(),
            vcpus: u32::from(c.vcpus),
            disks: c
                .disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect(),
        }
    }
    fn start_dirty_log(&self) -> Result<(), OpError> {
        Ok(self.vm.start_dirty_log()?)
    }
    fn dirty_pages(&self, map: &PageMap) -> Result<DirtyPages, OpError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let bitmaps = self.vm.dirty_pages()?;
        let mut d = DirtyPages::empty(map.total_pages());
        for (region, bits) in self.vm.memory().iter().zip(bitmaps) {
            let start = region.start_addr().0;
            let first = map
                .index_of(start)
                .ok_or_else(|| format!("region at {start:#x} missing from the page map"))?;
            d.merge_region_bitmap(first, region.len() as usize / 4096, &bits);
        }
        Ok(d)
    }
    fn stop_dirty_log(&self) -> Result<(), OpError> {
        Ok(self.vm.stop_dirty_log()?)
    }
    fn pause(&self) -> Result<(), OpError> {
        Ok(self.vm.pause()?)
    }
    fn resume(&self) -> Result<(), OpError> {
        Ok(self.vm.resume()?)
    }
    fn set_throttle(&self, percent: u8) {
        self.vm.set_throttle(percent);
    }
    fn save_state(&self) -> Result<Vec<u8>, OpError> {
        let st = self.vm.save_state()?;
        Ok(state_opts().serialize(&st)?)
    }
    fn detach_disks(&self) -> Result<(), OpError> {
        // Flush + close every slot (a VM without disk slots has nothing to do).
        Ok(self.vm.detach_all_disks()?)
    }
    fn reattach_disks(&self) -> Result<(), OpError> {
        // Rollback: reopen the configured disks (disks hot-added after boot are not in the
        // config; the cluster-agent re-attaches those through its own records).
        for d in &self.vm.config().disks {
            self.vm.attach_disk(d)?;
        }
        Ok(())
    }
    fn boost_vcpus(&self, nice: i32, for_at_most: std::time::Duration) {
        self.vm.boost_vcpus(nice, for_at_most);
    }
    fn end_vcpu_boost(&self) {
        self.vm.end_vcpu_boost();
    }
}

/// Builds target VMs with [`Vm::new_paused`]; remembers the last one (weakly, so a failed
/// session's VM is freed at once) so the caller can take the concrete [`Vm`] back from a
/// [`super::target::Received`] it still holds.
#[derive(Default)]
pub struct LocalFactory {
    last: Mutex<Weak<Vm>>,
    install_disk_slots: Option<DiskSlotsInstaller>,
    config_hook: Option<ConfigHook>,
}

/// Adapts a received configuration to this host before the VM is built (e.g. the TAP
/// devices its NICs use here).
pub type ConfigHook = Arc<dyn Fn(&mut VmConfig) -> Result<(), OpError> + Send + Sync>;

/// Installs a new target VM's devices: its virtio-blk slots (without attaching:
/// `restore_state` reopens the disks of the saved state) and its NICs. Supplied by the code
/// that owns the virtio devices.
pub type DiskSlotsInstaller = Arc<dyn Fn(&Vm) -> Result<(), OpError> + Send + Sync>;

impl LocalFactory {
    /// A factory that installs disk slots into every VM it builds.
    pub fn with_disk_slots(installer: DiskSlotsInstaller) -> Self {
        LocalFactory {
            last: Mutex::new(Weak::new()),
            install_disk_slots: Some(installer),
            config_hook: None,
        }
    }

    /// Let `hook` adapt every received configuration before the VM is built.
    pub fn with_config_hook(mut self, hook: ConfigHook) -> Self {
        self.config_hook = Some(hook);
        self
    }

    /// The VM built by the last session, if something still holds it.
    pub fn last_vm(&self) -> Option<Arc<Vm>> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }
}

struct LocalTarget(Arc<Vm>);

impl TargetVm for LocalTarget {
    fn memory(&self) -> &GuestMem {
        self.0.memory()
    }
    fn restore(&self, state: &[u8]) -> Result<(), OpError> {
        let st: VmState = crate::state::decode_any_version(state_opts(), state)?;
        Ok(self.0.restore_state(&st)?)
    }
    fn resume(&self) -> Result<(), OpError> {
        Ok(self.0.resume()?)
    }
    fn announce_nics(&self) {
        self.0.announce_nics_early();
    }
    fn boost_vcpus(&self, nice: i32, for_at_most: std::time::Duration) {
        self.0.boost_vcpus(nice, for_at_most);
    }
}

impl TargetFactory for LocalFactory {
    fn facts(&self) -> NodeFacts {
        local_facts()
    }
    fn create_paused(&self, config_blob: &[u8]) -> Result<Box<dyn TargetVm>, OpError> {
        let mut config: VmConfig = serde_json::from_slice(config_blob)?;
        if let Some(hook) = &self.config_hook {
            hook(&mut config)?;
        }
        let vm = Arc::new(Vm::new_paused(config)?);
        match &self.install_disk_slots {
            Some(install) => install(&vm)?,
            None if !vm.config().disks.is_empty() => {
                return Err(
                    "the VM has disks but this node was started without virtio-blk slots".into(),
                )
            }
            None if !vm.config().nics.is_empty() => {
                return Err("the VM has NICs but this node was started without NIC devices".into())
            }
            None => {}
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&vm);
        Ok(Box::new(LocalTarget(vm)))
    }
}
