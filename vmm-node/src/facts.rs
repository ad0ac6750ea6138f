//! Host facts reported to the cluster: CPU vendor/model, logical CPUs, memory, KVM kind.

use serde::{Deserialize, Serialize};

/// What kind of KVM backs `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmKind {
    /// Hardware-assisted (Intel VT-x).
    Vmx,
    /// Hardware-assisted (AMD-V).
    Svm,
    /// Software (e.g. PVM): guest kernel code is emulated and slow.
    Software,
    /// `/dev/kvm` cannot be opened.
    Unavailable,
}

/// Facts about this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub logical_cpus: u32,
    pub memory_mib: u64,
    pub kvm: KvmKind,
}

/// Errors reading host facts.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// A /proc file cannot be read.
    #[error("cannot read {0}")]
    Proc(&'static str, #[source] std::io::Error),
    /// MemTotal missing from /proc/meminfo.
    #[error("/proc/meminfo has no MemTotal line")]
    NoMemTotal,
}

fn regs_to_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}

/// CPU vendor string from CPUID leaf 0.
pub fn cpu_vendor() -> String {
    let (_, b, c, d) = crate::kvm::host_cpuid(0, 0);
    regs_to_string(&[b, d, c])
}

/// CPU brand string from CPUID leaves 0x8000_0002..4.
pub fn cpu_model() -> String {
    let (max, ..) = crate::kvm::host_cpuid(0x8000_0000, 0);
    if max < 0x8000_0004 {
        return String::from("unknown");
    }
    let mut regs = Vec::new();
    for leaf in 0x8000_0002..=0x8000_0004u32 {
        let (a, b, c, d) = crate::kvm::host_cpuid(leaf, 0);
        regs.extend([a, b, c, d]);
    }
    regs_to_string(&regs)
}

/// Parse `MemTotal` (kB) from /proc/meminfo text, in MiB.
pub fn parse_meminfo_total_mib(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb / 1024)
}

/// Host memory in MiB.
pub fn host_memory_mib() -> Result<u64, FactsError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| FactsError::Proc("/proc/meminfo", e))?;
    parse_meminfo_total_mib(&text).ok_or(FactsError::NoMemTotal)
}

/// Classify KVM from the CPU flags line of /proc/cpuinfo and whether /dev/kvm opens.
pub fn classify_kvm(cpuinfo: &str, kvm_opens: bool) -> KvmKind {
    if !kvm_opens {
        return KvmKind::Unavailable;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("vmx") {
        KvmKind::Vmx
    } else if has("svm") {
        KvmKind::Svm
    } else {
        KvmKind::Software
    }
}

/// Gather the facts of this host (and log them).
pub fn host_facts() -> Result<HostFacts, FactsError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| FactsError::Proc("/proc/cpuinfo", e))?;
    let kvm_opens = kvm_ioctls::Kvm::new().is_ok();
    let facts = HostFacts {
        cpu_vendor: cpu_vendor(),
        cpu_model: cpu_model(),
        logical_cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_mib: host_memory_mib()?,
        kvm: classify_kvm(&cpuinfo, kvm_opens),
    };
    tracing::info!(
        cpu_vendor = %facts.cpu_vendor,
        cpu_model = %facts.cpu_model,
        logical_cpus = facts.logical_cpus,
        memory_mib = facts.memory_mib,
        kvm = ?facts.kvm,
        "host facts"
    );
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_kvm_kind() {
        assert_eq!(classify_kvm("flags\t: fpu vmx sse", true), KvmKind::Vmx);
        assert_eq!(classify_kvm("flags\t: fpu svm sse", true), KvmKind::Svm);
        assert_eq!(classify_kvm("flags\t: fpu sse", true), KvmKind::Software);
        assert_eq!(classify_kvm("flags\t: svm", false), KvmKind::Unavailable);
    }

    #[test]
    fn meminfo_and_cpuid_facts() {
        assert_eq!(
            parse_meminfo_total_mib("MemTotal:  2097152 kB\n"),
            Some(2048)
        );
        assert_eq!(parse_meminfo_total_mib("nothing"), None);
        let f = host_facts().unwrap();
        assert!(
            ["AuthenticAMD", "GenuineIntel"].contains(&f.cpu_vendor.as_str()),
            "{f:?}"
        );
        assert!(f.memory_mib > 0 && f.logical_cpus > 0);
        // These machines have a software KVM (see shared/PLATFORM.md).
        assert_ne!(f.kvm, KvmKind::Unavailable, "/dev/kvm cannot be opened");
    }
}
