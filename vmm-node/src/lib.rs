//! vmm-node: the embedded KVM VMM. See `CONTRACT.md` for the seams between its parts.

pub mod devices;

/// Guest memory with vm-memory's write bitmap, so writes the VMM's devices make into
/// guest memory are tracked for live migration alongside KVM's dirty log.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub mod migration;
