//! One migration connection, TLS or plaintext: [`Conn`].
//!
//! A `Conn` is a cheap handle (clones share the connection) so one thread can read
//! while another writes, as the target's control connection needs. Over TLS the rustls
//! state sits behind a mutex that is never held while waiting for the network: a reader
//! reads socket bytes into its own buffer (up to [`RX_BUFFER_BYTES`] per system call)
//! outside that lock, then takes it only to feed and decrypt what arrived; a writer
//! encrypts and writes under the lock.
//!
//! Once the handshake is done, the record layer is this crate's own
//! ([`super::record`]) when the TLS configuration allows secret extraction (the
//! configurations of [`super::tls::MigrationTls`] do): rustls still does the handshake and
//! every certificate check, then hands over the traffic keys, and a reader and a writer
//! each protect their own direction without sharing a lock. Otherwise rustls' record
//! layer carries the data, as described above. The bytes on the wire are the same either
//! way, so the two kinds of ends work together.
//!
//! Reads honour two limits: the idle read timeout ([`Conn::set_read_timeout`]) and a
//! whole-frame deadline ([`Conn::set_deadline`]) that no number of slow reads can extend.
//! Handshakes run under one deadline too, so a peer that sends one byte a second holds a
//! connection for at most that long.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::protocol::{read_frame, Frame, ProtocolError, MAGIC};
use super::record::{
    Opened, Opener, RecordError, Sealer, HEADER_BYTES, MAX_PLAINTEXT_BYTES, RECORD_STRIDE_BYTES,
    SEAL_BATCH_BYTES,
};
use super::tls::Transport;

/// Plaintext bytes rustls may buffer per connection before a writer drains them.
const TLS_BUFFER_BYTES: usize = 256 << 10;
/// Encrypted bytes a TLS reader takes from the socket at once.
pub const RX_BUFFER_BYTES: usize = 256 << 10;

/// Errors of opening a connection (TCP and the TLS handshake).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("TCP connection")]
    Io(#[source] io::Error),
    #[error("TLS handshake")]
    Tls(#[source] rustls::Error),
    #[error("TLS handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the peer closed the connection during the TLS handshake")]
    HandshakeClosed,
    #[error(
        "the peer speaks the migration protocol in plaintext, but this node requires TLS \
         on its migration network"
    )]
    PlaintextPeer,
    #[error("taking over the TLS record layer after the handshake")]
    Records(#[source] RecordError),
}

/// Which code protects a TLS connection's records after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLayer {
    /// rustls' own (buffered) record layer.
    Rustls,
    /// This crate's ([`super::record`]), with the keys rustls negotiated.
    Direct,
}

struct Inner {
    tcp: TcpStream,
    tls: Option<Tls>,
    peer_cert: Option<Vec<u8>>,
    limits: Mutex<Limits>,
}

/// The read limits of a connection.
struct Limits {
    idle: Option<Duration>,
    deadline: Option<Instant>,
    /// The socket's read timeout as last set (saves a system call per read).
    armed: Option<Option<Duration>>,
}

enum Tls {
    Rustls(RustlsIo),
    Direct(DirectIo),
}

/// The direct record layer: each direction has its own lock.
struct DirectIo {
    tx: Mutex<DirectTx>,
    rx: Mutex<DirectRx>,
}

struct DirectTx {
    sealer: Sealer,
    /// Records sealed and not yet written (reused between writes).
    out: Vec<u8>,
    /// A write failed part way: the record stream is cut, nothing more may be sent.
    broken: bool,
}

struct DirectRx {
    opener: Opener,
    /// Bytes read from the socket: `buf[start..end]` not opened yet; `plain` decrypted
    /// application data not yet read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: std::ops::Range<usize>,
    /// The peer's close_notify arrived.
    closed: bool,
    /// The socket reached its end.
    eof: bool,
}

impl DirectRx {
    /// A whole record (or the end) is buffered: opening it does not wait for the socket.
    fn has_record(&self) -> bool {
        let b = &self.buf[self.start..self.end];
        b.len() >= HEADER_BYTES
            && b.len() >= HEADER_BYTES + usize::from(u16::from_be_bytes([b[3], b[4]]))
    }

    /// Opens the next buffered record: its data becomes `plain`, or a close_notify marks
    /// the stream `closed`. `Some(need)` when only part of it is buffered (`need` bytes
    /// in all): the caller reads more from the socket.
    fn open_next(&mut self) -> io::Result<Option<usize>> {
        let opened = self
            .opener
            .open(&mut self.buf[self.start..self.end])
            .map_err(|e: RecordError| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match opened {
            Opened::Data { used, plain } => {
                self.plain = self.start + plain.start..self.start + plain.end;
                self.start += used;
                Ok(None)
            }
            Opened::Closed { used } => {
                self.start += used;
                self.closed = true;
                Ok(None)
            }
            Opened::Partial { need } => Ok(Some(need)),
        }
    }
}

struct RustlsIo {
    conn: Mutex<rustls::Connection>,
    /// Encrypted bytes read from the socket and not yet given to rustls; only the reading
    /// thread takes this lock (before `conn`), writers never do.
    rx: Mutex<RxBuf>,
}

struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

/// A migration connection (see the module docs). Clones share it.
#[derive(Clone)]
pub struct Conn(Arc<Inner>);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.0.tcp.peer_addr().ok())
            .field("tls", &self.0.tls.is_some())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DirectIo {
    /// The sending side, refused once a write on it failed (a record may have left
    /// half-written, and the peer would reject every record after it).
    fn writable_tx(&self) -> io::Result<MutexGuard<'_, DirectTx>> {
        let tx = lock(&self.tx);
        if tx.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this TLS connection failed",
            ));
        }
        Ok(tx)
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} deadline passed"))
}

/// Socket read timeout for the time left until `deadline` (at least 1 ms: 0 means none).
fn remaining(deadline: Instant, what: &str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out(what));
    }
    Ok(left.max(Duration::from_millis(1)))
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(tcp: TcpStream) -> Conn {
        Self::new(tcp, None, None)
    }

    /// A TLS connection whose handshake is done: takes the record layer over when `direct`
    /// (the handshake read no byte beyond its last record, see [`RecordReader`]).
    fn tls(tcp: TcpStream, c: rustls::Connection, direct: bool) -> Result<Conn, ConnError> {
        let peer = peer_leaf(&c);
        tcp.set_read_timeout(None).map_err(ConnError::Io)?;
        tcp.set_write_timeout(None).map_err(ConnError::Io)?;
        let tls = if direct && c.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            let s = c.dangerous_extract_secrets().map_err(ConnError::Tls)?;
            let sealer = Sealer::new(s.tx.0, &s.tx.1).map_err(ConnError::Records)?;
            let opener = Opener::new(s.rx.0, &s.rx.1).map_err(ConnError::Records)?;
            Tls::Direct(DirectIo {
                tx: Mutex::new(DirectTx {
                    sealer,
                    out: Vec::new(),
                    broken: false,
                }),
                rx: Mutex::new(DirectRx {
                    opener,
                    buf: Vec::new(),
                    start: 0,
                    end: 0,
                    plain: 0..0,
                    closed: false,
                    eof: false,
                }),
            })
        } else {
            Tls::Rustls(RustlsIo {
                conn: Mutex::new(c),
                rx: Mutex::new(RxBuf {
                    buf: Vec::new(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
            })
        };
        Ok(Conn::new(tcp, Some(tls), peer))
    }

    /// Which record layer carries this connection's data (`None`: plaintext).
    pub fn record_layer(&self) -> Option<RecordLayer> {
        self.0.tls.as_ref().map(|t| match t {
            Tls::Rustls(_) => RecordLayer::Rustls,
            Tls::Direct(_) => RecordLayer::Direct,
        })
    }

    fn new(tcp: TcpStream, tls: Option<Tls>, peer_cert: Option<Vec<u8>>) -> Conn {
        let idle = tcp.read_timeout().ok().flatten();
        Conn(Arc::new(Inner {
            tcp,
            tls,
            peer_cert,
            limits: Mutex::new(Limits {
                idle,
                deadline: None,
                armed: None,
            }),
        }))
    }

    /// Opens a connection to `target` (leaving from `source` when given) and, over TLS,
    /// completes the handshake within `handshake_timeout`, verifying the target's
    /// certificate against the CA and `target`'s IP address.
    pub fn connect(
        transport: &Transport,
        source: Option<IpAddr>,
        target: SocketAddr,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<Conn, ConnError> {
        let tcp = connect_from(source, target, connect_timeout).map_err(ConnError::Io)?;
        tcp.set_nodelay(true).map_err(ConnError::Io)?;
        match transport {
            Transport::Plaintext => Ok(Conn::plain(tcp)),
            Transport::Tls(tls) => {
                let name = ServerName::IpAddress(target.ip().into());
                let mut c = rustls::ClientConnection::new(tls.client.clone(), name)
                    .map_err(ConnError::Tls)?;
                c.set_buffer_limit(Some(TLS_BUFFER_BYTES));
                let deadline = Instant::now() + handshake_timeout;
                let c = handshake(&tcp, c.into(), deadline, handshake_timeout)?;
                Conn::tls(tcp, c, tls.client.enable_secret_extraction)
            }
        }
    }

    /// Completes the server side of an accepted connection within `deadline`. A peer whose
    /// first byte is the migration protocol's magic speaks plaintext: over TLS it is
    /// answered with a plaintext Refuse naming the reason, then [`ConnError::PlaintextPeer`].
    pub fn accept(
        tcp: TcpStream,
        transport: &Transport,
        deadline: Instant,
    ) -> Result<Conn, ConnError> {
        tcp.set_nodelay(true).map_err(ConnError::Io)?;
        let Transport::Tls(tls) = transport else {
            return Ok(Conn::plain(tcp));
        };
        let total = deadline.saturating_duration_since(Instant::now());
        let mut first = [0u8; 1];
        tcp.set_read_timeout(Some(
            remaining(deadline, "handshake").map_err(|_| ConnError::HandshakeTimeout(total))?,
        ))
        .map_err(ConnError::Io)?;
        match tcp.peek(&mut first) {
            Ok(0) => return Err(ConnError::HandshakeClosed),
            Ok(_) if first[0] == MAGIC[0] => {
                let mut w = &tcp;
                let _ = tcp.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = super::protocol::write_refuse(
                    &mut w,
                    "this node requires TLS on its migration network (migration protocol \
                     version 2 with mutual TLS); this source speaks plaintext",
                );
                return Err(ConnError::PlaintextPeer);
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(ConnError::HandshakeTimeout(total)),
            Err(e) => return Err(ConnError::Io(e)),
        }
        let mut c = rustls::ServerConnection::new(tls.server.clone()).map_err(ConnError::Tls)?;
        c.set_buffer_limit(Some(TLS_BUFFER_BYTES));
        let c = handshake(&tcp, c.into(), deadline, total)?;
        Conn::tls(tcp, c, tls.server.enable_secret_extraction)
    }

    /// The peer's leaf certificate (DER), over TLS.
    pub fn peer_cert(&self) -> Option<&[u8]> {
        self.0.peer_cert.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.0.tls.is_some()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.tcp.peer_addr()
    }

    /// Idle timeout of each wait for bytes (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        lock(&self.0.limits).idle = t;
        Ok(())
    }

    pub fn read_timeout(&self) -> Option<Duration> {
        lock(&self.0.limits).idle
    }

    /// A deadline no read may pass, however slowly bytes trickle in (`None`: none).
    pub fn set_deadline(&self, d: Option<Instant>) {
        lock(&self.0.limits).deadline = d;
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.tcp.set_write_timeout(t)
    }

    /// Shuts the socket down: blocked reads and writes of every clone return.
    pub fn shutdown(&self) {
        let _ = self.0.tcp.shutdown(Shutdown::Both);
    }

    /// Arms the socket's read timeout for the next wait from the idle timeout and the
    /// deadline.
    fn arm(&self) -> io::Result<()> {
        let mut l = lock(&self.0.limits);
        let t = match l.deadline {
            Some(d) => {
                let left = remaining(d, "frame")?;
                Some(l.idle.map_or(left, |i| i.min(left)))
            }
            None => l.idle,
        };
        if l.armed != Some(t) {
            self.0.tcp.set_read_timeout(t)?;
            l.armed = Some(t);
        }
        Ok(())
    }

    /// Waits until a read would not block (bytes or end of stream), within the limits.
    pub fn wait_readable(&self) -> io::Result<()> {
        if let Some(Tls::Direct(d)) = &self.0.tls {
            let rx = lock(&d.rx);
            if !rx.plain.is_empty() || rx.closed || rx.eof || rx.has_record() {
                return Ok(());
            }
        }
        if let Some(Tls::Rustls(tls)) = &self.0.tls {
            let rx = lock(&tls.rx);
            if rx.start < rx.end || rx.eof {
                return Ok(());
            }
            let mut c = lock(&tls.conn);
            let st = c
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if st.plaintext_bytes_to_read() > 0 || st.peer_has_closed() {
                return Ok(());
            }
        }
        self.arm()?;
        self.0.tcp.peek(&mut [0u8; 1]).map(|_| ())
    }

    /// Reads one frame that must arrive whole within `timeout` of its first byte (the
    /// wait for the first byte follows the idle read timeout).
    pub fn read_frame_within(&mut self, timeout: Duration) -> Result<Frame, ProtocolError> {
        self.wait_readable()?;
        self.set_deadline(Some(Instant::now() + timeout));
        let r = read_frame(self);
        self.set_deadline(None);
        r
    }

    /// Reads over the direct record layer: as much decrypted data as `buf` takes from the
    /// records already buffered, waiting for the socket only when none is.
    fn read_direct(&self, d: &DirectIo, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&d.rx);
        let rx = &mut *rx;
        let mut got = 0;
        loop {
            if !rx.plain.is_empty() {
                let n = rx.plain.len().min(buf.len() - got);
                buf[got..got + n].copy_from_slice(&rx.buf[rx.plain.start..rx.plain.start + n]);
                rx.plain.start += n;
                got += n;
                if got == buf.len() {
                    return Ok(got);
                }
            }
            if rx.closed {
                return Ok(got);
            }
            if let Some(need) = rx.open_next()? {
                if got > 0 {
                    return Ok(got);
                }
                self.fill_direct(rx, need)?;
            }
        }
    }

    /// Reads more socket bytes after the partial record at `rx.buf[rx.start..rx.end]`
    /// (moved to the front first), which needs `need` bytes in total.
    fn fill_direct(&self, rx: &mut DirectRx, need: usize) -> io::Result<()> {
        if rx.eof {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        rx.buf.copy_within(rx.start..rx.end, 0);
        rx.end -= rx.start;
        rx.start = 0;
        rx.plain = 0..0;
        let want = need.max(RX_BUFFER_BYTES);
        if rx.buf.len() < want {
            rx.buf.resize(want, 0);
        }
        self.arm()?;
        let n = (&self.0.tcp).read(&mut rx.buf[rx.end..])?;
        rx.end += n;
        rx.eof = n == 0;
        Ok(())
    }

    /// Reads exactly `len` bytes and hands them to `f` in order, in pieces of any size,
    /// stopping at `f`'s first error (the inner result). Over the engine's record layer
    /// the pieces are the decrypted records where they were decrypted, in the
    /// connection's receive buffer: no copy. Otherwise they are read into `scratch` (at
    /// least one byte long) first.
    pub fn read_exact_with<E>(
        &self,
        len: usize,
        scratch: &mut [u8],
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> io::Result<Result<(), E>> {
        if let Some(Tls::Direct(d)) = &self.0.tls {
            return self.read_direct_with(d, len, f);
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(scratch.len());
            match (&*self).read(&mut scratch[..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    left -= n;
                    if let Err(e) = f(&scratch[..n]) {
                        return Ok(Err(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Ok(()))
    }

    fn read_direct_with<E>(
        &self,
        d: &DirectIo,
        len: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> io::Result<Result<(), E>> {
        let mut rx = lock(&d.rx);
        let rx = &mut *rx;
        let mut left = len;
        while left > 0 {
            if !rx.plain.is_empty() {
                let n = rx.plain.len().min(left);
                let at = rx.plain.start;
                rx.plain.start += n;
                left -= n;
                if let Err(e) = f(&rx.buf[at..at + n]) {
                    return Ok(Err(e));
                }
                continue;
            }
            if rx.closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if let Some(need) = rx.open_next()? {
                self.fill_direct(rx, need)?;
            }
        }
        Ok(Ok(()))
    }

    fn write_direct(&self, d: &DirectIo, buf: &[u8]) -> io::Result<usize> {
        let mut tx = d.writable_tx()?;
        let tx = &mut *tx;
        let n = buf.len().min(SEAL_BATCH_BYTES);
        tx.out.clear();
        tx.sealer
            .seal(&buf[..n], &mut tx.out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if let Err(e) = (&self.0.tcp).write_all(&tx.out) {
            tx.broken = true;
            return Err(e);
        }
        Ok(n)
    }

    /// Whether [`Conn::send_sealed_in_place`] can take this connection's data: over the
    /// engine's record layer only.
    pub fn seals_in_place(&self) -> bool {
        matches!(self.0.tls, Some(Tls::Direct(_)))
    }

    /// Sends `head`, then the `plain` bytes of plaintext laid out in `body` for in-place
    /// sealing ([`super::record::sealed_offset`]), as TLS records: `head` is sealed into
    /// the connection's buffer, `body` in place, [`SEAL_BATCH_BYTES`] at a time. `send`
    /// writes each run of sealed records to the socket it is given (e.g. paced); an error
    /// or an inner `Err` from it stops the sending, and the connection sends nothing more
    /// (its record stream is cut). No other write on this connection comes in between.
    pub fn send_sealed_in_place<E>(
        &self,
        head: &[u8],
        body: &mut [u8],
        plain: usize,
        mut send: impl FnMut(&mut &TcpStream, &[u8]) -> io::Result<Result<(), E>>,
    ) -> io::Result<Result<(), E>> {
        let Some(Tls::Direct(d)) = &self.0.tls else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "in-place sealing needs the engine's TLS record layer",
            ));
        };
        let invalid = |e: RecordError| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut tx = d.writable_tx()?;
        let tx = &mut *tx;
        // Cut until every record is written; restored at the end.
        tx.broken = true;
        let mut w = &self.0.tcp;
        tx.out.clear();
        tx.sealer.seal(head, &mut tx.out).map_err(invalid)?;
        if let Err(e) = send(&mut w, &tx.out)? {
            return Ok(Err(e));
        }
        let per_batch = SEAL_BATCH_BYTES / MAX_PLAINTEXT_BYTES;
        let mut at = 0;
        while at < plain {
            let n = (plain - at).min(per_batch * MAX_PLAINTEXT_BYTES);
            let from = at / MAX_PLAINTEXT_BYTES * RECORD_STRIDE_BYTES;
            let buf = body.get_mut(from..).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "body shorter than its records")
            })?;
            let len = tx.sealer.seal_in_place(buf, n).map_err(invalid)?;
            if let Err(e) = send(&mut w, &buf[..len])? {
                return Ok(Err(e));
            }
            at += n;
        }
        tx.broken = false;
        Ok(Ok(()))
    }

    fn read_tls(&self, tls: &RustlsIo, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&tls.rx);
        loop {
            {
                let mut c = lock(&tls.conn);
                match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return other,
                }
                // Nothing decrypted is waiting: feed what the socket gave.
                if rx.start < rx.end || rx.eof {
                    let RxBuf {
                        buf: b, start, end, ..
                    } = &mut *rx;
                    let n = if *start < *end {
                        c.read_tls(&mut &b[*start..*end])?
                    } else {
                        c.read_tls(&mut io::empty())?
                    };
                    *start += n;
                    if n == 0 {
                        *start = *end; // close_notify received: the rest is ignored
                    }
                    let st = c.process_new_packets().map_err(|e| {
                        let _ = c.write_tls(&mut &self.0.tcp); // the alert, best effort
                        io::Error::new(io::ErrorKind::InvalidData, e)
                    })?;
                    while c.wants_write() {
                        c.write_tls(&mut &self.0.tcp)?;
                    }
                    if rx.eof && rx.start == rx.end && st.plaintext_bytes_to_read() == 0 {
                        return match c.reader().read(buf) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                Err(io::ErrorKind::UnexpectedEof.into())
                            }
                            other => other,
                        };
                    }
                    continue;
                }
            }
            // Wait for bytes without holding the connection's lock.
            self.arm()?;
            if rx.buf.len() < RX_BUFFER_BYTES {
                rx.buf.resize(RX_BUFFER_BYTES, 0);
            }
            let n = (&self.0.tcp).read(&mut rx.buf)?;
            rx.start = 0;
            rx.end = n;
            rx.eof = n == 0;
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// After a failed write: the alert the peer sent before closing, if any (e.g. it refused
/// this node's certificate), which explains the failure better than a broken pipe.
fn peer_alert(c: &mut rustls::Connection, tcp: &TcpStream) -> Option<io::Error> {
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(100)));
    c.read_tls(&mut &*tcp).ok()?;
    c.process_new_packets()
        .err()
        .map(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn peer_leaf(c: &rustls::Connection) -> Option<Vec<u8>> {
    c.peer_certificates()
        .and_then(|v| v.first())
        .map(|c| c.to_vec())
}

/// Drives a handshake to its end within `deadline`.
fn handshake(
    tcp: &TcpStream,
    mut c: rustls::Connection,
    deadline: Instant,
    total: Duration,
) -> Result<rustls::Connection, ConnError> {
    let timeout = |e: io::Error| {
        if is_timeout(&e) {
            ConnError::HandshakeTimeout(total)
        } else {
            ConnError::Io(e)
        }
    };
    let left = || remaining(deadline, "handshake").map_err(|_| ConnError::HandshakeTimeout(total));
    let mut reader = RecordReader::new(tcp);
    loop {
        while c.wants_write() {
            tcp.set_write_timeout(Some(left()?))
                .map_err(ConnError::Io)?;
            c.write_tls(&mut &*tcp).map_err(timeout)?;
        }
        if !c.is_handshaking() {
            return Ok(c);
        }
        tcp.set_read_timeout(Some(left()?)).map_err(ConnError::Io)?;
        if c.read_tls(&mut reader).map_err(timeout)? == 0 {
            return Err(ConnError::HandshakeClosed);
        }
        if let Err(e) = c.process_new_packets() {
            // Send the alert so the peer learns why, best effort, and close gently: bytes
            // of the peer left unread would turn the close into a reset that can destroy
            // the alert before the peer reads it.
            let _ = tcp.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = c.write_tls(&mut &*tcp);
            let _ = tcp.shutdown(Shutdown::Write);
            let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = io::copy(&mut tcp.take(64 << 10), &mut io::sink());
            return Err(ConnError::Tls(e));
        }
    }
}

/// Reads a socket for a handshake one TLS record at a time, never past the end of the
/// record it is in: when the handshake is done, the peer's first application data (sent
/// right after its Finished) is still in the socket, for whichever record layer takes over.
struct RecordReader<'a> {
    tcp: &'a TcpStream,
    header: [u8; HEADER_BYTES],
    /// Header bytes read of the next record.
    header_read: usize,
    /// Body bytes of the current record not read yet.
    body_left: usize,
}

impl<'a> RecordReader<'a> {
    fn new(tcp: &'a TcpStream) -> Self {
        RecordReader {
            tcp,
            header: [0; HEADER_BYTES],
            header_read: 0,
            body_left: 0,
        }
    }
}

impl Read for RecordReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.body_left == 0 {
            let want = (HEADER_BYTES - self.header_read).min(buf.len());
            let at = self.header_read;
            let n = self.tcp.read(&mut self.header[at..at + want])?;
            buf[..n].copy_from_slice(&self.header[at..at + n]);
            self.header_read += n;
            if self.header_read == HEADER_BYTES {
                self.header_read = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
            return Ok(n);
        }
        let want = self.body_left.min(buf.len());
        let n = self.tcp.read(&mut buf[..want])?;
        self.body_left -= n;
        Ok(n)
    }
}

/// A TCP connection to `target` within `timeout`, leaving from `source` (any port) when
/// given, else from the address the kernel picks.
pub fn connect_from(
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect_timeout(&target, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.0.tls {
            Some(Tls::Rustls(tls)) => self.read_tls(tls, buf),
            Some(Tls::Direct(d)) => self.read_direct(d, buf),
            None => {
                self.arm()?;
                (&self.0.tcp).read(buf)
            }
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tls = match &self.0.tls {
            None => return (&self.0.tcp).write(buf),
            Some(Tls::Direct(d)) => return self.write_direct(d, buf),
            Some(Tls::Rustls(tls)) => tls,
        };
        let mut c = lock(&tls.conn);
        let n = c.writer().write(buf)?;
        while c.wants_write() {
            if let Err(e) = c.write_tls(&mut &self.0.tcp) {
                return Err(peer_alert(&mut c, &self.0.tcp).unwrap_or(e));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.0.tls.is_none() {
            (&self.0.tcp).flush()?;
        }
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::test_pki::TestCa;
    use crate::migration::tls::MigrationTls;
    use std::net::{TcpListener, TcpStream};

    fn tls() -> MigrationTls {
        let ca = TestCa::new("conn tests CA");
        let node = ca.node("conn-node", &["127.0.2.1".parse().unwrap()]);
        MigrationTls::from_pem(
            ca.ca_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .unwrap()
    }

    /// A connected (client, server) pair; the client writes `first` right after its
    /// handshake, before the server has finished reading its own.
    fn pair(client: &MigrationTls, server: &MigrationTls, first: &[u8]) -> (Conn, Conn) {
        let l = TcpListener::bind("127.0.2.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = Transport::Tls(server.clone());
        let s = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            Conn::accept(l.accept().unwrap().0, &server, deadline).unwrap()
        });
        let t = Duration::from_secs(10);
        let mut c = Conn::connect(&Transport::Tls(client.clone()), None, addr, t, t).unwrap();
        c.write_all(first).unwrap();
        (c, s.join().unwrap())
    }

    /// Sends `data` one way and `back` the other at the same time; returns what arrived.
    fn exchange(a: &Conn, b: &Conn, data: &[u8], back: &[u8]) -> (Vec<u8>, Vec<u8>) {
        std::thread::scope(|s| {
            let (a2, b2) = (a.clone(), b.clone());
            let w1 = s.spawn(move || (&a2).write_all(data).unwrap());
            let w2 = s.spawn(move || (&b2).write_all(back).unwrap());
            let mut got_b = vec![0u8; data.len()];
            (&b.clone()).read_exact(&mut got_b).unwrap();
            let mut got_a = vec![0u8; back.len()];
            (&a.clone()).read_exact(&mut got_a).unwrap();
            w1.join().unwrap();
            w2.join().unwrap();
            (got_b, got_a)
        })
    }

    #[test]
    fn direct_and_rustls_record_layers_interoperate_both_ways() {
        let direct = tls();
        let rustls_records = direct.with_rustls_records();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let back: Vec<u8> = (0..70_001u32).map(|i| (i ^ 0x5a) as u8).collect();
        for (client, server, layers) in [
            (&direct, &direct, (RecordLayer::Direct, RecordLayer::Direct)),
            (
                &direct,
                &rustls_records,
                (RecordLayer::Direct, RecordLayer::Rustls),
            ),
            (
                &rustls_records,
                &direct,
                (RecordLayer::Rustls, RecordLayer::Direct),
            ),
        ] {
            let (c, s) = pair(client, server, b"first bytes after the handshake");
            assert_eq!(
                (c.record_layer(), s.record_layer()),
                (Some(layers.0), Some(layers.1))
            );
            let mut first = [0u8; 31];
            (&s).read_exact(&mut first).unwrap();
            assert_eq!(&first, b"first bytes after the handshake");
            let (got, got_back) = exchange(&c, &s, &data, &back);
            assert!(got == data && got_back == back, "{layers:?}");
            // The peer's end without close_notify is an unexpected end, as with rustls.
            drop(c);
            let mut b = [0u8; 1];
            let e = (&s).read(&mut b).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{layers:?}");
        }
    }

    /// `len` bytes read with [`Conn::read_exact_with`]: (the bytes, the pieces' count).
    fn read_pieces(c: &Conn, len: usize) -> (Vec<u8>, usize) {
        let mut got = Vec::new();
        let mut pieces = 0;
        let r: Result<(), ()> = c
            .read_exact_with(len, &mut [0u8; 7000], |p| {
                got.extend_from_slice(p);
                pieces += 1;
                Ok(())
            })
            .unwrap();
        r.unwrap();
        (got, pieces)
    }

    /// Data sealed in place reaches both kinds of reader; [`Conn::read_exact_with`] reads
    /// records of any size from both kinds of writer, and stops at its consumer's error.
    #[test]
    fn in_place_sealing_and_piecewise_reads_work_with_both_record_layers() {
        use crate::migration::record::{sealed_len, sealed_offset};
        let direct = tls();
        let rustls_records = direct.with_rustls_records();
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 13 + i / 511) as u8).collect();
        let mut laid_out = vec![0u8; sealed_len(data.len())];
        for (i, b) in data.iter().enumerate() {
            laid_out[sealed_offset(i)] = *b;
        }
        for (client, server) in [(&direct, &direct), (&direct, &rustls_records)] {
            let (c, s) = pair(client, server, b"");
            assert!(c.seals_in_place());
            let mut body = laid_out.clone();
            let writes = std::cell::Cell::new(0);
            let r: Result<(), ()> = c
                .send_sealed_in_place(b"head", &mut body, data.len(), |w, records| {
                    writes.set(writes.get() + 1);
                    w.write_all(records).map(Ok)
                })
                .unwrap();
            r.unwrap();
            // The head, then the body SEAL_BATCH_BYTES of plaintext at a time.
            assert_eq!(writes.get(), 1 + data.len().div_ceil(SEAL_BATCH_BYTES));
            let mut head = [0u8; 4];
            (&s).read_exact(&mut head).unwrap();
            assert_eq!(&head, b"head");
            let (got, _) = read_pieces(&s, data.len());
            assert!(got == data, "{:?}", s.record_layer());
            // The stream goes on after the in-place records.
            (&c).write_all(b"more").unwrap();
            let (got, _) = read_pieces(&s, 4);
            assert_eq!(got, b"more");
        }
        // rustls' writer in 10,007-byte writes: records that do not fall on 4 KiB.
        for server in [&direct, &rustls_records] {
            let (c, s) = pair(&rustls_records, server, b"");
            assert!(!c.seals_in_place());
            let w = std::thread::spawn({
                let (c, data) = (c.clone(), data.clone());
                move || {
                    for chunk in data.chunks(10_007) {
                        (&c).write_all(chunk).unwrap();
                    }
                }
            });
            let (got, pieces) = read_pieces(&s, data.len());
            w.join().unwrap();
            assert!(got == data);
            assert!(pieces >= data.len() / 16_384, "{pieces} pieces");
        }
        // The consumer's error stops the read and is returned as it is.
        let (c, s) = pair(&direct, &direct, b"");
        (&c).write_all(&data).unwrap();
        let mut seen = 0;
        let r = s
            .read_exact_with(data.len(), &mut [0u8; 16], |p| {
                seen += p.len();
                if seen > 20_000 {
                    Err("enough")
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(r, Err("enough"));
        assert!(seen < data.len());
        // A plaintext connection has no in-place sealing: refused, nothing sent.
        let l = TcpListener::bind("127.0.2.1:0").unwrap();
        let plain = Conn::plain(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let e = plain
            .send_sealed_in_place(b"x", &mut [0u8; 64], 1, |_, _| Ok(Ok::<(), ()>(())))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn a_corrupted_record_is_an_error_not_data() {
        let direct = tls();
        let (c, s) = pair(&direct, &direct, b"");
        // A forged record in the stream (right header, wrong key).
        let mut forged = vec![23u8, 3, 3, 0, 40];
        forged.extend_from_slice(&[0x42; 40]);
        (&c.0.tcp).write_all(&forged).unwrap();
        let mut b = [0u8; 8];
        let e = (&s).read(&mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("authentication"), "{e}");
    }
}
