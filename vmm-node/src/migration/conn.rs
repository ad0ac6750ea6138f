//! One migration connection, TLS or plaintext: [`Conn`].
//!
//! A `Conn` is a cheap handle (clones share the connection) so one thread can read
//! while another writes, as the target's control connection needs. Over TLS the rustls
//! state sits behind a mutex that is never held while waiting for the network: a reader
//! reads socket bytes into its own buffer (up to [`RX_BUFFER_BYTES`] per system call)
//! outside that lock, then takes it only to feed and decrypt what arrived; a writer
//! encrypts and writes under the lock.
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

struct Tls {
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

    fn new(tcp: TcpStream, tls: Option<rustls::Connection>, peer_cert: Option<Vec<u8>>) -> Conn {
        let idle = tcp.read_timeout().ok().flatten();
        let tls = tls.map(|conn| Tls {
            conn: Mutex::new(conn),
            rx: Mutex::new(RxBuf {
                buf: Vec::new(),
                start: 0,
                end: 0,
                eof: false,
            }),
        });
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
                let peer = peer_leaf(&c);
                tcp.set_read_timeout(None).map_err(ConnError::Io)?;
                tcp.set_write_timeout(None).map_err(ConnError::Io)?;
                Ok(Conn::new(tcp, Some(c), peer))
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
        let peer = peer_leaf(&c);
        tcp.set_read_timeout(None).map_err(ConnError::Io)?;
        tcp.set_write_timeout(None).map_err(ConnError::Io)?;
        Ok(Conn::new(tcp, Some(c), peer))
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
        if let Some(tls) = &self.0.tls {
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

    fn read_tls(&self, tls: &Tls, buf: &mut [u8]) -> io::Result<usize> {
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
        if c.read_tls(&mut &*tcp).map_err(timeout)? == 0 {
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
            Some(tls) => self.read_tls(tls, buf),
            None => {
                self.arm()?;
                (&self.0.tcp).read(buf)
            }
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.0.tls else {
            return (&self.0.tcp).write(buf);
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
