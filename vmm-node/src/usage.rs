//! What a VM uses on its host, read from `/proc` of this (the VMM's) process.
//!
//! - **CPU**: for each vCPU thread, `/proc/self/task/<tid>/schedstat` gives the time it ran
//!   and the time it was runnable but waited for a CPU (both in ns, since it started). Their
//!   sum over an interval, divided by the interval, is the vCPU's *demand*: what it would have
//!   used with a CPU to itself. A thread that is gone (its VM stopped) counts zero. A kernel
//!   without scheduler statistics (`0 0 0`) is an error, so the VM stays unmeasured.
//! - **Memory**: guest RAM is anonymous (or file) memory mapped into this process, populated
//!   on first touch; the resident part of its mappings (`Rss` in `/proc/self/smaps`) is the
//!   memory the guest has touched. A kernel mapping that extends past guest RAM (the kernel
//!   may merge neighbouring mappings) is counted in proportion to the overlap.
//!
//! Callers turn the cumulative counters into rates; nothing here keeps state.

use std::path::PathBuf;

/// Cumulative usage of one VM at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmUsage {
    /// Σ time the vCPU threads ran, ns.
    pub cpu_run_ns: u64,
    /// Σ time the vCPU threads were runnable but waited for a CPU, ns.
    pub cpu_wait_ns: u64,
    /// Guest RAM resident on this host now, bytes.
    pub memory_resident_bytes: u64,
}

/// Why usage could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// A `/proc` file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file did not have the expected form.
    #[error("{path} has an unexpected line: {line:?}")]
    Parse { path: PathBuf, line: String },
    /// The guest memory has no host mapping.
    #[error("guest memory has no host mapping")]
    Mapping(#[source] crate::kvm::SysError),
    /// The kernel keeps no scheduler statistics (`schedstat` reads `0 0 0`, no
    /// `CONFIG_SCHED_INFO`): CPU demand cannot be measured on this host.
    #[error("{path} reads 0 0 0: this kernel keeps no scheduler statistics (CONFIG_SCHED_INFO)")]
    NoSchedInfo { path: PathBuf },
}

/// (run ns, wait ns) from the text of a `schedstat` file (`"<run> <wait> <timeslices>"`).
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_ascii_whitespace();
    let run = fields.next()?.parse().ok()?;
    let wait = fields.next()?.parse().ok()?;
    Some((run, wait))
}

/// (run ns, wait ns) of a thread from its `schedstat` text read at `path`. All zeros is an
/// error: a thread that exists has run at least once, so the kernel keeps no statistics (an
/// idle vCPU would otherwise look like one with no demand at all).
fn thread_times(text: &str, path: &std::path::Path) -> Result<(u64, u64), UsageError> {
    let times = parse_schedstat(text).ok_or_else(|| UsageError::Parse {
        path: path.to_owned(),
        line: text.trim().to_owned(),
    })?;
    if text.split_ascii_whitespace().all(|f| f == "0") {
        return Err(UsageError::NoSchedInfo {
            path: path.to_owned(),
        });
    }
    Ok(times)
}

/// Bytes resident in the host ranges `ranges` (start, length), from the text of an `smaps` file.
pub fn resident_in(smaps: &str, ranges: &[(u64, u64)]) -> Result<u64, String> {
    let mut total: u128 = 0;
    // Overlap (bytes) of the current mapping with the ranges, and its length.
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        if let Some((start, end)) = mapping_header(line) {
            let overlap: u64 = ranges
                .iter()
                .map(|&(s, len)| {
                    let e = s.saturating_add(len);
                    end.min(e).saturating_sub(start.max(s))
                })
                .sum();
            current = (overlap > 0).then_some((overlap, end - start));
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let Some((overlap, len)) = current else {
                continue;
            };
            let kib: u64 = rest
                .trim()
                .strip_suffix("kB")
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| line.to_owned())?;
            let rss = u128::from(kib) * 1024;
            total += if overlap >= len {
                rss
            } else {
                rss * u128::from(overlap) / u128::from(len.max(1))
            };
        }
    }
    Ok(total.min(u128::from(u64::MAX)) as u64)
}

/// `(start, end)` of an smaps mapping header line (`"7f00-7f80 rw-p 0 00:00 0 ..."`).
fn mapping_header(line: &str) -> Option<(u64, u64)> {
    let range = line.split_ascii_whitespace().next()?;
    let (a, b) = range.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    (end > start).then_some((start, end))
}

/// Usage of a VM whose vCPU threads are `tids` and whose guest RAM is mapped at `ranges`.
pub fn measure(tids: &[u32], ranges: &[(u64, u64)]) -> Result<VmUsage, UsageError> {
    let mut u = VmUsage::default();
    for tid in tids {
        let path = PathBuf::from(format!("/proc/self/task/{tid}/schedstat"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(UsageError::Read { path, source }),
        };
        let (run, wait) = thread_times(&text, &path)?;
        u.cpu_run_ns = u.cpu_run_ns.saturating_add(run);
        u.cpu_wait_ns = u.cpu_wait_ns.saturating_add(wait);
    }
    let path = PathBuf::from("/proc/self/smaps");
    let smaps = std::fs::read_to_string(&path).map_err(|source| UsageError::Read {
        path: path.clone(),
        source,
    })?;
    u.memory_resident_bytes =
        resident_in(&smaps, ranges).map_err(|line| UsageError::Parse { path, line })?;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_is_run_then_wait() {
        assert_eq!(
            parse_schedstat("558573757 154169 23\n"),
            Some((558573757, 154169))
        );
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("12 x 3"), None);
    }

    #[test]
    fn all_zero_schedstat_is_no_statistics_not_an_idle_vcpu() {
        let path = std::path::Path::new("/proc/self/task/7/schedstat");
        assert_eq!(thread_times("5 3 1\n", path).ok(), Some((5, 3)));
        let e = thread_times("0 0 0\n", path).expect_err("no statistics");
        assert!(matches!(e, UsageError::NoSchedInfo { .. }), "{e}");
        assert!(e.to_string().contains("CONFIG_SCHED_INFO"), "{e}");
        assert!(matches!(
            thread_times("garbage", path),
            Err(UsageError::Parse { .. })
        ));
    }

    const SMAPS: &str = "\
55d0-55e0 r--p 00000000 fd:00 123 /usr/bin/agent
Size:                 64 kB
Rss:                  40 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 256 kB
Pss:                 256 kB
7f0000100000-7f0000300000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
";

    #[test]
    fn resident_counts_mappings_inside_the_ranges() {
        // The first anonymous mapping exactly.
        assert_eq!(
            resident_in(SMAPS, &[(0x7f00_0000_0000, 0x10_0000)]),
            Ok(256 * 1024)
        );
        // Half of the second mapping: half its resident bytes.
        assert_eq!(
            resident_in(SMAPS, &[(0x7f00_0010_0000, 0x10_0000)]),
            Ok(1024 * 1024)
        );
        // Both, as two ranges.
        assert_eq!(
            resident_in(
                SMAPS,
                &[(0x7f00_0000_0000, 0x10_0000), (0x7f00_0010_0000, 0x20_0000)]
            ),
            Ok(2304 * 1024)
        );
        assert_eq!(resident_in(SMAPS, &[(0x1000, 0x1000)]), Ok(0));
    }

    #[test]
    fn a_bad_rss_line_is_named() {
        let bad = "7f00-7f80 rw-p 0 00:00 0\nRss: lots\n";
        assert_eq!(resident_in(bad, &[(0x7f00, 0x80)]), Err("Rss: lots".into()));
    }

    #[test]
    fn this_thread_and_touched_memory_are_measured() {
        let tid = crate::kvm::current_tid();
        let mut buf = vec![0u8; 8 << 20];
        // Touch every page, then spin so the thread has run time to show.
        for i in (0..buf.len()).step_by(4096) {
            buf[i] = 1;
        }
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(20) {
            x = x.wrapping_add(1);
        }
        std::hint::black_box(x);
        let range = (buf.as_ptr() as u64, buf.len() as u64);
        let u = measure(&[tid], &[range]).expect("measured");
        assert!(u.cpu_run_ns > 0, "{u:?}");
        // The touched buffer is resident (its mapping may extend past it: at least most of it).
        assert!(u.memory_resident_bytes >= 4 << 20, "{u:?}");
        // A thread id that does not exist counts zero.
        let gone = measure(&[u32::MAX], &[]).expect("measured");
        assert_eq!(gone, VmUsage::default());
    }
}
