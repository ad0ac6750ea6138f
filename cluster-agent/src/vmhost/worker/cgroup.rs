//! A cgroup of its own for each VM worker: the VM's memory limit and a CPU cap. All the
//! VMs of a node share one parent group, so that under contention the agent's threads
//! (heartbeats, Raft, leases) outweigh the guests and the workers' own control threads
//! (lease, migration engine) are not starved behind their guests:
//! - **cgroup v1** (the cpu controller places threads one by one): only the vCPU threads
//!   join the VM's cpu cgroup, capped at its vCPUs; the parent weighs one nice-10 thread
//!   per core (what vCPU threads of VMs inside the agent weigh). The worker's other
//!   threads stay in the agent's cpu cgroup at the agent's weight. The whole process
//!   joins the VM's memory cgroup.
//! - **cgroup v2** (a process's threads share one domain cgroup): the whole worker joins
//!   the VM's cgroup, capped at its vCPUs plus one core; the parent weighs one nice-0
//!   thread per core, so the guests together get what the cores are worth and each agent
//!   thread weighs as much as a core's worth of them.
//!
//! Inside a worker the vCPU threads run at nice 10, below the worker's other threads.
//!
//! ```text
//! cgroup v1 (one tree per controller):  <cpu mount>/<agent's cpu cgroup>/cluster-vms-node-<id>/<vm>
//!                                       <memory mount>/<agent's memory cgroup>/cluster-vms-node-<id>/<vm>
//! cgroup v2 (one tree):                 <agent's cgroup, or its parent when it is "agent">/cluster-vms-node-<id>/<vm>
//! ```
//!
//! The agent creates a worker's cgroup and writes its limits; the worker moves itself
//! into it before it allocates guest memory or starts a thread ([`join`]), so every page
//! and thread of the VM is accounted there. A restarted agent finds its workers still in
//! their cgroups. On cgroup v2 the agent must not sit in the cgroup whose controllers it
//! enables (the kernel's "no internal processes" rule): under systemd the unit has
//! `Delegate=yes` and `DelegateSubgroup=agent` (systemd ≥ 254). Where the tree cannot be
//! set up the agent says why once and runs its workers without cgroups (vCPU threads at nice 10 only).

use std::path::{Path, PathBuf};

/// Memory a worker may use beyond its guest's RAM (VMM, device buffers, page cache of
/// its disks before reclaim).
pub const MEMORY_OVERHEAD_MIB: u64 = 256;

/// CPU weight of the group of all VMs of a node with `cores` cores. cgroup v1, where it
/// holds vCPU threads only: one nice-10 thread's per core (`cpu.shares`, 110 against a
/// nice-0 thread's 1024). v2, where it holds whole workers: one nice-0 thread's per core
/// (`cpu.weight`, 100, at most 10000).
pub fn vms_weight(v2: bool, cores: usize) -> u64 {
    let cores = cores.max(1) as u64;
    if v2 {
        (100 * cores).min(10_000)
    } else {
        (110 * cores).min(262_144)
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CFS period the CPU cap is written in (µs).
const CPU_PERIOD_US: u64 = 100_000;

/// Where this agent's workers' cgroups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    v2: bool,
    /// v1: the base directory in the cpu and in the memory hierarchy; v2: the one base.
    bases: Vec<PathBuf>,
}

/// The limits of one worker's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub vcpus: u64,
}

impl Limits {
    /// A VM of `vcpus` vCPUs and `memory_mib` MiB of RAM: its RAM plus
    /// [`MEMORY_OVERHEAD_MIB`]; CPU per [`Limits::cpu_quota_us`].
    pub fn of_vm(vcpus: u32, memory_mib: u64) -> Limits {
        Limits {
            memory_bytes: memory_mib
                .saturating_add(MEMORY_OVERHEAD_MIB)
                .saturating_mul(1 << 20),
            vcpus: u64::from(vcpus),
        }
    }

    /// CPU time per `CPU_PERIOD_US` (µs): the vCPUs (cgroup v1, where only vCPU threads
    /// are in the cgroup), or the vCPUs plus one core for the device and migration
    /// threads (v2, the whole worker).
    pub fn cpu_quota_us(&self, v2: bool) -> u64 {
        self.vcpus
            .max(1)
            .saturating_add(u64::from(v2))
            .saturating_mul(CPU_PERIOD_US)
    }
}

impl Tree {
    /// This process's tree on the host (`/sys/fs/cgroup`, `/proc/self/cgroup`).
    pub fn detect(node: u64) -> Result<Tree, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        Tree::detect_at(Path::new("/sys/fs/cgroup"), &own, node)
    }

    /// The tree below the cgroup filesystem mounted at `root` for a process whose
    /// `/proc/self/cgroup` reads `own`; creates the base directories (and on v2 enables
    /// the cpu and memory controllers down to them).
    pub fn detect_at(root: &Path, own: &str, node: u64) -> Result<Tree, String> {
        let base_name = format!("cluster-vms-node-{node}");
        if root.join("cgroup.controllers").exists() {
            let path = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or_else(|| format!("no cgroup v2 entry in /proc/self/cgroup: {own:?}"))?;
            let mut parent = root.join(path.trim_start_matches('/'));
            if parent.file_name().is_some_and(|n| n == "agent") {
                if let Some(p) = parent.parent() {
                    parent = p.to_path_buf();
                }
            }
            let enable = |dir: &Path| {
                write(&dir.join("cgroup.subtree_control"), "+cpu +memory").map_err(|e| {
                    format!(
                        "{e} (cgroup v2 enables controllers only below a cgroup with no \
                         process of its own: run the agent with Delegate=yes and \
                         DelegateSubgroup=agent)"
                    )
                })
            };
            enable(&parent)?;
            let base = parent.join(&base_name);
            mkdir(&base)?;
            enable(&base)?;
            write(
                &base.join("cpu.weight"),
                &vms_weight(true, cores()).to_string(),
            )?;
            return Ok(Tree {
                v2: true,
                bases: vec![base],
            });
        }
        let mut bases = Vec::new();
        for controller in ["cpu", "memory"] {
            let (controllers, path) = entries(own)
                .find(|(cs, _)| cs.split(',').any(|c| c == controller))
                .ok_or_else(|| format!("no cgroup v1 {controller} controller for this process"))?;
            let mount = [root.join(controllers), root.join(controller)]
                .into_iter()
                .find(|m| m.is_dir())
                .ok_or_else(|| {
                    format!(
                        "the cgroup v1 {controller} hierarchy is not mounted below {}",
                        root.display()
                    )
                })?;
            let base = mount.join(path.trim_start_matches('/')).join(&base_name);
            mkdir(&base)?;
            if controller == "cpu" {
                write(
                    &base.join("cpu.shares"),
                    &vms_weight(false, cores()).to_string(),
                )?;
            }
            bases.push(base);
        }
        Ok(Tree { v2: false, bases })
    }

    /// Creates (or reuses) the cgroup of VM `vm` with `limits`: the directories the
    /// worker joins.
    pub fn create(&self, vm: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
        let dirs: Vec<PathBuf> = self.bases.iter().map(|b| b.join(vm)).collect();
        for d in &dirs {
            mkdir(d)?;
        }
        let quota = limits.cpu_quota_us(self.v2).to_string();
        let memory = limits.memory_bytes.to_string();
        if self.v2 {
            let d = &dirs[0];
            write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&d.join("memory.max"), &memory)?;
        } else {
            let (cpu, mem) = (&dirs[0], &dirs[1]);
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            write(&mem.join("memory.limit_in_bytes"), &memory)?;
        }
        Ok(dirs)
    }

    /// Removes VM `vm`'s cgroup once no process is left in it (a live one stays).
    pub fn remove(&self, vm: &str) {
        for b in &self.bases {
            let _ = std::fs::remove_dir(b.join(vm));
        }
    }

    /// Removes every empty cgroup of a VM not in `keep` (left by workers that exited while
    /// no agent ran).
    pub fn sweep(&self, keep: &std::collections::BTreeSet<String>) {
        for b in &self.bases {
            let Ok(entries) = std::fs::read_dir(b) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && !keep.contains(&name) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// A worker, first thing: moves this process (every thread of it) into each of `dirs`
/// except a cgroup v1 cpu one, whose per-thread membership file (`tasks`) it returns:
/// the vCPU threads move themselves there as they start (`vmm_node::kvm::set_vcpu_cgroups`).
pub fn join(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let pid = std::process::id().to_string();
    let mut per_thread = Vec::new();
    for d in dirs {
        if is_v1_cpu(d) {
            per_thread.push(d.join("tasks"));
        } else {
            write(&d.join("cgroup.procs"), &pid)?;
        }
    }
    Ok(per_thread)
}

/// A cgroup v1 cpu controller directory (holds threads one by one).
fn is_v1_cpu(d: &Path) -> bool {
    d.join("cpu.cfs_quota_us").exists() && !d.join("cgroup.controllers").exists()
}

/// A worker on its way out: moves itself back to the agent's cgroup and removes its VM's
/// (best effort: where that is refused — cgroup v2's rule — the agent removes it after
/// reaping the worker, or sweeps it at its next start).
pub fn leave(dirs: &[PathBuf]) {
    let pid = std::process::id().to_string();
    for d in dirs {
        if let Some(agent) = d.parent().and_then(Path::parent) {
            if write(&agent.join("cgroup.procs"), &pid).is_ok() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// The cgroup directories `pid` is in, one per hierarchy (`/proc/<pid>/cgroup`), as
/// `(controllers, path)`.
pub fn of_process(pid: u32) -> Result<Vec<(String, String)>, String> {
    of_file(&format!("/proc/{pid}/cgroup"))
}

/// As [`of_process`] for one thread `tid` of process `pid` (cgroup v1 places threads one
/// by one).
pub fn of_thread(pid: u32, tid: u32) -> Result<Vec<(String, String)>, String> {
    of_file(&format!("/proc/{pid}/task/{tid}/cgroup"))
}

fn of_file(path: &str) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(entries(&text)
        .map(|(cs, p)| (cs.to_string(), p.to_string()))
        .collect())
}

/// The `(controllers, path)` of each `id:controllers:path` line of a `/proc/<pid>/cgroup`.
fn entries(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, cs, p) = (f.next()?, f.next()?, f.next()?);
        Some((cs, p))
    })
}

fn mkdir(d: &Path) -> Result<(), String> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating cgroup {}: {e}", d.display())),
    }
}

fn write(f: &Path, value: &str) -> Result<(), String> {
    std::fs::write(f, value).map_err(|e| format!("writing {value:?} to {}: {e}", f.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_weigh_a_nice_10_thread_per_core_whole_workers_a_nice_0_one() {
        assert_eq!(vms_weight(false, 2), 220);
        assert_eq!(vms_weight(false, 512), 56_320);
        assert_eq!(vms_weight(true, 2), 200);
        assert_eq!(vms_weight(true, 0), 100);
        assert_eq!(vms_weight(true, 512), 10_000);
    }

    #[test]
    fn limits_are_the_vms_ram_and_vcpus_plus_headroom() {
        let l = Limits::of_vm(2, 1024);
        assert_eq!(l.memory_bytes, (1024 + MEMORY_OVERHEAD_MIB) << 20);
        // v1 caps the vCPU threads alone, v2 the whole worker (one core more).
        assert_eq!(l.cpu_quota_us(false), 200_000);
        assert_eq!(l.cpu_quota_us(true), 300_000);
        assert_eq!(Limits::of_vm(0, 64).cpu_quota_us(false), 100_000);
        // Absurd numbers saturate instead of wrapping.
        assert_eq!(Limits::of_vm(u32::MAX, u64::MAX).memory_bytes, u64::MAX);
    }

    #[test]
    fn v1_tree_is_made_below_the_agents_cgroup_in_each_hierarchy() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for d in [
            "cpu,cpuacct/system.slice/a.service",
            "memory/system.slice/a.service",
        ] {
            std::fs::create_dir_all(root.path().join(d)).unwrap_or_else(|e| panic!("{e}"));
        }
        let own = "12:memory:/system.slice/a.service\n4:cpu,cpuacct:/system.slice/a.service\n0::/system.slice/a.service\n";
        let t = Tree::detect_at(root.path(), own, 3).unwrap_or_else(|e| panic!("{e}"));
        let cpu = root
            .path()
            .join("cpu,cpuacct/system.slice/a.service/cluster-vms-node-3");
        let mem = root
            .path()
            .join("memory/system.slice/a.service/cluster-vms-node-3");
        assert_eq!(
            t,
            Tree {
                v2: false,
                bases: vec![cpu.clone(), mem.clone()]
            }
        );
        let dirs = t
            .create("vm-a", Limits::of_vm(1, 128))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dirs, vec![cpu.join("vm-a"), mem.join("vm-a")]);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read(cpu.join("cpu.shares")),
            vms_weight(false, cores()).to_string()
        );
        assert_eq!(read(cpu.join("vm-a/cpu.cfs_quota_us")), "100000");
        // The cpu directory holds vCPU threads (its `tasks`), the memory one the process.
        std::fs::write(mem.join("vm-a/cgroup.procs"), "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            join(&dirs).unwrap_or_else(|e| panic!("{e}")),
            vec![cpu.join("vm-a/tasks")]
        );
        assert_eq!(
            read(mem.join("vm-a/cgroup.procs")),
            std::process::id().to_string()
        );
        assert_eq!(
            read(mem.join("vm-a/memory.limit_in_bytes")),
            ((128u64 + 256) << 20).to_string()
        );
        // Plain directories (not a cgroupfs): the files written make them non-empty, so
        // remove() leaves them; sweep() keeps the named ones.
        std::fs::create_dir(mem.join("stale")).unwrap_or_else(|e| panic!("{e}"));
        t.sweep(&["vm-a".to_string()].into());
        assert!(!mem.join("stale").exists() && mem.join("vm-a").exists());
    }

    #[test]
    fn v2_tree_enables_controllers_above_the_agents_leaf() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let svc = root.path().join("system.slice/a.service");
        std::fs::create_dir_all(svc.join("agent")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory")
            .unwrap_or_else(|e| panic!("{e}"));
        let t = Tree::detect_at(root.path(), "0::/system.slice/a.service/agent\n", 1)
            .unwrap_or_else(|e| panic!("{e}"));
        let base = svc.join("cluster-vms-node-1");
        assert_eq!(
            t,
            Tree {
                v2: true,
                bases: vec![base.clone()]
            }
        );
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(svc.join("cgroup.subtree_control")), "+cpu +memory");
        assert_eq!(read(base.join("cgroup.subtree_control")), "+cpu +memory");
        t.create("vm-b", Limits::of_vm(4, 2048))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(base.join("vm-b/cpu.max")), "500000 100000");
        assert_eq!(
            read(base.join("cpu.weight")),
            vms_weight(true, cores()).to_string()
        );
        assert_eq!(
            read(base.join("vm-b/memory.max")),
            ((2048u64 + 256) << 20).to_string()
        );
    }

    #[test]
    fn a_missing_hierarchy_is_named() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = Tree::detect_at(root.path(), "4:cpu:/\n", 1)
            .err()
            .unwrap_or_default();
        assert!(e.contains("cgroup v1 cpu hierarchy is not mounted"), "{e}");
        let e = Tree::detect_at(root.path(), "0::/\n", 1)
            .err()
            .unwrap_or_default();
        assert!(e.contains("no cgroup v1 cpu controller"), "{e}");
    }
}
