//! systemd's service notification protocol (`sd_notify(3)`), spoken directly: one Unix
//! datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET` (a path, or an abstract socket name
//! written with a leading '@'). Nothing is sent when `NOTIFY_SOCKET` is unset, so the
//! agent runs the same outside systemd.
//!
//! What the agent says, and when (`deploy/cluster-agent.service` has `Type=notify`):
//!
//! - `READY=1` once it serves: every listener is bound and serving, Raft has started on
//!   the data dir, so it knows whether it belongs to a cluster (`STATUS=` says which).
//! - `STATUS=...`: "serving, leader N", "serving, no leader known", or "waiting for a
//!   cluster (init or join)", updated when it changes.
//! - `WATCHDOG=1` every half of `$WATCHDOG_USEC` (when systemd set it for this process,
//!   `$WATCHDOG_PID`), but only while the heartbeat loop and the fence watcher both
//!   completed a round recently ([`Agent::loop_rounds`]): an agent whose core loops are
//!   wedged stops pinging and systemd restarts it (`WatchdogSec=`).
//! - `STOPPING=1` when shutdown begins.
//!
//! Datagrams are sent without blocking: a notification that does not fit the receiver's
//! queue is dropped, never waited for.

use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::node::Agent;

/// The longest `NOTIFY_SOCKET` accepted (a `sockaddr_un` path holds 108 bytes).
const NOTIFY_SOCKET_BYTES_MAX: usize = 107;

/// How often the status line is refreshed when systemd asked for no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The fastest watchdog ping accepted (a smaller `WATCHDOG_USEC` is raised to twice it).
const PING_EVERY_MIN: Duration = Duration::from_millis(10);

/// Where notifications go; [`Notifier::disabled`] when not started by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    ping_every: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            ping_every: None,
        }
    }

    /// The notifier `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` describe. A value
    /// that cannot be used is logged and ignored (the agent runs on without notifying).
    pub fn from_env() -> Notifier {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        let target = match socket_addr(socket.as_encoded_bytes()) {
            Ok(addr) => match UnixDatagram::unbound().and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            }) {
                Ok(s) => Some((s, addr)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a socket to notify systemd");
                    None
                }
            },
            Err(why) => {
                tracing::warn!(notify_socket = ?socket, why, "NOTIFY_SOCKET ignored");
                None
            }
        };
        let for_me = match std::env::var("WATCHDOG_PID") {
            Ok(pid) => pid.trim().parse::<u32>().ok() == Some(std::process::id()),
            Err(_) => true,
        };
        let ping_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_me)
            .map(|usec| (Duration::from_micros(usec) / 2).max(PING_EVERY_MIN));
        Notifier { target, ping_every }
    }

    /// Whether anything is sent at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `state` (`KEY=VALUE` lines). Failures are logged at debug level only:
    /// notifications are advisory, and a full queue must not stall the agent.
    pub fn notify(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::debug!(error = %e, state, "systemd notification not sent");
        }
    }
}

/// Parse a `NOTIFY_SOCKET` value: an absolute path, or '@' and an abstract name.
fn socket_addr(value: &[u8]) -> Result<SocketAddr, &'static str> {
    if value.is_empty() || value.len() > NOTIFY_SOCKET_BYTES_MAX {
        return Err("empty or longer than a socket path may be");
    }
    match value {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name).map_err(|_| "not an abstract socket name")
        }
        [b'/', ..] => {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(value));
            SocketAddr::from_pathname(path).map_err(|_| "not a socket path")
        }
        _ => Err("neither an absolute path nor '@' and an abstract name"),
    }
}

/// The status line for `agent` as it is now.
pub fn status_of(agent: &Agent) -> String {
    if agent.cluster_info().is_none() {
        return "waiting for a cluster (init or join)".to_string();
    }
    match agent.leader() {
        Some(id) => format!("serving, leader {id}"),
        None => "serving, no leader known".to_string(),
    }
}

/// Keep systemd told: the status line when it changes and, with a watchdog, a ping every
/// half `WATCHDOG_USEC` while the agent's core loops advance. Runs until `shutdown` flips.
pub async fn supervise(
    notifier: Arc<Notifier>,
    agent: Arc<Agent>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !notifier.enabled() {
        return;
    }
    let every = notifier.ping_every.unwrap_or(STATUS_EVERY);
    // A loop counts as alive while it completed a round within `stall`: longer than one
    // heartbeat interval (the slower of the two loops' periods) plus a ping period, so a
    // healthy agent is never reported wedged, and short enough that a wedged one stops
    // pinging well within `WatchdogSec` at the usual settings.
    let stall = (agent.config().heartbeat_interval * 2).max(every) + every;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics = agent.role_watch();
    let mut last_status = status_of(&agent);
    let mut seen = agent.loop_rounds();
    let (mut hb_at, mut fence_at) = (Instant::now(), Instant::now());
    let mut wedged_reported = false;
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            r = metrics.changed() => if r.is_err() { return } else { false },
            _ = shutdown.changed() => return,
        };
        let status = status_of(&agent);
        if status != last_status {
            notifier.notify(&format!("STATUS={status}"));
            last_status = status;
        }
        if !ticked || notifier.ping_every.is_none() {
            continue;
        }
        let now = Instant::now();
        let rounds = agent.loop_rounds();
        if rounds.0 != seen.0 {
            hb_at = now;
        }
        if rounds.1 != seen.1 {
            fence_at = now;
        }
        seen = rounds;
        let alive = now.duration_since(hb_at) <= stall && now.duration_since(fence_at) <= stall;
        if alive {
            notifier.notify("WATCHDOG=1");
            wedged_reported = false;
        } else if !wedged_reported {
            wedged_reported = true;
            tracing::error!(
                heartbeat_silent_ms = now.duration_since(hb_at).as_millis() as u64,
                fence_silent_ms = now.duration_since(fence_at).as_millis() as u64,
                "core loops stalled; systemd watchdog pings withheld"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_values() {
        assert!(socket_addr(b"/run/systemd/notify").is_ok());
        assert!(socket_addr(b"@abstract-name").is_ok());
        for bad in [&b""[..], b"relative/path", b"x", &[b'/'; 200][..]] {
            assert!(socket_addr(bad).is_err(), "{bad:?} accepted");
        }
    }
}
