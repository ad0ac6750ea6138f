//! Control socket of the `vmm-node` binary: a Unix socket speaking JSON lines.
//!
//! Each request is one JSON object on one line (at most [`REQUEST_BYTES_MAX`] bytes) with a
//! `cmd` field; each response is one JSON object on one line with `"ok": true|false` and
//! either result fields or `"error"` (the whole error chain).
//!
//! | cmd | fields | result |
//! |---|---|---|
//! | `status` | | `status`, `config`, `tsc_khz`, `console_bytes` |
//! | `pause` / `resume` / `stop` | | |
//! | `snapshot` | `dir`, `resume` (bool, default false) | `state_bytes`, `memory_bytes`, `total_ms` |
//! | `console` | `tail_bytes` (default 64 KiB), `stream` (bool) | `text`; with `stream`, then one `{"line": ...}` per console line until the client disconnects or the VM stops |
//! | `attach-disk` | `slot`, `path`, `read_only` (default false) | (hot-add, needs virtio-blk slots) |
//! | `detach-disk` | `slot` | (hot-remove) |
//! | `attach-nic` | `tap_name`, `mac`, `mtu` (default 1500), `slot` (default: lowest free) | `slot` (hot-add into an empty NIC slot; the TAP must exist) |
//! | `detach-nic` | `mac` | `tap_name`, `slot` (hot-remove; the TAP is closed, not deleted) |
//!
//! Other commands (e.g. migration) plug in as [`Extension`]s, tried in order for any `cmd`
//! the built-in set does not know.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::vm::{Vm, VmStatus};

/// Longest request line.
pub const REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// Longest response line a client accepts.
pub const RESPONSE_BYTES_MAX: u64 = 16 << 20;
/// Concurrent control connections.
pub const CONNECTIONS_MAX: usize = 16;
/// Default console tail.
pub const CONSOLE_TAIL_BYTES_DEFAULT: usize = 64 * 1024;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Socket I/O.
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Response is not JSON.
    #[error("control response is not valid JSON")]
    BadResponse(#[source] serde_json::Error),
    /// The response line exceeded [`RESPONSE_BYTES_MAX`] or the server closed early.
    #[error("control response missing or longer than {RESPONSE_BYTES_MAX} bytes")]
    ResponseTooLong,
}

/// Built-in requests.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // Empty struct variants (not unit variants) so that unknown fields are rejected.
    Status {},
    Pause {},
    Resume {},
    Stop {},
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        resume: bool,
    },
    Console {
        #[serde(default)]
        tail_bytes: Option<usize>,
        #[serde(default)]
        stream: bool,
    },
    AttachDisk {
        slot: u8,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    DetachDisk {
        slot: u8,
    },
    AttachNic(crate::config::NicConfig),
    DetachNic {
        mac: String,
    },
}

/// A handler for extra commands: returns `None` if it does not know `request["cmd"]`.
pub type Extension = Arc<dyn Fn(&Value, &Arc<Vm>) -> Option<Value> + Send + Sync>;

fn ok(v: Value) -> Value {
    let mut v = if v.is_object() { v } else { json!({}) };
    v["ok"] = json!(true);
    v
}

/// Response for an error: `{"ok":false,"error":"<chain>"}`.
pub fn error_response(e: &dyn std::error::Error) -> Value {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    json!({"ok": false, "error": msg})
}

fn handle(vm: &Arc<Vm>, req: Request) -> Value {
    let r = match req {
        Request::Status {} => {
            return ok(json!({
                "status": vm.status(),
                "config": vm.current_config(),
                "tsc_khz": vm.tsc_khz(),
                "console_bytes": vm.console().total_bytes(),
            }))
        }
        Request::Pause {} => vm.pause().map(|()| json!({})),
        Request::Resume {} => vm.resume().map(|()| json!({})),
        Request::Stop {} => vm.stop().map(|()| json!({})),
        Request::AttachDisk {
            slot,
            path,
            read_only,
        } => vm
            .attach_disk(&crate::config::DiskSlotConfig {
                slot,
                path,
                read_only,
            })
            .map(|()| json!({})),
        Request::DetachDisk { slot } => vm.detach_disk(slot).map(|()| json!({})),
        Request::AttachNic(nic) => vm.attach_nic(&nic).map(|slot| json!({ "slot": slot })),
        Request::DetachNic { mac } => vm
            .detach_nic(&mac)
            .map(|n| json!({ "tap_name": n.tap_name, "slot": n.slot })),
        Request::Snapshot { dir, resume } => {
            let r = (|| {
                vm.pause()?;
                let st = crate::snapshot::save(vm, &dir)?;
                if resume {
                    vm.resume()?;
                }
                Ok::<_, crate::snapshot::SnapshotError>(json!({
                    "state_bytes": st.state_bytes,
                    "memory_bytes": st.memory_bytes,
                    "total_ms": st.total_ms,
                }))
            })();
            return match r {
                Ok(v) => ok(v),
                Err(e) => error_response(&e),
            };
        }
        Request::Console { tail_bytes, .. } => {
            let log = vm.console().log();
            let n = tail_bytes
                .unwrap_or(CONSOLE_TAIL_BYTES_DEFAULT)
                .min(log.len());
            return ok(json!({"text": String::from_utf8_lossy(&log[log.len() - n..])}));
        }
    };
    match r {
        Ok(v) => ok(v),
        Err(e) => error_response(&e),
    }
}

fn write_line(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    stream.write_all(s.as_bytes())
}

fn serve_connection(
    stream: UnixStream,
    vm: Arc<Vm>,
    extensions: &[Extension],
    busy: &AtomicUsize,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take(REQUEST_BYTES_MAX + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > REQUEST_BYTES_MAX {
            write_line(
                &mut writer,
                &json!({"ok": false, "error": format!("request longer than {REQUEST_BYTES_MAX} bytes")}),
            )?;
            return Ok(());
        }
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                write_line(&mut writer, &error_response(&e))?;
                continue;
            }
        };
        let stream_console = matches!(
            serde_json::from_value::<Request>(value.clone()),
            Ok(Request::Console { stream: true, .. })
        );
        busy.fetch_add(1, Ordering::SeqCst);
        let response = match serde_json::from_value::<Request>(value.clone()) {
            Ok(req) => handle(&vm, req),
            Err(e) => extensions
                .iter()
                .find_map(|x| x(&value, &vm))
                .unwrap_or_else(|| error_response(&e)),
        };
        let written = write_line(&mut writer, &response);
        busy.fetch_sub(1, Ordering::SeqCst);
        written?;
        if stream_console {
            let rx = vm.console().subscribe();
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(l) => write_line(&mut writer, &json!({ "line": l }))?,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if matches!(vm.status(), VmStatus::Stopped { .. }) {
                            return Ok(());
                        }
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}

/// A running control socket server.
pub struct ControlServer {
    busy: Arc<AtomicUsize>,
}

impl ControlServer {
    /// Wait (at most `timeout`) until no request is being handled, so that a process that
    /// is about to exit (e.g. after `stop`) still delivers the response.
    pub fn wait_idle(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.busy.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Serve the control socket at `path` for `vm` on a background thread (one thread per
/// connection, at most [`CONNECTIONS_MAX`]).
pub fn serve(
    path: &Path,
    vm: Arc<Vm>,
    extensions: Vec<Extension>,
) -> Result<ControlServer, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io)?;
    let extensions = Arc::new(extensions);
    let active = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let server = ControlServer { busy: busy.clone() };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let _ = write_line(
                        &mut conn,
                        &json!({"ok": false, "error": "too many control connections"}),
                    );
                    continue;
                }
                let vm = vm.clone();
                let ext = extensions.clone();
                let active = active.clone();
                let busy = busy.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(conn, vm, &ext, &busy) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
            }
        })
        .map_err(io)?;
    Ok(server)
}

/// Send one request and read one response line.
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(s).take(RESPONSE_BYTES_MAX);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(io)?;
    if !resp.ends_with('\n') {
        return Err(ControlError::ResponseTooLong);
    }
    serde_json::from_str(&resp).map_err(ControlError::BadResponse)
}
