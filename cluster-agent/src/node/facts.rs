//! Node facts: CPU vendor and model from CPUID (vmm-node's probe), CPU flags, logical
//! CPUs and memory from `/proc`, and the kind of KVM available. Parsing is pure (tested on
//! sample text); [`probe`] reads the host. This crate has no `unsafe`.

use std::path::Path;

use crate::node::config::FactsOverride;
use crate::state::{KvmKind, NodeFacts};

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no `{field}` line")]
    MissingField {
        path: &'static str,
        field: &'static str,
    },
}

/// Parse `/proc/cpuinfo` text into (vendor, model, flags, logical cpus).
pub fn parse_cpuinfo(text: &str) -> Result<(String, String, Vec<String>, u32), FactsError> {
    let mut vendor = None;
    let mut model = None;
    let mut flags = None;
    let mut cpus = 0u32;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => cpus += 1,
            "vendor_id" if vendor.is_none() => vendor = Some(v.to_string()),
            "model name" if model.is_none() => model = Some(v.to_string()),
            "flags" if flags.is_none() => {
                flags = Some(v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            }
            _ => {}
        }
    }
    let vendor = vendor.ok_or(FactsError::MissingField {
        path: "/proc/cpuinfo",
        field: "vendor_id",
    })?;
    Ok((
        vendor,
        model.unwrap_or_default(),
        flags.unwrap_or_default(),
        cpus.max(1),
    ))
}

/// Parse `MemTotal` from `/proc/meminfo` (bytes).
pub fn parse_meminfo(text: &str) -> Result<u64, FactsError> {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("MemTotal:") {
            let kib: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or(FactsError::MissingField {
                    path: "/proc/meminfo",
                    field: "MemTotal",
                })?;
            return Ok(kib.saturating_mul(1024));
        }
    }
    Err(FactsError::MissingField {
        path: "/proc/meminfo",
        field: "MemTotal",
    })
}

/// Hardware if `/dev/kvm` opens and the CPU has `vmx`/`svm`; software if only
/// `/dev/kvm` opens; none otherwise.
pub fn kvm_kind(flags: &[String], dev_kvm_opens: bool) -> KvmKind {
    let hw = flags.iter().any(|f| f == "vmx" || f == "svm");
    match (dev_kvm_opens, hw) {
        (true, true) => KvmKind::Hardware,
        (true, false) => KvmKind::Software,
        (false, _) => KvmKind::None,
    }
}

/// Probe the host, then apply the configured overrides.
pub fn probe(over: &FactsOverride) -> Result<NodeFacts, FactsError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|source| FactsError::Read {
        path: "/proc/cpuinfo",
        source,
    })?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|source| FactsError::Read {
        path: "/proc/meminfo",
        source,
    })?;
    let (_, _, flags, cpus) = parse_cpuinfo(&cpuinfo)?;
    // Vendor and model come from CPUID (vmm-node's probe), the instruction a guest sees,
    // rather than from the kernel's rendering of it; the flag list stays from cpuinfo.
    let (vendor, model) = (vmm_node::facts::cpu_vendor(), vmm_node::facts::cpu_model());
    let memory_bytes = parse_meminfo(&meminfo)?;
    let dev_kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
        .is_ok();
    let kind = kvm_kind(&flags, dev_kvm_opens);
    Ok(apply_override(
        NodeFacts {
            cpu_vendor: vendor,
            cpu_model: model,
            cpu_flags: flags,
            logical_cpus: cpus,
            memory_bytes,
            kvm_kind: kind,
        },
        over,
    ))
}

pub fn apply_override(mut f: NodeFacts, over: &FactsOverride) -> NodeFacts {
    if let Some(v) = &over.cpu_vendor {
        f.cpu_vendor = v.clone();
    }
    if let Some(v) = &over.cpu_model {
        f.cpu_model = v.clone();
    }
    if let Some(v) = over.logical_cpus {
        f.logical_cpus = v;
    }
    if let Some(v) = over.memory_bytes {
        f.memory_bytes = v;
    }
    if let Some(v) = over.kvm_kind {
        f.kvm_kind = v;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 svm\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 svm\n";

    #[test]
    fn cpuinfo_is_parsed() {
        let (v, m, f, n) = parse_cpuinfo(CPUINFO).unwrap_or_default();
        assert_eq!(v, "AuthenticAMD");
        assert_eq!(m, "AMD EPYC 7B13");
        assert_eq!(n, 2);
        assert_eq!(kvm_kind(&f, true), KvmKind::Hardware);
        assert_eq!(kvm_kind(&f, false), KvmKind::None);
        assert_eq!(kvm_kind(&["fpu".to_string()], true), KvmKind::Software);
        assert!(matches!(
            parse_cpuinfo("garbage"),
            Err(FactsError::MissingField {
                field: "vendor_id",
                ..
            })
        ));
    }

    #[test]
    fn meminfo_is_parsed() {
        assert_eq!(
            parse_meminfo("MemTotal:  1024 kB\n").ok(),
            Some(1024 * 1024)
        );
        assert!(parse_meminfo("MemFree: 1 kB").is_err());
    }

    #[test]
    fn host_probe_and_override() {
        let over = FactsOverride {
            cpu_vendor: Some("GenuineIntel".into()),
            ..FactsOverride::default()
        };
        let f = probe(&over);
        let f = match f {
            Ok(f) => f,
            Err(e) => panic!("probe failed: {e}"),
        };
        assert_eq!(f.cpu_vendor, "GenuineIntel");
        assert!(f.logical_cpus >= 1);
        assert!(f.memory_bytes > 0);
    }
}
