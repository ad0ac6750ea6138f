//! The test guest's interface: boot parameters on its command line and the lines it
//! prints on the serial console.
//!
//! ## Command line (`key=value`, space separated)
//! | key | meaning | default |
//! |---|---|---|
//! | `workload` | `idle`, `dirty`, `mem` (fill + re-verify), `disk` (virtio-blk pattern), `badio` (ports/MMIO without device), `flood` (console flood), `crash` (`ud2` → triple fault), `exit` (exit port with code `seed`), `reset` (i8042 reset), `net` (virtio-net responder: ARP, UDP echo on port 7, ICMP echo) | `idle` |
//! | `net.ip` | `net`: the guest's IPv4 address (see [`net_cmdline`]) | none: `NET down` |
//! | `wss_mib` | working set in MiB (split across vCPUs) | 16 |
//! | `rate_mbps` | `dirty`: write rate in MB/s (all vCPUs together) | 100 |
//! | `seed` | pattern seed for `mem` | 1 |
//! | `hb_ms` | heartbeat period (guest TSC time) | 100 |
//! | `tsc_khz`, `vcpus`, `mem_mib` | appended by the VMM | |
//!
//! ## Console lines
//! ```text
//! BOOT vcpus=2 mem_mib=64 workload=mem wss_mib=16 tsc_khz=2994000
//! HB seq=17 tsc_us=1700123 cpus=2 mem=ok mem_passes=12 mem_errors=0 dirty_mib=0 disk=off disk_passes=0
//! ERR what=mem addr=0x1234000 expected=0x... found=0x...
//! NET up slot=0 mac=52:54:00:12:34:56 ip=10.77.0.2 mtu=9000 features=0x0000000100010029
//! NET down reason=nodev
//! ```
//! * `seq` increases by exactly one per heartbeat, across snapshot/restore and migration.
//! * `tsc_us` is guest TSC time since boot in µs (TSC ticks / `tsc_khz` × 1000).
//! * `cpus` is the number of vCPUs that have checked in (all of them once started).
//! * `mem`: `ok` (no mismatch ever), `bad` (at least one), `fill` (still filling), `off`.
//! * `disk`: `ok`, `bad`, `nodisk` (no device found yet), `off`; `disk_passes` counts
//!   completed write+flush+read-verify rounds.
//! * `NET up slot=.. mac=.. ip=.. mtu=.. features=..` is printed once the `net` workload's
//!   NIC is live (the first NIC slot that holds a network device); from then on it
//!   answers. The guest polls its slots once per heartbeat: `NET gone slot=..` when the NIC
//!   in use disappeared (hot remove), and `NET up ...` again when it set up a NIC that
//!   appeared (hot add; also after `NET down` at boot for want of a NIC). Its heartbeats
//!   add `net` (`up`, `down`), `net_rx`, `net_tx`, `net_arp`, `net_udp`, `net_icmp`,
//!   `net_drop`, `net_busy` (replies dropped for want of a transmit buffer) and
//!   `net_resets`.

use std::collections::BTreeMap;

/// Workload selected at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Idle,
    Dirty,
    Mem,
    Disk,
    /// Writes/reads ports and MMIO with no device behind them; HB adds
    /// `badio_rounds` and `badio_wrong` (reads that did not return all-ones).
    BadIo,
    /// Prints 24 KB lines as fast as it can, between heartbeats.
    Flood,
    /// Executes `ud2` at CPL3 right after the BOOT line (no IDT: triple fault).
    Crash,
    /// Writes `seed` to the exit port right after the BOOT line.
    Exit,
    /// Resets the machine through the i8042 (0xfe to port 0x64) after the BOOT line.
    Reset,
    /// Sets up the first NIC and answers ARP, UDP echo (port 7) and ICMP echo on the
    /// address given with `net.ip` ([`net_cmdline`]); prints `NET up ...` when live.
    Net,
}

impl WorkloadKind {
    fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Idle => "idle",
            WorkloadKind::Dirty => "dirty",
            WorkloadKind::Mem => "mem",
            WorkloadKind::Disk => "disk",
            WorkloadKind::BadIo => "badio",
            WorkloadKind::Flood => "flood",
            WorkloadKind::Crash => "crash",
            WorkloadKind::Exit => "exit",
            WorkloadKind::Reset => "reset",
            WorkloadKind::Net => "net",
        }
    }
}

/// Parameters of the test guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub wss_mib: u64,
    pub rate_mbps: u64,
    pub seed: u64,
    pub hb_ms: u64,
}

impl Workload {
    /// A workload with default sizes.
    pub fn new(kind: WorkloadKind) -> Self {
        Self {
            kind,
            wss_mib: 16,
            rate_mbps: 100,
            seed: 1,
            hb_ms: 100,
        }
    }

    /// The command line that selects this workload.
    pub fn cmdline(&self) -> String {
        format!(
            "workload={} wss_mib={} rate_mbps={} seed={} hb_ms={}",
            self.kind.as_str(),
            self.wss_mib,
            self.rate_mbps,
            self.seed,
            self.hb_ms
        )
    }
}

/// The command-line fragment giving the `net` workload its IPv4 address (append it to
/// [`Workload::cmdline`]).
pub fn net_cmdline(ip: std::net::Ipv4Addr) -> String {
    format!("net.ip={ip}")
}

/// A heartbeat line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub tsc_us: u64,
    pub cpus: u64,
    pub mem: String,
    pub mem_passes: u64,
    pub mem_errors: u64,
    pub dirty_mib: u64,
    pub disk: String,
    /// All `key=value` fields of the line (including workload-specific ones).
    pub fields: BTreeMap<String, String>,
}

/// One parsed console line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestLine {
    /// `BOOT ...` with its fields.
    Boot(BTreeMap<String, String>),
    /// `HB ...`.
    Heartbeat(Heartbeat),
    /// `ERR ...` with its fields.
    Error(BTreeMap<String, String>),
    /// `NET up ...` / `NET down ...`: `up` tells which, the fields follow.
    Net {
        up: bool,
        fields: BTreeMap<String, String>,
    },
}

fn fields(rest: &str) -> BTreeMap<String, String> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parse a console line; `None` for lines that are not test guest protocol lines
/// (including a truncated heartbeat).
pub fn parse_line(line: &str) -> Option<GuestLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    match tag {
        "BOOT" => Some(GuestLine::Boot(fields(rest))),
        "ERR" => Some(GuestLine::Error(fields(rest))),
        "NET" => {
            let (state, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let up = match state {
                "up" => true,
                "down" => false,
                _ => return None,
            };
            Some(GuestLine::Net {
                up,
                fields: fields(rest),
            })
        }
        "HB" => {
            let f = fields(rest);
            let num = |k: &str| f.get(k)?.parse::<u64>().ok();
            Some(GuestLine::Heartbeat(Heartbeat {
                seq: num("seq")?,
                tsc_us: num("tsc_us")?,
                cpus: num("cpus")?,
                mem: f.get("mem")?.clone(),
                mem_passes: num("mem_passes")?,
                mem_errors: num("mem_errors")?,
                dirty_mib: num("dirty_mib")?,
                disk: f.get("disk")?.clone(),
                fields: f.clone(),
            }))
        }
        _ => None,
    }
}

/// All heartbeats in a console text, in order. Only complete lines count: an unfinished
/// last line (the guest is still writing it) is ignored.
pub fn heartbeats(text: &str) -> Vec<Heartbeat> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| match parse_line(l) {
            Some(GuestLine::Heartbeat(h)) => Some(h),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heartbeats_and_ignores_noise() {
        let text = "BOOT vcpus=2 mem_mib=64 workload=mem\r\n\
                    HB seq=1 tsc_us=100 cpus=2 mem=fill mem_passes=0 mem_errors=0 dirty_mib=0 disk=off\r\n\
                    garbage\n\
                    HB seq=2 tsc_us=2\n\
                    HB seq=3 tsc_us=300 cpus=2 mem=ok mem_passes=4 mem_errors=0 dirty_mib=5 disk=off\n";
        let hb = heartbeats(text);
        assert_eq!(hb.len(), 2);
        assert_eq!(hb[1].seq, 3);
        assert_eq!(hb[1].mem, "ok");
        assert_eq!(hb[1].dirty_mib, 5);
        match parse_line("BOOT vcpus=2 mem_mib=64").unwrap() {
            GuestLine::Boot(f) => assert_eq!(f["vcpus"], "2"),
            other => panic!("{other:?}"),
        }
        assert!(parse_line("").is_none());
        match parse_line("NET up slot=0 mac=52:54:00:00:00:01 ip=10.77.0.2 mtu=9000\r").unwrap() {
            GuestLine::Net { up: true, fields } => {
                assert_eq!(fields["ip"], "10.77.0.2");
                assert_eq!(fields["mtu"], "9000");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_line("NET down reason=nodev"),
            Some(GuestLine::Net { up: false, .. })
        ));
        assert!(parse_line("NET sideways").is_none());
        assert_eq!(
            net_cmdline("10.77.0.2".parse().unwrap()),
            "net.ip=10.77.0.2"
        );
        // An unfinished last line is not a heartbeat yet.
        let partial =
            "HB seq=1 tsc_us=1 cpus=1 mem=off mem_passes=0 mem_errors=0 dirty_mib=0 disk=off";
        assert!(heartbeats(partial).is_empty());
        assert_eq!(heartbeats(&format!("{partial}\n")).len(), 1);
    }

    #[test]
    fn workload_cmdline() {
        let w = Workload {
            wss_mib: 8,
            ..Workload::new(WorkloadKind::Mem)
        };
        assert_eq!(
            w.cmdline(),
            "workload=mem wss_mib=8 rate_mbps=100 seed=1 hb_ms=100"
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_line_never_panics(s in "\\PC{0,200}") {
            let _ = parse_line(&s);
            let _ = heartbeats(&s);
        }
    }
}
