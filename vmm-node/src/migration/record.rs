//! TLS 1.3 record protection after rustls' handshake: [`Sealer`] (sending) and
//! [`Opener`] (receiving), the userspace counterpart of kernel TLS offload.
//!
//! rustls authenticates both ends and agrees on the keys exactly as before; once its
//! handshake is done, [`super::conn::Conn`] takes the traffic secrets out of it
//! (`dangerous_extract_secrets`, as kTLS set-up does) and protects the application data
//! records itself with ring's AEAD. The bytes on the wire are the same TLS 1.3 records
//! (RFC 8446 §5.2: outer type 23, version 0x0303, AEAD over the plaintext and the inner
//! content type, the 5-byte header as additional data, nonce = IV xor sequence number), so
//! a peer that keeps rustls' own record layer reads and writes them unchanged. What this
//! saves: rustls copies every record into a fresh allocation on each side and decrypts a
//! 16 KiB record per call under the connection's lock; here a writer seals up to
//! [`SEAL_BATCH_BYTES`] of records in one buffer and sends them with one system call, and a
//! reader decrypts in place in its own buffer. The memory transport goes further: its
//! sender lays pages out with room for each record's header and tag ([`sealed_offset`])
//! and they are sealed where they are ([`Sealer::seal_in_place`]), and its receiver takes
//! pages from the decrypted records where they lie (`Conn::read_exact_with`), so neither
//! side copies page data for TLS. Sending and receiving have their own keys and sequence
//! numbers, so a reader and a writer never share a lock.
//!
//! Not supported after the handshake: a KeyUpdate (an error, not silent; no migration
//! comes near the AEAD's record limit, which [`Sealer`] and [`Opener`] enforce). Session
//! tickets are skipped (this crate's servers send none, and a connection never resumes).

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT_BYTES: usize = 1 << 14;
/// Largest ciphertext of one record (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT_BYTES: usize = MAX_PLAINTEXT_BYTES + 256;
/// Record header length.
pub const HEADER_BYTES: usize = 5;
/// AEAD tag length of every TLS 1.3 suite.
const TAG_BYTES: usize = 16;
/// Plaintext a writer seals before it sends.
pub const SEAL_BATCH_BYTES: usize = 256 << 10;
/// Bytes of one record of [`MAX_PLAINTEXT_BYTES`] on the wire.
pub const RECORD_STRIDE_BYTES: usize = HEADER_BYTES + MAX_PLAINTEXT_BYTES + 1 + TAG_BYTES;

/// Where plaintext byte `at` sits in a buffer laid out for [`Sealer::seal_in_place`]:
/// records of [`MAX_PLAINTEXT_BYTES`] one after the other, each with room for its header
/// before its plaintext and for its content type and tag after it.
pub const fn sealed_offset(at: usize) -> usize {
    at / MAX_PLAINTEXT_BYTES * RECORD_STRIDE_BYTES + HEADER_BYTES + at % MAX_PLAINTEXT_BYTES
}

/// Length of such a buffer holding `plain` bytes of plaintext, once sealed.
pub const fn sealed_len(plain: usize) -> usize {
    let last = plain % MAX_PLAINTEXT_BYTES;
    plain / MAX_PLAINTEXT_BYTES * RECORD_STRIDE_BYTES
        + if last == 0 {
            0
        } else {
            HEADER_BYTES + last + 1 + TAG_BYTES
        }
}

/// Records one key may protect: below the AES-GCM confidentiality limit of RFC 8446 §5.5
/// (2^24.5 full records), about 275 GB of application data per connection and direction.
const RECORDS_MAX: u64 = 1 << 24;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];

/// Errors of the record layer (all fatal for the connection).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record with outer type {0} after the handshake")]
    OuterType(u8),
    #[error("record of {0} bytes is longer than TLS allows")]
    TooLong(usize),
    #[error("record failed authentication (corrupted or forged)")]
    Decrypt,
    #[error("record without a content type")]
    NoContentType,
    #[error("a post-handshake handshake message (key update or ticket) is not supported")]
    PostHandshake,
    #[error("the peer sent TLS alert {0}")]
    Alert(u8),
    #[error("the key's record limit is reached")]
    Exhausted,
    #[error("cipher suite not supported by the migration record layer")]
    Suite,
}

fn key_of(
    secrets: &ConnectionTrafficSecrets,
) -> Result<(LessSafeKey, [u8; NONCE_LEN]), RecordError> {
    let (alg, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key, iv)
        }
        _ => return Err(RecordError::Suite),
    };
    let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
    let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::Suite)?;
    Ok((LessSafeKey::new(key), iv))
}

fn nonce(iv: &[u8; NONCE_LEN], seq: u64) -> Nonce {
    let mut n = *iv;
    for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    Nonce::assume_unique_for_key(n)
}

/// The sending direction of one connection.
pub struct Sealer {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Sealer {
    /// From the transmit secrets and the next sequence number.
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Sealer, RecordError> {
        let (key, iv) = key_of(secrets)?;
        Ok(Sealer { key, iv, seq })
    }

    /// Appends `plain` to `out` as application data records of up to
    /// [`MAX_PLAINTEXT_BYTES`] each (the plaintext is copied once, then encrypted in place).
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plain.chunks(MAX_PLAINTEXT_BYTES) {
            self.seal_record(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Seals, in place, the `plain` bytes of plaintext laid out in `buf` as
    /// [`sealed_offset`] says: writes each record's header, content type and tag into the
    /// room left for them, and encrypts its plaintext where it is. The records are the
    /// same as [`Sealer::seal`] makes of that plaintext. Returns their length
    /// ([`sealed_len`]); `buf` must be at least that long.
    pub fn seal_in_place(&mut self, buf: &mut [u8], plain: usize) -> Result<usize, RecordError> {
        let len = sealed_len(plain);
        if buf.len() < len {
            return Err(RecordError::TooLong(len));
        }
        let mut left = plain;
        for rec in buf[..len].chunks_mut(RECORD_STRIDE_BYTES) {
            let n = left.min(MAX_PLAINTEXT_BYTES);
            left -= n;
            let (hdr, body) = rec.split_at_mut(HEADER_BYTES);
            let hdr: &mut [u8; HEADER_BYTES] = hdr.try_into().map_err(|_| RecordError::Suite)?;
            let tag = self.seal_with_room(APPLICATION_DATA, hdr, &mut body[..n + 1])?;
            body[n + 1..n + 1 + TAG_BYTES].copy_from_slice(tag.as_ref());
        }
        Ok(len)
    }

    /// Seals the record whose header goes to `hdr` and whose plaintext is `body` but its
    /// last byte, where the content type `ty` goes.
    fn seal_with_room(
        &mut self,
        ty: u8,
        hdr: &mut [u8; HEADER_BYTES],
        body: &mut [u8],
    ) -> Result<aead::Tag, RecordError> {
        if self.seq >= RECORDS_MAX {
            return Err(RecordError::Exhausted);
        }
        let len = body.len() + TAG_BYTES;
        *hdr = [
            APPLICATION_DATA,
            LEGACY_VERSION[0],
            LEGACY_VERSION[1],
            (len >> 8) as u8,
            len as u8,
        ];
        if let Some(last) = body.last_mut() {
            *last = ty;
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(&self.iv, self.seq), Aad::from(*hdr), body)
            .map_err(|_| RecordError::Exhausted)?;
        self.seq += 1;
        Ok(tag)
    }

    /// Appends a close_notify alert to `out`.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_record(ALERT, &[1, 0], out)
    }

    fn seal_record(&mut self, ty: u8, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_BYTES]);
        out.extend_from_slice(chunk);
        out.push(0);
        let (hdr, body) = out[start..].split_at_mut(HEADER_BYTES);
        let hdr: &mut [u8; HEADER_BYTES] = hdr.try_into().map_err(|_| RecordError::Suite)?;
        match self.seal_with_room(ty, hdr, body) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// What [`Opener::open`] found at the start of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// A whole record was there and is consumed (`used` bytes); its application data, if
    /// any, is decrypted in place at `plain` (relative to the slice given).
    Data { used: usize, plain: Range<usize> },
    /// The peer's close_notify (`used` bytes consumed): no more data follows.
    Closed { used: usize },
    /// Not a whole record yet: at least `need` bytes in total are needed.
    Partial { need: usize },
}

/// The receiving direction of one connection.
pub struct Opener {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Opener {
    /// From the receive secrets and the next sequence number.
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Opener, RecordError> {
        let (key, iv) = key_of(secrets)?;
        Ok(Opener { key, iv, seq })
    }

    /// Opens the record at the start of `buf` (in place), if it is all there.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        if buf.len() < HEADER_BYTES {
            return Ok(Opened::Partial { need: HEADER_BYTES });
        }
        let hdr: [u8; HEADER_BYTES] = [buf[0], buf[1], buf[2], buf[3], buf[4]];
        if hdr[0] != APPLICATION_DATA {
            return Err(RecordError::OuterType(hdr[0]));
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len > MAX_CIPHERTEXT_BYTES {
            return Err(RecordError::TooLong(len));
        }
        let used = HEADER_BYTES + len;
        if buf.len() < used {
            return Ok(Opened::Partial { need: used });
        }
        if self.seq >= RECORDS_MAX {
            return Err(RecordError::Exhausted);
        }
        let body = &mut buf[HEADER_BYTES..used];
        let plain = self
            .key
            .open_in_place(nonce(&self.iv, self.seq), Aad::from(hdr), body)
            .map_err(|_| RecordError::Decrypt)?;
        self.seq += 1;
        // Strip the padding: the content type is the last non-zero byte.
        let Some(ty_at) = plain.iter().rposition(|b| *b != 0) else {
            return Err(RecordError::NoContentType);
        };
        match plain[ty_at] {
            APPLICATION_DATA => Ok(Opened::Data {
                used,
                plain: HEADER_BYTES..HEADER_BYTES + ty_at,
            }),
            ALERT if ty_at == 2 && plain[1] == 0 => Ok(Opened::Closed { used }),
            ALERT => Err(RecordError::Alert(if ty_at >= 2 { plain[1] } else { 0 })),
            // A session ticket (from a server configured to send them) is of no use to a
            // connection that never resumes: skipped. A key update cannot be skipped.
            HANDSHAKE if only_tickets(&plain[..ty_at]) => Ok(Opened::Data {
                used,
                plain: HEADER_BYTES..HEADER_BYTES,
            }),
            HANDSHAKE => Err(RecordError::PostHandshake),
            other => Err(RecordError::OuterType(other)),
        }
    }
}

/// `msgs` is a sequence of whole NewSessionTicket handshake messages.
fn only_tickets(mut msgs: &[u8]) -> bool {
    const NEW_SESSION_TICKET: u8 = 4;
    if msgs.is_empty() {
        return false;
    }
    while !msgs.is_empty() {
        if msgs.len() < 4 || msgs[0] != NEW_SESSION_TICKET {
            return false;
        }
        let len = usize::from(msgs[1]) << 16 | usize::from(msgs[2]) << 8 | usize::from(msgs[3]);
        let Some(rest) = msgs.get(4 + len..) else {
            return false;
        };
        msgs = rest;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    /// AES-256-GCM secrets (rustls builds a 32-byte `AeadKey` from an array).
    fn secrets(k: u8) -> ConnectionTrafficSecrets {
        let mut key = [k; 32];
        key[0] = 1;
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(key),
            iv: Iv::from([k; 12]),
        }
    }

    /// Records sealed in place are byte for byte those [`Sealer::seal`] makes of the same
    /// plaintext with the same key and sequence numbers, and they open.
    #[test]
    fn sealing_in_place_makes_the_same_records() {
        let s = secrets(9);
        for plain_len in [
            0,
            1,
            4096,
            MAX_PLAINTEXT_BYTES - 1,
            MAX_PLAINTEXT_BYTES,
            3 * MAX_PLAINTEXT_BYTES + 2 * 4096,
            SEAL_BATCH_BYTES,
        ] {
            let plain: Vec<u8> = (0..plain_len).map(|i| (i * 31 + i / 977) as u8).collect();
            let mut copied = Vec::new();
            Sealer::new(5, &s)
                .unwrap()
                .seal(&plain, &mut copied)
                .unwrap();
            let mut buf = vec![0xee; sealed_len(plain_len)];
            for (i, b) in plain.iter().enumerate() {
                buf[sealed_offset(i)] = *b;
            }
            let mut sealer = Sealer::new(5, &s).unwrap();
            assert_eq!(sealer.seal_in_place(&mut buf, plain_len), Ok(buf.len()));
            assert!(buf == copied, "{plain_len} bytes");
            // The next record continues the sequence.
            let mut next = Vec::new();
            sealer.close_notify(&mut next).unwrap();
            let mut opener = Opener::new(5, &s).unwrap();
            let mut at = 0;
            while at < buf.len() {
                match opener.open(&mut buf[at..]).unwrap() {
                    Opened::Data { used, .. } => at += used,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(
                opener.open(&mut next),
                Ok(Opened::Closed { used: next.len() })
            );
        }
        // A buffer without room for the last record's tag is refused, not overrun.
        let mut short = vec![0u8; sealed_len(4096) - 1];
        assert_eq!(
            Sealer::new(0, &s).unwrap().seal_in_place(&mut short, 4096),
            Err(RecordError::TooLong(sealed_len(4096)))
        );
    }

    /// A truncated record stream ends in `Partial`, never in data that was not sent.
    #[test]
    fn truncated_records_are_partial() {
        let s = secrets(3);
        let mut wire = Vec::new();
        Sealer::new(0, &s)
            .unwrap()
            .seal(&[1u8; 5000], &mut wire)
            .unwrap();
        for cut in [0, 3, HEADER_BYTES, wire.len() - TAG_BYTES, wire.len() - 1] {
            let mut opener = Opener::new(0, &s).unwrap();
            assert_eq!(
                opener.open(&mut wire[..cut]).unwrap(),
                Opened::Partial {
                    need: if cut < HEADER_BYTES {
                        HEADER_BYTES
                    } else {
                        wire.len()
                    }
                },
                "cut at {cut}"
            );
        }
        // A record whose tag was replaced fails authentication.
        let mut forged = wire.clone();
        let n = forged.len();
        forged[n - TAG_BYTES..].copy_from_slice(&[0u8; TAG_BYTES]);
        assert_eq!(
            Opener::new(0, &s).unwrap().open(&mut forged),
            Err(RecordError::Decrypt)
        );
    }

    #[test]
    fn sealed_records_open_and_tampering_is_detected() {
        let s = secrets(7);
        let mut sealer = Sealer::new(3, &s).unwrap();
        let mut opener = Opener::new(3, &s).unwrap();
        let plain: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        sealer.seal(&plain, &mut wire).unwrap();
        sealer.close_notify(&mut wire).unwrap();
        let mut bad = wire.clone();
        let mut got = Vec::new();
        let mut at = 0;
        loop {
            match opener.open(&mut wire[at..]).unwrap() {
                Opened::Data { used, plain } => {
                    got.extend_from_slice(&wire[at..][plain]);
                    at += used;
                }
                Opened::Closed { used } => {
                    at += used;
                    break;
                }
                Opened::Partial { .. } => panic!("whole records were given"),
            }
        }
        assert_eq!(at, wire.len());
        assert_eq!(got, plain);
        // A partial record asks for more; a flipped bit fails authentication.
        let mut opener = Opener::new(3, &s).unwrap();
        assert_eq!(
            opener.open(&mut bad[..100]).unwrap(),
            Opened::Partial {
                need: HEADER_BYTES + MAX_PLAINTEXT_BYTES + 1 + TAG_BYTES
            }
        );
        bad[50] ^= 1;
        assert_eq!(opener.open(&mut bad), Err(RecordError::Decrypt));
        // Another sequence number fails too (a replayed or dropped record).
        let mut opener = Opener::new(4, &s).unwrap();
        assert_eq!(opener.open(&mut wire), Err(RecordError::Decrypt));
    }
}
