//! Wire protocol of live migration.
//!
//! Every message is a [`Header`] of [`HEADER_LEN`] bytes (little endian) followed by a
//! payload of `payload_len` bytes:
//!
//! ```text
//! offset size field
//!      0    4 magic        b"VMIG"
//!      4    2 version      PROTOCOL_VERSION of the sender
//!      6    2 command      Command (repr u16)
//!      8    4 flags        must be 0 in version 1
//!     12    4 payload_len  bytes following the header (limited per command)
//!     16    4 payload_crc  CRC-32 of the payload
//!     20    4 header_crc   CRC-32 of bytes 0..20
//! ```
//!
//! [`Command::Pages`] is the one message with a *body* after its payload: the payload is a
//! [`PagesHeader`] (round, page descriptors and one CRC-32 per data page) and is followed by
//! `4096 × data pages` raw bytes that each page's CRC covers. This keeps bulk data out of
//! the payload CRC (one hash pass per page, which also feeds the memory receipt).
//!
//! Version 2 added TLS, the VM name and ticket in Hello and the target-chosen 128-bit
//! session id in Welcome. A version-1 peer is refused with a message naming both
//! versions (over TLS, a plaintext peer is refused in plaintext: see `conn.rs`).
//!
//! A peer whose header carries another version is answered with [`Command::Refuse`]
//! naming both versions; [`Command::Refuse`] itself is accepted in any version so the
//! refused side can print the reason.
//!
//! # Sequence
//!
//! ```text
//!  source (control conn)                                  target (listener)
//!    |==== TLS 1.3 handshake, both ends certified by the CA ====| (unless plaintext)
//!    |---- Hello{vm, ticket, connections} -------------------->| version check,
//!    |<--- Welcome{session} | Refuse{reason} ------------------|  SessionAuthorizer
//!    |     (nothing exists on the target before Welcome)       |
//!    |---- Setup{config, requirements} ----------------------->| compatibility check,
//!    |<--- SetupOk | Refuse{reason} ---------------------------|  skeleton VM (paused)
//!    |==== N data conns (TLS, same certificate as control):    |
//!    |==== DataHello{session, index} ==========================>| session id from Welcome
//!    |     round r = 0 (all populated pages), 1, 2, ...        |
//!    |==== Pages{round, descriptors, crcs}+body (any conn) ===>| written into guest memory
//!    |==== RoundEnd{round, pages} (every data conn) ==========>|
//!    |<--- RoundAck{round} ------------------------------------| after all conns ended r
//!    |     ... pre-copy rounds until convergence ...           |
//!    |     [pause vCPUs: blackout starts]                      |
//!    |==== last Pages + RoundEnd{final} =====================>|
//!    |<--- RoundAck{final} ------------------------------------|
//!    |---- State{vcpus, devices, clock} ---------------------->|
//!    |     [flush + detach disks, StorageHandoff::release]     |
//!    |---- StorageReleased ----------------------------------->| StorageHandoff::acquire,
//!    |                                                         | open disks, restore state
//!    |<--- Ready -----------------------------------------------| (still paused)
//!    |---- Commit --------------------------------------------->| point of no return
//!    |<--- Running{restore/resume times} -----------------------| vCPUs resumed
//!    |     [blackout over; source destroys its VM]             |
//!    |---- EndOfStream (data conns) ==========================>|
//!    |<--- Receipt{memory digest} ------------------------------| computed after resume
//!
//!  Before Commit, any error, a closed connection or Cancel{reason} makes the source
//!  resume its own VM (disks reclaimed and re-attached) and the target discard its copy.
//! ```

use std::io::{self, Read, Write};

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"VMIG";
/// Version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 24;
/// Guest page size the protocol moves.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one [`Command::Pages`] message may carry (4 MiB of data).
pub const MAX_PAGES_PER_MESSAGE: usize = 1024;
/// Largest payload of the frames a peer sends before it is authorized (Hello, DataHello)
/// and of Welcome.
pub const MAX_HELLO_PAYLOAD_BYTES: u32 = 1024;
/// Largest payload of a control message.
pub const MAX_CONTROL_PAYLOAD_BYTES: u32 = 1 << 20;
/// Largest VM configuration / state payload.
pub const MAX_STATE_PAYLOAD_BYTES: u32 = 64 << 20;
/// Largest human-readable reason carried by Refuse / Cancel.
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest payload of [`Command::Pages`]: round + count + descriptors + CRCs.
pub const MAX_PAGES_PAYLOAD_BYTES: u32 = (8 + MAX_PAGES_PER_MESSAGE * (8 + 4)) as u32;

/// Errors of decoding and framing.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {found:02x?}: the peer does not speak the migration protocol")]
    BadMagic { found: [u8; 4] },
    #[error("peer speaks migration protocol version {theirs}, this node speaks version {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("unknown flags {0:#x} (version {PROTOCOL_VERSION} defines none)")]
    UnknownFlags(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch on {command:?}")]
    PayloadChecksum { command: Command },
    #[error("{command:?} payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        command: Command,
        len: u32,
        max: u32,
    },
    #[error("malformed {command:?} payload: {what}")]
    Malformed { command: Command, what: String },
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: Command,
    },
    #[error("page at {gpa:#x} failed its checksum")]
    PageChecksum { gpa: u64 },
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("connection closed by the peer")]
    Closed,
    #[error("i/o on the migration connection")]
    Io(#[source] io::Error),
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            ProtocolError::Io(e)
        }
    }
}

/// Message kinds.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    Hello = 1,
    Welcome = 2,
    Refuse = 3,
    Setup = 4,
    SetupOk = 5,
    DataHello = 6,
    Pages = 7,
    RoundEnd = 8,
    RoundAck = 9,
    State = 10,
    StorageReleased = 11,
    Ready = 12,
    Commit = 13,
    Running = 14,
    Cancel = 15,
    EndOfStream = 16,
    Receipt = 17,
}

impl Command {
    /// Decodes a command number.
    pub fn from_u16(v: u16) -> Result<Self, ProtocolError> {
        use Command::*;
        Ok(match v {
            1 => Hello,
            2 => Welcome,
            3 => Refuse,
            4 => Setup,
            5 => SetupOk,
            6 => DataHello,
            7 => Pages,
            8 => RoundEnd,
            9 => RoundAck,
            10 => State,
            11 => StorageReleased,
            12 => Ready,
            13 => Commit,
            14 => Running,
            15 => Cancel,
            16 => EndOfStream,
            17 => Receipt,
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }

    /// Largest payload accepted for this command.
    pub fn max_payload_bytes(self) -> u32 {
        match self {
            Command::Setup | Command::State => MAX_STATE_PAYLOAD_BYTES,
            Command::Pages => MAX_PAGES_PAYLOAD_BYTES,
            Command::Hello | Command::Welcome | Command::DataHello => MAX_HELLO_PAYLOAD_BYTES,
            _ => MAX_CONTROL_PAYLOAD_BYTES,
        }
    }
}

/// The fixed header of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub command: Command,
    pub flags: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl Header {
    /// Encodes the header (computing the header checksum).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.command as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, checksum, command, flags, length limit and
    /// version (only [`Command::Refuse`] may carry another version).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let found: [u8; 4] = [b[0], b[1], b[2], b[3]];
        if found != MAGIC {
            return Err(ProtocolError::BadMagic { found });
        }
        let stored_crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if crc32fast::hash(&b[0..20]) != stored_crc {
            return Err(ProtocolError::HeaderChecksum);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        let command = Command::from_u16(u16::from_le_bytes([b[6], b[7]]));
        if version != PROTOCOL_VERSION && command.as_ref().ok() != Some(&Command::Refuse) {
            return Err(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let command = command?;
        let flags = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags(flags));
        }
        let payload_len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let max = command.max_payload_bytes();
        if payload_len > max {
            return Err(ProtocolError::PayloadTooLarge {
                command,
                len: payload_len,
                max,
            });
        }
        let payload_crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        Ok(Header {
            version,
            command,
            flags,
            payload_len,
            payload_crc,
        })
    }
}

/// One decoded message: header and verified payload (without a [`Command::Pages`] body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub payload: Vec<u8>,
}

/// Writes one message with this build's version.
pub fn write_frame<W: Write>(
    w: &mut W,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    write_frame_versioned(w, PROTOCOL_VERSION, command, payload)
}

/// Writes one message with an explicit version (tests use it to play an old peer).
pub fn write_frame_versioned<W: Write>(
    w: &mut W,
    version: u16,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let max = command.max_payload_bytes();
    if len > max {
        return Err(ProtocolError::PayloadTooLarge { command, len, max });
    }
    let h = Header {
        version,
        command,
        flags: 0,
        payload_len: len,
        payload_crc: crc32fast::hash(payload),
    };
    if payload.len() <= SMALL_FRAME_BYTES {
        // One write: one TLS record and one system call for a control message.
        let mut b = [0u8; HEADER_LEN + SMALL_FRAME_BYTES];
        b[..HEADER_LEN].copy_from_slice(&h.encode());
        b[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        w.write_all(&b[..HEADER_LEN + payload.len()])?;
    } else {
        w.write_all(&h.encode())?;
        w.write_all(payload)?;
    }
    Ok(())
}

/// Payloads up to this size are written together with their header.
const SMALL_FRAME_BYTES: usize = 1024;

/// Reads one message, checking header and payload. Reads at most
/// `HEADER_LEN + command.max_payload_bytes()` bytes, and allocates as the payload arrives
/// (a header announcing a large payload costs nothing until its bytes come).
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ProtocolError> {
    read_frame_of(r, &[])
}

/// [`read_frame`] that refuses, before reading any payload, a command not in `allowed`
/// (empty: any). The first frame of a connection is read this way.
pub fn read_frame_of<R: Read>(r: &mut R, allowed: &[Command]) -> Result<Frame, ProtocolError> {
    let mut hb = [0u8; HEADER_LEN];
    r.read_exact(&mut hb)?;
    let h = Header::decode(&hb)?;
    if !allowed.is_empty() && !allowed.contains(&h.command) && h.command != Command::Refuse {
        return Err(ProtocolError::Unexpected {
            expected: "Hello or DataHello",
            got: h.command,
        });
    }
    let len = h.payload_len as usize;
    let mut payload = Vec::with_capacity(len.min(PAYLOAD_CHUNK_BYTES));
    r.take(u64::from(h.payload_len)).read_to_end(&mut payload)?;
    if payload.len() != len {
        return Err(ProtocolError::Closed);
    }
    if crc32fast::hash(&payload) != h.payload_crc {
        return Err(ProtocolError::PayloadChecksum { command: h.command });
    }
    if h.command == Command::Refuse {
        return Err(ProtocolError::Refused(decode_reason(&payload)));
    }
    Ok(Frame {
        command: h.command,
        payload,
    })
}

/// Payload bytes allocated up front; beyond this a payload grows as it arrives.
const PAYLOAD_CHUNK_BYTES: usize = 64 << 10;

/// Reads a message that must be `expected`.
pub fn expect_frame<R: Read>(r: &mut R, expected: Command) -> Result<Vec<u8>, ProtocolError> {
    let f = read_frame(r)?;
    if f.command != expected {
        return Err(ProtocolError::Unexpected {
            expected: command_name(expected),
            got: f.command,
        });
    }
    Ok(f.payload)
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Hello => "Hello",
        Command::Welcome => "Welcome",
        Command::Refuse => "Refuse",
        Command::Setup => "Setup",
        Command::SetupOk => "SetupOk",
        Command::DataHello => "DataHello",
        Command::Pages => "Pages",
        Command::RoundEnd => "RoundEnd",
        Command::RoundAck => "RoundAck",
        Command::State => "State",
        Command::StorageReleased => "StorageReleased",
        Command::Ready => "Ready",
        Command::Commit => "Commit",
        Command::Running => "Running",
        Command::Cancel => "Cancel",
        Command::EndOfStream => "EndOfStream",
        Command::Receipt => "Receipt",
    }
}

/// `reason` cut to at most [`MAX_REASON_BYTES`] on a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Sends a refusal (best effort: the connection is closed afterwards anyway).
pub fn write_refuse<W: Write>(w: &mut W, reason: &str) -> Result<(), ProtocolError> {
    write_frame(w, Command::Refuse, truncate_reason(reason).as_bytes())?;
    w.flush()?;
    Ok(())
}

/// Decodes a Refuse / Cancel reason (lossy UTF-8, truncated to [`MAX_REASON_BYTES`]).
pub fn decode_reason(payload: &[u8]) -> String {
    let end = payload.len().min(MAX_REASON_BYTES);
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

fn bincode_opts(limit: u64) -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Encodes a structured payload.
pub fn encode_payload<T: serde::Serialize>(
    command: Command,
    v: &T,
) -> Result<Vec<u8>, ProtocolError> {
    use bincode::Options;
    bincode_opts(u64::from(command.max_payload_bytes()))
        .serialize(v)
        .map_err(|e| ProtocolError::Malformed {
            command,
            what: e.to_string(),
        })
}

/// Decodes a structured payload (no trailing bytes). The limit is the payload's own
/// length, so a length prefix inside it claiming more than is there fails before anything
/// is allocated for byte strings (see [`bytes`]); a list of other items preallocates at
/// most bincode's cautious 1 MiB.
pub fn decode_payload<T: serde::de::DeserializeOwned>(
    command: Command,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    use bincode::Options;
    let limit = (payload.len() as u64).min(u64::from(command.max_payload_bytes()));
    bincode_opts(limit)
        .deserialize(payload)
        .map_err(|e| ProtocolError::Malformed {
            command,
            what: e.to_string(),
        })
}

/// Session id the target chooses (random, 128 bits) and the data connections present.
pub type SessionId = [u8; 16];

/// Serde for `Vec<u8>` fields as one byte string (same bytes on the wire as a sequence
/// with fixint encoding): bincode checks its length against the limit before allocating.
pub mod bytes {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// [`Command::Hello`] payload: which VM the source wants to send, with the one-time
/// ticket the target's [`super::tls::SessionAuthorizer`] checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub vm_name: String,
    #[serde(with = "bytes")]
    pub ticket: Vec<u8>,
    pub connections: u16,
}

impl Hello {
    /// Checks every peer-supplied field against its bound.
    pub fn validate(&self) -> Result<(), String> {
        use super::tls::{MAX_TICKET_BYTES, MAX_VM_NAME_BYTES};
        let n = usize::from(self.connections);
        if !(1..=super::MAX_CONNECTIONS).contains(&n) {
            return Err(format!(
                "{n} data connections requested, 1..={} allowed",
                super::MAX_CONNECTIONS
            ));
        }
        if self.vm_name.is_empty() || self.vm_name.len() > MAX_VM_NAME_BYTES {
            return Err(format!(
                "VM name of {} bytes, 1..={MAX_VM_NAME_BYTES} allowed",
                self.vm_name.len()
            ));
        }
        if self.ticket.len() > MAX_TICKET_BYTES {
            return Err(format!(
                "migration ticket of {} bytes, at most {MAX_TICKET_BYTES} allowed",
                self.ticket.len()
            ));
        }
        Ok(())
    }
}

/// [`Command::Welcome`] payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Welcome {
    pub session_id: SessionId,
}

/// [`Command::DataHello`] payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataHello {
    pub session_id: SessionId,
    pub index: u16,
}

/// [`Command::RoundEnd`] payload: what one data connection carried in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundEnd {
    pub round: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
}

/// [`Command::RoundAck`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundAck {
    pub round: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
}

/// [`Command::Running`] payload: how long the target's part of the blackout took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub restore_us: u64,
    pub resume_us: u64,
}

/// [`Command::Receipt`] payload: digest of the target's guest memory as of switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub memory_digest: u64,
}

/// [`Command::Setup`] payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Setup {
    pub requirements: super::seam::Requirements,
    #[serde(with = "bytes")]
    pub config: Vec<u8>,
}

/// [`Command::State`] payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatePayload {
    #[serde(with = "bytes")]
    pub state: Vec<u8>,
}

/// One page descriptor of a [`Command::Pages`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageDesc {
    /// 4 KiB of data follow in the body, with this CRC-32.
    Data { gpa: u64, crc: u32 },
    /// The page is all zeroes; nothing follows.
    Zero { gpa: u64 },
}

impl PageDesc {
    pub fn gpa(&self) -> u64 {
        match *self {
            PageDesc::Data { gpa, .. } | PageDesc::Zero { gpa } => gpa,
        }
    }
}

/// Decoded payload of [`Command::Pages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesHeader {
    pub round: u32,
    pub pages: Vec<PageDesc>,
}

const ZERO_BIT: u64 = 1;

impl PagesHeader {
    /// Number of data pages, i.e. body length / [`PAGE_SIZE`].
    pub fn data_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| matches!(p, PageDesc::Data { .. }))
            .count()
    }

    /// Encodes into `out` (cleared first). Layout: round u32, count u32, count × u64
    /// (page address, bit 0 set for a zero page), data-page count × u32 CRC.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for p in &self.pages {
            let word = match *p {
                PageDesc::Data { gpa, .. } => gpa,
                PageDesc::Zero { gpa } => gpa | ZERO_BIT,
            };
            out.extend_from_slice(&word.to_le_bytes());
        }
        for p in &self.pages {
            if let PageDesc::Data { crc, .. } = *p {
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }

    /// Decodes, never panicking: counts and addresses are validated.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |what: String| ProtocolError::Malformed {
            command: Command::Pages,
            what,
        };
        if b.len() < 8 {
            return Err(bad(format!("{} bytes, need at least 8", b.len())));
        }
        let round = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let count = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        if count > MAX_PAGES_PER_MESSAGE {
            return Err(bad(format!(
                "{count} pages, at most {MAX_PAGES_PER_MESSAGE} allowed"
            )));
        }
        let words_end = 8 + count * 8;
        if b.len() < words_end {
            return Err(bad(format!(
                "{count} page descriptors do not fit in {} bytes",
                b.len()
            )));
        }
        let mut words = Vec::with_capacity(count);
        for i in 0..count {
            let o = 8 + i * 8;
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            let word = u64::from_le_bytes(w);
            if word & (PAGE_SIZE as u64 - 1) & !ZERO_BIT != 0 {
                return Err(bad(format!("page address {word:#x} is not page aligned")));
            }
            words.push(word);
        }
        let data = words.iter().filter(|w| *w & ZERO_BIT == 0).count();
        if b.len() != words_end + data * 4 {
            return Err(bad(format!(
                "{} bytes, expected {} for {count} pages of which {data} carry data",
                b.len(),
                words_end + data * 4
            )));
        }
        let mut crc_off = words_end;
        let mut pages = Vec::with_capacity(count);
        for w in words {
            if w & ZERO_BIT != 0 {
                pages.push(PageDesc::Zero { gpa: w & !ZERO_BIT });
            } else {
                let crc = u32::from_le_bytes([
                    b[crc_off],
                    b[crc_off + 1],
                    b[crc_off + 2],
                    b[crc_off + 3],
                ]);
                crc_off += 4;
                pages.push(PageDesc::Data { gpa: w, crc });
            }
        }
        Ok(PagesHeader { round, pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        let hello = Hello {
            vm_name: "vm1".into(),
            ticket: vec![1, 2, 3],
            connections: 4,
        };
        let p = encode_payload(Command::Hello, &hello).unwrap();
        write_frame(&mut buf, Command::Hello, &p).unwrap();
        let f = read_frame(&mut Cursor::new(&buf)).unwrap();
        assert_eq!(f.command, Command::Hello);
        let back: Hello = decode_payload(Command::Hello, &f.payload).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut buf = Vec::new();
        write_frame_versioned(&mut buf, 9, Command::Hello, b"").unwrap();
        let e = read_frame(&mut Cursor::new(&buf)).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::VersionMismatch { ours: 2, theirs: 9 }
        ));
        let msg = e.to_string();
        assert!(msg.contains('9') && msg.contains('2'), "{msg}");
    }

    #[test]
    fn refuse_in_any_version_is_readable() {
        let mut buf = Vec::new();
        write_frame_versioned(&mut buf, 42, Command::Refuse, b"no thanks").unwrap();
        let e = read_frame(&mut Cursor::new(&buf)).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Refused(ref r) if r == "no thanks"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_payload_is_detected() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Command::Cancel, b"abc").unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let e = read_frame(&mut Cursor::new(&buf)).unwrap_err();
        assert!(matches!(e, ProtocolError::PayloadChecksum { .. }), "{e}");
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let h = Header {
            version: PROTOCOL_VERSION,
            command: Command::Welcome,
            flags: 0,
            payload_len: u32::MAX,
            payload_crc: 0,
        };
        let e = read_frame(&mut Cursor::new(h.encode().to_vec())).unwrap_err();
        assert!(matches!(e, ProtocolError::PayloadTooLarge { .. }), "{e}");
    }

    #[test]
    fn pages_header_round_trip_and_validation() {
        let h = PagesHeader {
            round: 3,
            pages: vec![
                PageDesc::Data {
                    gpa: 0x1000,
                    crc: 5,
                },
                PageDesc::Zero { gpa: 0x2000 },
                PageDesc::Data {
                    gpa: 0x10_0000,
                    crc: 9,
                },
            ],
        };
        let mut b = Vec::new();
        h.encode_into(&mut b);
        assert_eq!(PagesHeader::decode(&b).unwrap(), h);
        assert_eq!(h.data_pages(), 2);
        // Unaligned address.
        let mut bad = b.clone();
        bad[8] = 0x10; // gpa 0x1010
        assert!(PagesHeader::decode(&bad).is_err());
        // Truncated.
        assert!(PagesHeader::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn garbage_stream_never_panics() {
        // Deterministic xorshift stream of garbage, with occasional valid magic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            let n = (x % 200) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if x.is_multiple_of(3) && buf.len() >= 4 {
                buf[0..4].copy_from_slice(&MAGIC);
            }
            let mut c = Cursor::new(&buf);
            while read_frame(&mut c).is_ok() {}
            let _ = PagesHeader::decode(&buf);
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut c = Cursor::new(&bytes);
            let _ = read_frame(&mut c);
            let _ = PagesHeader::decode(&bytes);
            let _ = decode_payload::<Hello>(Command::Hello, &bytes);
            let _ = decode_payload::<RoundEnd>(Command::RoundEnd, &bytes);
        }

        #[test]
        fn valid_header_with_random_fields(cmd in 0u16..40, len in 0u32..64, flags in 0u32..3) {
            let mut b = [0u8; HEADER_LEN];
            b[0..4].copy_from_slice(&MAGIC);
            b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            b[6..8].copy_from_slice(&cmd.to_le_bytes());
            b[8..12].copy_from_slice(&flags.to_le_bytes());
            b[12..16].copy_from_slice(&len.to_le_bytes());
            let crc = crc32fast::hash(&b[0..20]);
            b[20..24].copy_from_slice(&crc.to_le_bytes());
            let r = Header::decode(&b);
            prop_assert_eq!(r.is_ok(), (1..=17).contains(&cmd) && flags == 0);
        }
    }
}
