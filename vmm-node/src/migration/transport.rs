//! Memory transport: guest pages over several TCP connections.
//!
//! The sender splits a [`DirtyPages`] set into claims of 4096 pages that worker threads
//! (one per data connection) take in turn; each worker copies pages out of guest memory,
//! skips pages that are zero on both sides, and writes [`Command::Pages`] messages of up to
//! [`MAX_PAGES_PER_MESSAGE`] pages (4 MiB) followed by a [`Command::RoundEnd`]. The
//! receiver has one thread per connection that verifies every page's CRC-32, writes it
//! into the target's [`GuestMem`] and reports round ends to the coordinator. Over the
//! engine's TLS record layer a message's pages are sealed in place in the worker's buffer
//! and taken on the receiving side straight from the decrypted records
//! ([`super::record`]), so TLS adds the AEAD and no copy; such a message carries at most
//! [`SEALED_PAGES_PER_MESSAGE`] data pages, sealed while they are still in cache.
//!
//! A bandwidth cap ([`Pacer`]) paces the writes of all data connections together; a
//! capped round can then last long, so the sender reports progress while a round runs
//! ([`RoundControl::on_progress`]), stops at the migration's deadline
//! ([`RoundControl::stop_at`]), and the receiver's idle timeout counts from the last
//! message *any* data connection received ([`LastHeard`]), not only its own.
//!
//! Both sides keep a [`PageHashes`] table (the CRC-32 of every page as last sent /
//! received), which serves three purposes: zero detection against the *target's* content
//! (a zero page is only sent when the target's copy is not zero), the integrity check of
//! each page, and the memory receipt digest compared at switchover.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::conn::{Conn, RecordLayer};
use super::protocol::{
    decode_payload, encode_payload, read_frame, write_frame, Command, PageDesc, PagesHeader,
    ProtocolError, RoundEnd, MAX_PAGES_PER_MESSAGE, PAGE_SIZE,
};
use super::record;
use crate::GuestMem;

/// Pages a worker claims at once (one bitmap word is 64 pages).
const CLAIM_WORDS: usize = 64;
/// Data pages of one message over the engine's TLS record layer (256 KiB): the message
/// is sealed and written while its pages are still in the sending core's cache, which
/// `migration-bench` measured to cut TLS's extra CPU per GB by more than half against
/// 4 MiB messages.
const SEALED_PAGES_PER_MESSAGE: usize = 64;
/// Lowest bandwidth cap accepted: below it a guest takes hours per GiB of memory, and a
/// data connection could stay silent longer than a receiver waits.
pub const BANDWIDTH_BYTES_PER_S_MIN: u64 = 1 << 20;
/// Bytes a capped sender writes at once (at the lowest cap and [`super::MAX_CONNECTIONS`]
/// connections each connection still gets a chunk every second).
const PACE_CHUNK_BYTES: usize = 64 << 10;
/// Longest sleep of a paced writer between looks at the cancel flag and the deadline.
const PACE_POLL: Duration = Duration::from_millis(20);
/// How often [`MemorySender::send_round_with`] reports the bytes a running round has sent.
pub const ROUND_PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Errors of the memory transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("data connection {index}")]
    Protocol {
        index: usize,
        #[source]
        source: ProtocolError,
    },
    #[error("page at {gpa:#x} is outside guest memory")]
    OutsideMemory { gpa: u64 },
    #[error("guest memory access at {gpa:#x}")]
    Memory {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("data connection {index} sent round {got} while round {expected} was expected")]
    RoundMismatch {
        index: usize,
        expected: u32,
        got: u32,
    },
    #[error("transfer cancelled")]
    Cancelled,
    #[error("the migration deadline passed while the round was being sent")]
    DeadlineReached,
    #[error("a data connection thread panicked")]
    WorkerPanicked,
}

/// Guest-physical layout of a [`GuestMem`] as a flat page index space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageMap {
    /// (first guest-physical address, pages, first global page index), sorted by address.
    regions: Vec<(u64, usize, usize)>,
    total_pages: usize,
}

impl PageMap {
    /// Layout of `mem` (every region must be page aligned, which vm-memory guarantees
    /// for the VMM's mmap-backed regions).
    pub fn from_memory(mem: &GuestMem) -> Self {
        let mut regions: Vec<(u64, usize)> = mem
            .iter()
            .map(|r| (r.start_addr().0, (r.len() as usize) / PAGE_SIZE))
            .collect();
        regions.sort_unstable();
        let mut out = Vec::with_capacity(regions.len());
        let mut idx = 0;
        for (start, pages) in regions {
            out.push((start, pages, idx));
            idx += pages;
        }
        PageMap {
            regions: out,
            total_pages: idx,
        }
    }

    /// Total number of pages.
    pub fn total_pages(&self) -> usize {
        self.total_pages
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages as u64 * PAGE_SIZE as u64
    }

    /// Global index of the page containing `gpa`.
    pub fn index_of(&self, gpa: u64) -> Option<usize> {
        self.regions.iter().find_map(|&(start, pages, first)| {
            let off = gpa.checked_sub(start)? / PAGE_SIZE as u64;
            (off < pages as u64).then_some(first + off as usize)
        })
    }

    /// Guest-physical address of global page `index`.
    pub fn gpa_of(&self, index: usize) -> Option<u64> {
        self.regions.iter().find_map(|&(start, pages, first)| {
            (index >= first && index < first + pages)
                .then(|| start + ((index - first) * PAGE_SIZE) as u64)
        })
    }

    /// Regions as (first address, pages, first global index).
    pub fn regions(&self) -> &[(u64, usize, usize)] {
        &self.regions
    }
}

/// A set of pages, one bit per global page index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyPages {
    /// Empty set over `pages` pages.
    pub fn empty(pages: usize) -> Self {
        DirtyPages {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page.
    pub fn all(pages: usize) -> Self {
        let mut d = Self::empty(pages);
        for i in 0..pages {
            d.set(i);
        }
        d
    }

    /// Builds the set from a per-region bitmap (64 pages per word, bit i of word w is page
    /// `w * 64 + i` of the region), as KVM_GET_DIRTY_LOG and vm-memory's AtomicBitmap return.
    pub fn merge_region_bitmap(&mut self, first_index: usize, region_pages: usize, bitmap: &[u64]) {
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = w * 64 + b;
                if p < region_pages {
                    self.set(first_index + p);
                }
            }
        }
    }

    /// Removes from the set the pages of a per-region bitmap (same layout as
    /// [`DirtyPages::merge_region_bitmap`]); returns how many of them were in the set.
    pub fn remove_region_bitmap(
        &mut self,
        first_index: usize,
        region_pages: usize,
        bitmap: &[u64],
    ) -> usize {
        let mut removed = 0;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = w * 64 + b;
                if p < region_pages && self.contains(first_index + p) {
                    let i = first_index + p;
                    self.words[i / 64] &= !(1 << (i % 64));
                    removed += 1;
                }
            }
        }
        removed
    }

    pub fn set(&mut self, index: usize) {
        if index < self.pages {
            self.words[index / 64] |= 1 << (index % 64);
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        index < self.pages && self.words[index / 64] & (1 << (index % 64)) != 0
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &DirtyPages) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Pages covered (set or not).
    pub fn capacity_pages(&self) -> usize {
        self.pages
    }

    fn word(&self, w: usize) -> u64 {
        self.words[w]
    }
}

/// CRC-32 of a zero page.
pub fn zero_page_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0u8; PAGE_SIZE]))
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
}

/// CRC-32 of every page as last sent (source) or received (target). Starts as "all zero"
/// because a fresh target's memory is zero.
#[derive(Debug)]
pub struct PageHashes {
    crcs: Vec<AtomicU32>,
}

impl PageHashes {
    pub fn new_zeroed(pages: usize) -> Self {
        let z = zero_page_crc();
        PageHashes {
            crcs: (0..pages).map(|_| AtomicU32::new(z)).collect(),
        }
    }

    pub fn get(&self, index: usize) -> u32 {
        self.crcs[index].load(Ordering::Relaxed)
    }

    pub fn set(&self, index: usize, crc: u32) {
        self.crcs[index].store(crc, Ordering::Relaxed);
    }

    /// Digest over every page's CRC in index order (64-bit, not cryptographic: it detects
    /// divergence, it does not resist an attacker).
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0x6a09_e667_f3bc_c908;
        for (i, c) in self.crcs.iter().enumerate() {
            h = mix64(h ^ ((i as u64) << 32 | u64::from(c.load(Ordering::Relaxed))));
        }
        h
    }

    /// Digest computed directly from memory (for verification in tests and after a
    /// paused source has switched over). Pages the host never backed
    /// ([`crate::memory::never_written_pages`]) read as zero and are not read; zero pages
    /// take the zero page's CRC without hashing: an idle guest's pass costs its touched
    /// memory, not its size.
    pub fn digest_of_memory(mem: &GuestMem, map: &PageMap) -> Result<u64, TransportError> {
        let hashes = PageHashes::new_zeroed(map.total_pages());
        let mut page = vec![0u8; PAGE_SIZE];
        let zero_crc = zero_page_crc();
        for region in mem.iter() {
            let start = region.start_addr().0;
            let first = map
                .index_of(start)
                .ok_or(TransportError::OutsideMemory { gpa: start })?;
            let region_pages = region.len() as usize / PAGE_SIZE;
            let never_written = crate::memory::never_written_pages(region);
            for p in 0..region_pages {
                let unbacked = never_written
                    .as_ref()
                    .and_then(|bits| bits.get(p / 64))
                    .is_some_and(|w| w & (1 << (p % 64)) != 0);
                if unbacked {
                    continue; // Stays the zero page's CRC (new_zeroed).
                }
                let gpa = start + (p * PAGE_SIZE) as u64;
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|source| TransportError::Memory { gpa, source })?;
                let crc = if is_zero(&page) {
                    zero_crc
                } else {
                    crc32fast::hash(&page)
                };
                hashes.set(first + p, crc);
            }
        }
        Ok(hashes.digest())
    }
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps the writes of every data connection of one migration together under a bandwidth
/// cap: each write reserves the next slot of `bytes / cap` seconds on one shared timeline
/// and waits for the slot's start. Idle time is not banked (no burst after a pause), so
/// over any window of `T` seconds at most `cap × T` bytes plus one chunk go out.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_s: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    /// A pacer for `bytes_per_s`; `None` for 0 (unlimited).
    pub fn new(bytes_per_s: u64) -> Option<Pacer> {
        (bytes_per_s > 0).then(|| Pacer {
            bytes_per_s,
            next: Mutex::new(Instant::now()),
        })
    }

    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// Reserves the next slot for `bytes`; returns when it starts.
    fn reserve(&self, bytes: usize) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let at = (*next).max(Instant::now());
        *next = at + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        at
    }
}

/// When any data connection of one incoming migration last received a message. A
/// receiver idle at a message boundary keeps waiting while this is recent (a capped
/// source's rounds are long and a connection that finished its share of a round waits
/// for the others); the target's coordinator counts its timeout from it too.
#[derive(Debug)]
pub struct LastHeard {
    base: Instant,
    ms: AtomicU64,
}

impl Default for LastHeard {
    fn default() -> Self {
        LastHeard {
            base: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
}

impl LastHeard {
    /// Something arrived now.
    pub fn touch(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Time since the last [`LastHeard::touch`] (or since creation).
    pub fn elapsed(&self) -> Duration {
        let at = Duration::from_millis(self.ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(at)
    }
}

/// What may end a round early, and who hears how far it got.
pub struct RoundControl<'a> {
    /// Set by another thread to abort ([`TransportError::Cancelled`]).
    pub cancel: &'a AtomicBool,
    /// Abort with [`TransportError::DeadlineReached`] once this instant has passed.
    pub stop_at: Option<Instant>,
    /// Called on the calling thread every [`ROUND_PROGRESS_INTERVAL`] while the round
    /// runs, with the bytes the round has written so far.
    pub on_progress: Option<&'a mut dyn FnMut(u64)>,
    /// The nice value the round's send threads run at, if it is above (yields more than)
    /// the calling thread's (`None`: the caller's). A pre-copy round runs while the guest
    /// does, and its threads can leave the cores to the guest's vCPUs this way; the
    /// calling thread and later rounds keep their priority.
    pub nice: Option<i32>,
}

impl<'a> RoundControl<'a> {
    /// Only a cancel flag: no deadline, no progress reports.
    pub fn cancel_only(cancel: &'a AtomicBool) -> Self {
        RoundControl {
            cancel,
            stop_at: None,
            on_progress: None,
            nice: None,
        }
    }
}

/// What a send worker checks and counts besides its pages.
struct WorkerCtx<'a> {
    cancel: &'a AtomicBool,
    stop_at: Option<Instant>,
    pacer: Option<&'a Pacer>,
    /// Bytes written by every worker of the round so far.
    sent: &'a AtomicU64,
}

impl WorkerCtx<'_> {
    fn check(&self) -> Result<(), TransportError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(TransportError::Cancelled);
        }
        if self.stop_at.is_some_and(|t| Instant::now() >= t) {
            return Err(TransportError::DeadlineReached);
        }
        Ok(())
    }

    /// Sleeps until `at`, looking at the cancel flag and the deadline every [`PACE_POLL`].
    fn wait_until(&self, at: Instant) -> Result<(), TransportError> {
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= at {
                return Ok(());
            }
            std::thread::sleep((at - now).min(PACE_POLL));
        }
    }

    /// Writes `buf` to `conn`, paced under the cap when there is one.
    fn write<W: Write>(&self, conn: &mut W, buf: &[u8]) -> io::Result<Result<(), TransportError>> {
        let Some(pacer) = self.pacer else {
            conn.write_all(buf)?;
            self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
            return Ok(Ok(()));
        };
        for chunk in buf.chunks(PACE_CHUNK_BYTES) {
            if let Err(e) = self.wait_until(pacer.reserve(chunk.len())) {
                return Ok(Err(e));
            }
            conn.write_all(chunk)?;
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(Ok(()))
    }
}

/// What one round moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundSent {
    pub round: u32,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent as zero markers (the target's copy was not zero).
    pub zero_pages_sent: u64,
    /// Pages skipped because both sides' copies are zero.
    pub zero_pages_skipped: u64,
    /// Bytes written to the sockets (headers, descriptors and data).
    pub wire_bytes: u64,
    pub duration: Duration,
}

/// The sum of one round's sends over every connection, from `start` until now; the first
/// failed send fails the round (and, for a lazy `sends`, stops it there).
fn round_total(
    round: u32,
    start: Instant,
    sends: impl IntoIterator<Item = Result<RoundSent, TransportError>>,
) -> Result<RoundSent, TransportError> {
    let mut total = RoundSent {
        round,
        ..Default::default()
    };
    for r in sends {
        let r = r?;
        total.data_pages += r.data_pages;
        total.zero_pages_sent += r.zero_pages_sent;
        total.zero_pages_skipped += r.zero_pages_skipped;
        total.wire_bytes += r.wire_bytes;
    }
    total.duration = start.elapsed();
    Ok(total)
}

/// Sending half: the data connections of one migration.
pub struct MemorySender {
    conns: Vec<Conn>,
    pacer: Option<Pacer>,
}

impl MemorySender {
    /// Takes connected data streams (their `DataHello` already sent).
    pub fn new(conns: Vec<Conn>) -> Self {
        MemorySender { conns, pacer: None }
    }

    /// Caps what all connections together send at `bytes_per_s` (`None` or 0: no cap).
    pub fn with_bandwidth_cap(mut self, bytes_per_s: Option<u64>) -> Self {
        self.pacer = bytes_per_s.and_then(Pacer::new);
        self
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Unblocks any worker stuck in a write (used by cancel).
    pub fn shutdown(&self) {
        for c in &self.conns {
            c.shutdown();
        }
    }

    /// Handles of the connections so another thread can shut them down.
    pub fn shutdown_handles(&self) -> Vec<Conn> {
        self.conns.clone()
    }

    /// Sends the pages in `pages` as round `round`, then a RoundEnd on every connection.
    pub fn send_round(
        &mut self,
        mem: &GuestMem,
        map: &PageMap,
        hashes: &PageHashes,
        pages: &DirtyPages,
        round: u32,
        cancel: &AtomicBool,
    ) -> Result<RoundSent, TransportError> {
        self.send_round_with(
            mem,
            map,
            hashes,
            pages,
            round,
            RoundControl::cancel_only(cancel),
        )
    }

    /// [`MemorySender::send_round`] with a deadline and progress reports (see
    /// [`RoundControl`]).
    pub fn send_round_with(
        &mut self,
        mem: &GuestMem,
        map: &PageMap,
        hashes: &PageHashes,
        pages: &DirtyPages,
        round: u32,
        control: RoundControl<'_>,
    ) -> Result<RoundSent, TransportError> {
        let start = Instant::now();
        let cursor = AtomicUsize::new(0);
        let words = pages.words.len();
        let sent = AtomicU64::new(0);
        let ctx = WorkerCtx {
            cancel: control.cancel,
            stop_at: control.stop_at,
            pacer: self.pacer.as_ref(),
            sent: &sent,
        };
        if pages.count() <= INLINE_ROUND_MAX_PAGES {
            // A small round (the final one, inside the blackout, is most often a handful
            // of pages) goes out from this thread, one connection after the other: the
            // first takes every page, each ends the round. Starting a thread per
            // connection would cost more than the pages (hundreds of µs on a loaded
            // host).
            let sends = self.conns.iter_mut().enumerate().map(|(index, conn)| {
                send_worker(
                    conn, index, mem, map, hashes, pages, words, round, &cursor, &ctx,
                )
            });
            return round_total(round, start, sends);
        }
        let mut on_progress = control.on_progress;
        let nice = control.nice;
        let workers = self.conns.len();
        let results: Vec<Result<RoundSent, TransportError>> = std::thread::scope(|s| {
            // Each worker says when it is done (also when it fails or panics), so the
            // calling thread can report progress meanwhile without delaying the round end.
            let (done_tx, done_rx) = sync_channel::<()>(workers);
            let handles: Vec<_> = self
                .conns
                .iter_mut()
                .enumerate()
                .map(|(index, conn)| {
                    let (cursor, ctx) = (&cursor, &ctx);
                    let done = DoneSignal(done_tx.clone());
                    s.spawn(move || {
                        let _done = done;
                        if let Some(n) = nice {
                            yield_to(n);
                        }
                        send_worker(
                            conn, index, mem, map, hashes, pages, words, round, cursor, ctx,
                        )
                    })
                })
                .collect();
            drop(done_tx);
            if let Some(report) = on_progress.as_mut() {
                let mut finished = 0;
                while finished < workers {
                    match done_rx.recv_timeout(ROUND_PROGRESS_INTERVAL) {
                        Ok(()) => finished += 1,
                        Err(RecvTimeoutError::Timeout) => report(sent.load(Ordering::Relaxed)),
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(TransportError::WorkerPanicked)))
                .collect()
        });
        round_total(round, start, results)
    }

    /// Tells the receiver that no more pages follow and closes the data connections.
    pub fn finish(mut self) -> Result<(), TransportError> {
        for (index, c) in self.conns.iter_mut().enumerate() {
            write_frame(c, Command::EndOfStream, &[])
                .and_then(|_| c.flush().map_err(ProtocolError::from))
                .map_err(|source| TransportError::Protocol { index, source })?;
        }
        Ok(())
    }
}

/// Lowers the calling thread's priority to nice `n` unless it already yields as much (a
/// thread may always lower its own priority; it is never raised here). A failure is
/// logged and the thread runs on as it was.
pub(crate) fn yield_to(n: i32) {
    match crate::kvm::nice() {
        Ok(now) if now >= n => {}
        _ => {
            if let Err(e) = crate::kvm::set_nice(n) {
                tracing::debug!(error = %e, nice = n, "cannot lower a migration thread's priority");
            }
        }
    }
}

/// Sent when a send worker ends, however it ends.
struct DoneSignal(SyncSender<()>);

impl Drop for DoneSignal {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

struct Batch {
    header: PagesHeader,
    /// The data pages: one after the other, or laid out for in-place sealing.
    body: Vec<u8>,
    /// Data pages in `body`.
    data_pages: usize,
    /// `body` is laid out for [`Conn::send_sealed_in_place`].
    sealed: bool,
    payload: Vec<u8>,
}

impl Batch {
    fn new(round: u32, sealed: bool) -> Batch {
        let body_bytes = if sealed {
            SEALED_PAGES_PER_MESSAGE
        } else {
            MAX_PAGES_PER_MESSAGE
        } * PAGE_SIZE;
        Batch {
            header: PagesHeader {
                round,
                pages: Vec::with_capacity(MAX_PAGES_PER_MESSAGE),
            },
            body: Vec::with_capacity(if sealed {
                record::sealed_len(body_bytes)
            } else {
                body_bytes
            }),
            data_pages: 0,
            sealed,
            payload: Vec::new(),
        }
    }

    /// Room for the next data page at the end of `body`: (where `body` ended before, where
    /// the page starts). Truncating to the first drops the page again.
    fn next_page(&mut self) -> (usize, usize) {
        let end = self.body.len();
        let at = if self.sealed {
            record::sealed_offset(self.data_pages * PAGE_SIZE)
        } else {
            end
        };
        self.body.resize(at + PAGE_SIZE, 0);
        (end, at)
    }

    fn flush(
        &mut self,
        conn: &mut Conn,
        index: usize,
        ctx: &WorkerCtx<'_>,
        out: &mut RoundSent,
    ) -> Result<(), TransportError> {
        if self.header.pages.is_empty() {
            return Ok(());
        }
        let perr = |source: ProtocolError| TransportError::Protocol { index, source };
        self.header.encode_into(&mut self.payload);
        let mut msg = Vec::with_capacity(32 + self.payload.len());
        write_frame(&mut msg, Command::Pages, &self.payload).map_err(perr)?;
        let plain = self.data_pages * PAGE_SIZE;
        if self.sealed {
            // Room for the last record's content type and tag.
            self.body.resize(record::sealed_len(plain), 0);
            conn.send_sealed_in_place(&msg, &mut self.body, plain, |w, records| {
                ctx.write(w, records)
            })
            .map_err(|e| perr(e.into()))??;
        } else {
            ctx.write(conn, &msg).map_err(|e| perr(e.into()))??;
            ctx.write(conn, &self.body).map_err(|e| perr(e.into()))??;
        }
        out.wire_bytes += (msg.len() + plain) as u64;
        self.header.pages.clear();
        self.body.clear();
        self.data_pages = 0;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn send_worker(
    conn: &mut Conn,
    index: usize,
    mem: &GuestMem,
    map: &PageMap,
    hashes: &PageHashes,
    pages: &DirtyPages,
    words: usize,
    round: u32,
    cursor: &AtomicUsize,
    ctx: &WorkerCtx<'_>,
) -> Result<RoundSent, TransportError> {
    let mut out = RoundSent {
        round,
        ..Default::default()
    };
    let mut batch = Batch::new(round, conn.seals_in_place());
    let zero_crc = zero_page_crc();
    loop {
        ctx.check()?;
        let first_word = cursor.fetch_add(CLAIM_WORDS, Ordering::Relaxed);
        if first_word >= words {
            break;
        }
        for w in first_word..(first_word + CLAIM_WORDS).min(words) {
            let mut bits = pages.word(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let idx = w * 64 + b;
                let Some(gpa) = map.gpa_of(idx) else {
                    continue;
                };
                // Copy the page straight into the message body; drop it again if zero.
                let (end, at) = batch.next_page();
                let page = &mut batch.body[at..];
                mem.read_slice(page, GuestAddress(gpa))
                    .map_err(|source| TransportError::Memory { gpa, source })?;
                if is_zero(page) {
                    batch.body.truncate(end);
                    if hashes.get(idx) == zero_crc {
                        out.zero_pages_skipped += 1;
                        continue;
                    }
                    hashes.set(idx, zero_crc);
                    batch.header.pages.push(PageDesc::Zero { gpa });
                    out.zero_pages_sent += 1;
                } else {
                    let crc = crc32fast::hash(page);
                    hashes.set(idx, crc);
                    batch.header.pages.push(PageDesc::Data { gpa, crc });
                    batch.data_pages += 1;
                    out.data_pages += 1;
                }
                if batch.header.pages.len() == MAX_PAGES_PER_MESSAGE
                    || (batch.sealed && batch.data_pages == SEALED_PAGES_PER_MESSAGE)
                {
                    batch.flush(conn, index, ctx, &mut out)?;
                }
            }
        }
    }
    batch.flush(conn, index, ctx, &mut out)?;
    let end = RoundEnd {
        round,
        data_pages: out.data_pages,
        zero_pages: out.zero_pages_sent,
    };
    let perr = |source: ProtocolError| TransportError::Protocol { index, source };
    let payload = encode_payload(Command::RoundEnd, &end).map_err(perr)?;
    let mut msg = Vec::new();
    write_frame(&mut msg, Command::RoundEnd, &payload).map_err(perr)?;
    ctx.write(conn, &msg).map_err(|e| perr(e.into()))??;
    conn.flush().map_err(|e| perr(e.into()))?;
    out.wire_bytes += msg.len() as u64;
    Ok(out)
}

/// Rounds of at most this many dirty pages (1 MiB) are sent from the calling thread
/// ([`MemorySender::send_round_with`]), larger ones by one thread per connection.
pub const INLINE_ROUND_MAX_PAGES: usize = 256;

/// Event a receiving data connection reports to its coordinator.
#[derive(Debug)]
pub enum DataEvent {
    RoundEnd { index: usize, end: RoundEnd },
    Finished { index: usize },
    Failed { index: usize, error: TransportError },
}

/// Receives pages on one data connection until EndOfStream, an error, or `stop`.
/// Reports every RoundEnd through `events` (a bounded channel). Touches `heard` on every
/// message; idle at a message boundary, it waits as long as some connection sharing
/// `heard` received something within the connection's read timeout.
pub fn receive_data_connection<E: From<DataEvent>>(
    mut conn: Conn,
    index: usize,
    mem: &GuestMem,
    map: &PageMap,
    hashes: &PageHashes,
    events: &SyncSender<E>,
    heard: &LastHeard,
) {
    let result = receive_loop(&mut conn, index, mem, map, hashes, events, heard);
    let ev = match result {
        Ok(()) => DataEvent::Finished { index },
        Err(error) => DataEvent::Failed { index, error },
    };
    let _ = events.send(ev.into());
}

fn receive_loop<E: From<DataEvent>>(
    conn: &mut Conn,
    index: usize,
    mem: &GuestMem,
    map: &PageMap,
    hashes: &PageHashes,
    events: &SyncSender<E>,
    heard: &LastHeard,
) -> Result<(), TransportError> {
    let perr = |source: ProtocolError| TransportError::Protocol { index, source };
    // The engine's record layer hands pages over where it decrypted them: no body buffer.
    let mut body = if conn.record_layer() == Some(RecordLayer::Direct) {
        Vec::new()
    } else {
        vec![0u8; MAX_PAGES_PER_MESSAGE * PAGE_SIZE]
    };
    let mut stage = vec![0u8; PAGE_SIZE];
    let zero_page = vec![0u8; PAGE_SIZE];
    let zero_crc = zero_page_crc();
    let idle_max = conn.read_timeout().unwrap_or(Duration::MAX);
    loop {
        wait_for_message(conn, heard, idle_max).map_err(|e| perr(e.into()))?;
        // A frame's header and payload arrive whole within the idle limit; a Pages body
        // (paced under a bandwidth cap) counts as progress as it trickles in.
        conn.set_deadline(Instant::now().checked_add(idle_max));
        let frame = read_frame(conn).map_err(perr);
        conn.set_deadline(None);
        let frame = frame?;
        heard.touch();
        match frame.command {
            Command::Pages => {
                let h = PagesHeader::decode(&frame.payload).map_err(perr)?;
                // decode() bounds the count by MAX_PAGES_PER_MESSAGE: the body fits.
                let n = h.data_pages();
                let mut pages = PageWriter {
                    descs: h.pages.iter(),
                    mem,
                    map,
                    hashes,
                    zero_page: &zero_page,
                    zero_crc,
                    index,
                };
                if conn.record_layer() == Some(RecordLayer::Direct) {
                    // Each page straight from the decrypted record it arrived in; a page
                    // split between two records is put together in `stage`.
                    let mut staged = 0;
                    conn.read_exact_with(n * PAGE_SIZE, &mut [0], |mut chunk| {
                        heard.touch();
                        while !chunk.is_empty() {
                            if staged == 0 && chunk.len() >= PAGE_SIZE {
                                let (page, rest) = chunk.split_at(PAGE_SIZE);
                                pages.data(page)?;
                                chunk = rest;
                                continue;
                            }
                            let k = (PAGE_SIZE - staged).min(chunk.len());
                            stage[staged..staged + k].copy_from_slice(&chunk[..k]);
                            staged += k;
                            chunk = &chunk[k..];
                            if staged == PAGE_SIZE {
                                pages.data(&stage)?;
                                staged = 0;
                            }
                        }
                        Ok(())
                    })
                    .map_err(|e| perr(e.into()))??;
                } else {
                    let body = &mut body[..n * PAGE_SIZE];
                    read_body(conn, body, heard).map_err(|e| perr(e.into()))?;
                    for page in body.chunks_exact(PAGE_SIZE) {
                        pages.data(page)?;
                    }
                }
                pages.rest()?;
            }
            Command::RoundEnd => {
                let end: RoundEnd =
                    decode_payload(Command::RoundEnd, &frame.payload).map_err(perr)?;
                if events
                    .send(DataEvent::RoundEnd { index, end }.into())
                    .is_err()
                {
                    return Ok(());
                }
            }
            Command::EndOfStream => return Ok(()),
            other => {
                return Err(perr(ProtocolError::Unexpected {
                    expected: "Pages, RoundEnd or EndOfStream",
                    got: other,
                }))
            }
        }
    }
}

/// Applies one Pages message's descriptors to guest memory, in order: each data page as
/// its bytes arrive ([`PageWriter::data`]), the zero pages before it on the way.
struct PageWriter<'a> {
    descs: std::slice::Iter<'a, PageDesc>,
    mem: &'a GuestMem,
    map: &'a PageMap,
    hashes: &'a PageHashes,
    zero_page: &'a [u8],
    zero_crc: u32,
    index: usize,
}

impl PageWriter<'_> {
    /// The next data page's bytes: checked against its CRC and written, after the zero
    /// pages listed before it.
    fn data(&mut self, page: &[u8]) -> Result<(), TransportError> {
        loop {
            let Some(&desc) = self.descs.next() else {
                return Err(self.mismatch()); // the body's length is the data pages' count
            };
            let gpa = desc.gpa();
            let idx = self
                .map
                .index_of(gpa)
                .ok_or(TransportError::OutsideMemory { gpa })?;
            match desc {
                PageDesc::Data { crc, .. } => {
                    if crc32fast::hash(page) != crc {
                        return Err(TransportError::Protocol {
                            index: self.index,
                            source: ProtocolError::PageChecksum { gpa },
                        });
                    }
                    self.mem
                        .write_slice(page, GuestAddress(gpa))
                        .map_err(|source| TransportError::Memory { gpa, source })?;
                    self.hashes.set(idx, crc);
                    return Ok(());
                }
                PageDesc::Zero { .. } => self.zero(idx, gpa)?,
            }
        }
    }

    fn zero(&self, idx: usize, gpa: u64) -> Result<(), TransportError> {
        if self.hashes.get(idx) != self.zero_crc {
            self.mem
                .write_slice(self.zero_page, GuestAddress(gpa))
                .map_err(|source| TransportError::Memory { gpa, source })?;
            self.hashes.set(idx, self.zero_crc);
        }
        Ok(())
    }

    /// The zero pages after the last data page.
    fn rest(&mut self) -> Result<(), TransportError> {
        while let Some(&desc) = self.descs.next() {
            let PageDesc::Zero { gpa } = desc else {
                return Err(self.mismatch()); // the body held every data page: unreachable
            };
            let idx = self
                .map
                .index_of(gpa)
                .ok_or(TransportError::OutsideMemory { gpa })?;
            self.zero(idx, gpa)?;
        }
        Ok(())
    }

    fn mismatch(&self) -> TransportError {
        TransportError::Protocol {
            index: self.index,
            source: ProtocolError::Unexpected {
                expected: "as many data page descriptors as pages in the body",
                got: Command::Pages,
            },
        }
    }
}

/// `read_exact`, touching `heard` whenever bytes arrive (a paced 4 MiB message trickles in).
fn read_body(conn: &mut Conn, body: &mut [u8], heard: &LastHeard) -> io::Result<()> {
    let mut at = 0;
    while at < body.len() {
        match conn.read(&mut body[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                at += n;
                heard.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits (without consuming anything) until `conn` has a byte to read or is closed. A
/// read timeout here, at a message boundary, is only an error when no connection sharing
/// `heard` has received anything within `idle_max` either.
fn wait_for_message(conn: &Conn, heard: &LastHeard, idle_max: Duration) -> io::Result<()> {
    loop {
        match conn.wait_readable() {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && heard.elapsed() < idle_max => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::test_pki::TestCa;
    use crate::migration::tls::{MigrationTls, Transport};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc::sync_channel;

    fn mem(mib: usize) -> GuestMem {
        GuestMem::from_ranges(&[
            (GuestAddress(0), mib << 19),
            (GuestAddress(1 << 32), mib << 19),
        ])
        .unwrap()
    }

    fn fill(m: &GuestMem, map: &PageMap, seed: u64, every: usize) {
        for i in (0..map.total_pages()).step_by(every) {
            let gpa = map.gpa_of(i).unwrap();
            let v = seed ^ (i as u64).wrapping_mul(0x9e37_79b9);
            m.write_obj(v | 1, GuestAddress(gpa + 8)).unwrap();
        }
    }

    fn pair(n: usize) -> (Vec<Conn>, Vec<Conn>) {
        let l = TcpListener::bind("127.0.2.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..n {
            a.push(Conn::plain(TcpStream::connect(addr).unwrap()));
            b.push(Conn::plain(l.accept().unwrap().0));
        }
        (a, b)
    }

    #[test]
    fn page_map_round_trips_addresses() {
        let m = mem(2);
        let map = PageMap::from_memory(&m);
        assert_eq!(map.total_pages(), 512);
        assert_eq!(map.gpa_of(256), Some(1 << 32));
        assert_eq!(map.index_of((1 << 32) + 4096 * 3 + 5), Some(259));
        assert_eq!(map.index_of(1 << 31), None);
        assert_eq!(map.gpa_of(512), None);
    }

    /// `n` TLS connections: (sending ends, receiving ends), each end with its record layer.
    fn tls_pair(
        n: usize,
        sender: &MigrationTls,
        receiver: &MigrationTls,
    ) -> (Vec<Conn>, Vec<Conn>) {
        let l = TcpListener::bind("127.0.2.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = Transport::Tls(receiver.clone());
        let acceptor = std::thread::spawn(move || {
            (0..n)
                .map(|_| {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    Conn::accept(l.accept().unwrap().0, &server, deadline).unwrap()
                })
                .collect::<Vec<_>>()
        });
        let t = Duration::from_secs(10);
        let client = Transport::Tls(sender.clone());
        let a = (0..n)
            .map(|_| Conn::connect(&client, None, addr, t, t).unwrap())
            .collect();
        (a, acceptor.join().unwrap())
    }

    #[test]
    fn two_guest_mems_over_loopback_converge_to_identical_content() {
        converge_over(pair(4));
    }

    /// Over TLS, with the engine's record layer on both ends (pages sealed in place and
    /// read from the decrypted records), and with rustls' on either end (the engine's
    /// receiver then puts together pages split between records).
    #[test]
    fn two_guest_mems_converge_over_every_tls_record_layer() {
        let ca = TestCa::new("transport tests CA");
        let node = ca.node("transport-node", &["127.0.2.1".parse().unwrap()]);
        let direct = MigrationTls::from_pem(
            ca.ca_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .unwrap();
        let rustls_records = direct.with_rustls_records();
        for (sender, receiver, layers) in [
            (&direct, &direct, (RecordLayer::Direct, RecordLayer::Direct)),
            (
                &rustls_records,
                &direct,
                (RecordLayer::Rustls, RecordLayer::Direct),
            ),
            (
                &direct,
                &rustls_records,
                (RecordLayer::Direct, RecordLayer::Rustls),
            ),
        ] {
            let (a, b) = tls_pair(4, sender, receiver);
            assert_eq!(
                (a[0].record_layer(), b[0].record_layer()),
                (Some(layers.0), Some(layers.1))
            );
            converge_over((a, b));
        }
    }

    fn converge_over((a, b): (Vec<Conn>, Vec<Conn>)) {
        let src = mem(8);
        let dst = mem(8);
        let map = PageMap::from_memory(&src);
        fill(&src, &map, 1, 3);
        let send_hashes = PageHashes::new_zeroed(map.total_pages());
        let recv_hashes = PageHashes::new_zeroed(map.total_pages());
        let (tx, rx) = sync_channel::<DataEvent>(16);
        let cancel = AtomicBool::new(false);
        let heard = LastHeard::default();
        std::thread::scope(|s| {
            for (i, c) in b.into_iter().enumerate() {
                let (dst, map, h, tx, heard) = (&dst, &map, &recv_hashes, tx.clone(), &heard);
                s.spawn(move || receive_data_connection(c, i, dst, map, h, &tx, heard));
            }
            drop(tx);
            let mut sender = MemorySender::new(a);
            let r0 = sender
                .send_round(
                    &src,
                    &map,
                    &send_hashes,
                    &DirtyPages::all(map.total_pages()),
                    0,
                    &cancel,
                )
                .unwrap();
            assert_eq!(r0.data_pages as usize, map.total_pages().div_ceil(3));
            assert_eq!(
                r0.zero_pages_skipped as usize,
                map.total_pages() - map.total_pages().div_ceil(3)
            );
            // Round barrier (the engine's RoundAck): every connection ended round 0, so
            // no round-0 page can overtake a round-1 page of another connection.
            for _ in 0..4 {
                assert!(matches!(
                    rx.recv().unwrap(),
                    DataEvent::RoundEnd { end, .. } if end.round == 0
                ));
            }
            // Round 1: change some pages, zero one that had data.
            let mut dirty = DirtyPages::empty(map.total_pages());
            fill(&src, &map, 2, 5);
            for i in (0..map.total_pages()).step_by(5) {
                dirty.set(i);
            }
            src.write_slice(&[0u8; PAGE_SIZE], GuestAddress(map.gpa_of(3).unwrap()))
                .unwrap();
            dirty.set(3);
            let r1 = sender
                .send_round(&src, &map, &send_hashes, &dirty, 1, &cancel)
                .unwrap();
            assert_eq!(r1.zero_pages_sent, 1);
            // Round 2, small (like a final round): sent from this thread, still ended on
            // every connection.
            let mut few = DirtyPages::empty(map.total_pages());
            fill(&src, &map, 3, 700);
            for i in (0..map.total_pages()).step_by(700) {
                few.set(i);
            }
            assert!(few.count() <= INLINE_ROUND_MAX_PAGES);
            let r2 = sender
                .send_round(&src, &map, &send_hashes, &few, 2, &cancel)
                .unwrap();
            assert_eq!(r2.data_pages as usize, few.count());
            sender.finish().unwrap();
            let mut ends = 0;
            let mut finished = 0;
            for ev in rx.iter() {
                match ev {
                    DataEvent::RoundEnd { .. } => ends += 1,
                    DataEvent::Finished { .. } => finished += 1,
                    DataEvent::Failed { error, .. } => panic!("{error}"),
                }
            }
            assert_eq!((ends, finished), (8, 4));
        });
        let ds = PageHashes::digest_of_memory(&src, &map).unwrap();
        let dd = PageHashes::digest_of_memory(&dst, &map).unwrap();
        assert_eq!(ds, dd);
        assert_eq!(send_hashes.digest(), ds);
        assert_eq!(recv_hashes.digest(), dd);
    }

    /// The nice values of this process's threads now.
    fn thread_nices() -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue; // the thread ended meanwhile
            };
            // After the ")" that ends the name: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            out.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
        }
        out
    }

    #[test]
    fn a_round_with_a_nice_value_runs_its_send_threads_there_and_leaves_the_caller_alone() {
        // 17: a value no other test of this binary uses.
        const NICE: i32 = 17;
        // Two claims of pages (one per send thread), 1 MiB of data in all.
        let src = mem(32);
        let dst = mem(32);
        let map = PageMap::from_memory(&src);
        fill(&src, &map, 7, 32);
        let (a, b) = pair(2);
        let hashes = PageHashes::new_zeroed(map.total_pages());
        let recv_hashes = PageHashes::new_zeroed(map.total_pages());
        let (tx, rx) = sync_channel::<DataEvent>(16);
        let cancel = AtomicBool::new(false);
        let heard = LastHeard::default();
        let caller_before = crate::kvm::nice().unwrap();
        assert!(caller_before < NICE);
        let mut seen_at_nice = 0;
        std::thread::scope(|s| {
            for (i, c) in b.into_iter().enumerate() {
                let (dst, map, h, tx, heard) = (&dst, &map, &recv_hashes, tx.clone(), &heard);
                s.spawn(move || receive_data_connection(c, i, dst, map, h, &tx, heard));
            }
            drop(tx);
            // 1 MiB of pages at 1 MiB/s: the round lasts long enough for progress reports,
            // which look at the threads while it runs.
            let mut sender =
                MemorySender::new(a).with_bandwidth_cap(Some(BANDWIDTH_BYTES_PER_S_MIN));
            let mut look = |_: u64| {
                seen_at_nice =
                    seen_at_nice.max(thread_nices().iter().filter(|n| **n == NICE).count());
            };
            let control = RoundControl {
                on_progress: Some(&mut look),
                nice: Some(NICE),
                ..RoundControl::cancel_only(&cancel)
            };
            let all = DirtyPages::all(map.total_pages());
            let r = sender
                .send_round_with(&src, &map, &hashes, &all, 0, control)
                .unwrap();
            assert_eq!(r.data_pages as usize, map.total_pages() / 32);
            assert_eq!(
                crate::kvm::nice().unwrap(),
                caller_before,
                "the caller keeps its priority"
            );
            sender.finish().unwrap();
            for _ in 0..4 {
                rx.recv().unwrap();
            }
        });
        assert_eq!(seen_at_nice, 2, "both send threads ran at nice {NICE}");
    }

    #[test]
    fn corrupted_page_is_rejected_by_receiver() {
        let dst = mem(1);
        let map = PageMap::from_memory(&dst);
        let (mut a, mut b) = pair(1);
        let h = PagesHeader {
            round: 0,
            pages: vec![PageDesc::Data { gpa: 0, crc: 1234 }],
        };
        let mut p = Vec::new();
        h.encode_into(&mut p);
        write_frame(&mut a[0], Command::Pages, &p).unwrap();
        a[0].write_all(&[7u8; PAGE_SIZE]).unwrap();
        let hashes = PageHashes::new_zeroed(map.total_pages());
        let (tx, rx) = sync_channel::<DataEvent>(4);
        receive_data_connection(
            b.remove(0),
            0,
            &dst,
            &map,
            &hashes,
            &tx,
            &LastHeard::default(),
        );
        match rx.recv().unwrap() {
            DataEvent::Failed { error, .. } => {
                let chain = format!("{error}: {}", std::error::Error::source(&error).unwrap());
                assert!(chain.contains("checksum"), "{chain}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Nothing was written.
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
    }

    #[test]
    fn page_outside_memory_is_rejected() {
        let dst = mem(1);
        let map = PageMap::from_memory(&dst);
        let (mut a, mut b) = pair(1);
        let h = PagesHeader {
            round: 0,
            pages: vec![PageDesc::Zero { gpa: 1 << 40 }],
        };
        let mut p = Vec::new();
        h.encode_into(&mut p);
        write_frame(&mut a[0], Command::Pages, &p).unwrap();
        let hashes = PageHashes::new_zeroed(map.total_pages());
        let (tx, rx) = sync_channel::<DataEvent>(4);
        receive_data_connection(
            b.remove(0),
            0,
            &dst,
            &map,
            &hashes,
            &tx,
            &LastHeard::default(),
        );
        assert!(matches!(
            rx.recv().unwrap(),
            DataEvent::Failed {
                error: TransportError::OutsideMemory { .. },
                ..
            }
        ));
    }
}
