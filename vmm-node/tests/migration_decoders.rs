//! Every decoder of migration network input, fed random and mutated bytes: it never
//! panics, and never allocates more than the protocol's caps allow — measured with a
//! counting allocator (the largest single allocation made on the decoding thread), not
//! assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;

use proptest::prelude::*;
use vmm_node::migration::protocol::*;

/// Records the largest allocation of the current thread while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only thread-locals
// with const initializers (no allocation inside the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the largest allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, LARGEST.with(Cell::get))
}

/// What a frame decoder may allocate for `input` bytes: the up-front payload chunk
/// (64 KiB), or about what arrived (a `Vec` grows to at most twice its content), plus
/// the error message.
fn frame_allowance(input: usize) -> usize {
    (64 << 10).max(2 * input) + 4096
}

fn header(command: u16, payload_len: u32, version: u16) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&command.to_le_bytes());
    b[12..16].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Most a list inside an authorized session's Setup may preallocate (bincode's cautious
/// 1 MiB for a length prefix it cannot check before reading the items), plus slack.
const SETUP_LIST_ALLOWANCE: usize = (1 << 20) + 4096;

/// Decodes `bytes` with every payload decoder but Setup's, as the target would.
fn decode_all(bytes: &[u8]) {
    let _ = PagesHeader::decode(bytes);
    if let Ok(h) = decode_payload::<Hello>(Command::Hello, bytes) {
        let _ = h.validate();
    }
    let _ = decode_payload::<Welcome>(Command::Welcome, bytes);
    let _ = decode_payload::<DataHello>(Command::DataHello, bytes);
    let _ = decode_payload::<RoundEnd>(Command::RoundEnd, bytes);
    let _ = decode_payload::<RoundAck>(Command::RoundAck, bytes);
    let _ = decode_payload::<Running>(Command::Running, bytes);
    let _ = decode_payload::<Receipt>(Command::Receipt, bytes);
    let _ = decode_payload::<StatePayload>(Command::State, bytes);
    let _ = decode_reason(bytes);
}

/// A header announcing the largest payload (64 MiB of Setup or State) followed by a few
/// bytes allocates about those bytes, not 64 MiB; before authorization such a frame is
/// refused at its header.
#[test]
fn an_announced_payload_is_not_allocated_before_it_arrives() {
    for command in [
        Command::Setup,
        Command::State,
        Command::Pages,
        Command::Cancel,
    ] {
        let max = command.max_payload_bytes();
        let mut input = header(command as u16, max, PROTOCOL_VERSION).to_vec();
        input.extend([0u8; 100]);
        let (r, largest) = largest_alloc(|| read_frame(&mut Cursor::new(&input)));
        assert!(r.is_err(), "{command:?}");
        assert!(
            largest <= frame_allowance(input.len()),
            "{command:?}: {largest} bytes allocated for a {max}-byte announcement"
        );
        let (r, largest) = largest_alloc(|| {
            read_frame_of(
                &mut Cursor::new(&input),
                &[Command::Hello, Command::DataHello],
            )
        });
        assert!(
            matches!(r, Err(ProtocolError::Unexpected { .. })),
            "{command:?}: {r:?}"
        );
        assert!(
            largest <= 4096,
            "{command:?}: {largest} bytes before authorization"
        );
    }
}

/// Length prefixes inside payloads (a VM name, a ticket, a state blob claiming gigabytes)
/// cannot make a decoder allocate beyond the payload it has; Setup's lists (CPU features,
/// disks: authorized sessions only) stay within bincode's 1 MiB preallocation cap.
#[test]
fn length_prefixes_inside_payloads_are_bounded_by_the_payload() {
    for claimed in [u64::MAX, 1 << 40, 64 << 20, 1 << 20] {
        for at in [0, 8, 16] {
            let mut p = vec![1u8; at];
            p.extend(claimed.to_le_bytes());
            p.extend([b'a'; 32]);
            let (_, largest) = largest_alloc(|| decode_all(&p));
            assert!(
                largest <= frame_allowance(p.len()),
                "claimed {claimed} at {at}: {largest} bytes"
            );
            let (_, largest) =
                largest_alloc(|| decode_payload::<Setup>(Command::Setup, &p).is_ok());
            assert!(largest <= SETUP_LIST_ALLOWANCE, "Setup: {largest} bytes");
        }
    }
}

fn commands() -> impl Strategy<Value = u16> {
    prop_oneof![1u16..=17, any::<u16>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes through every decoder: no panic, allocation bounded.
    #[test]
    fn random_bytes_never_panic_or_overallocate(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (_, largest) = largest_alloc(|| {
            let mut c = Cursor::new(&bytes);
            while read_frame(&mut c).is_ok() {}
            decode_all(&bytes);
        });
        prop_assert!(largest <= frame_allowance(bytes.len()), "{} bytes", largest);
        let (_, largest) = largest_alloc(|| decode_payload::<Setup>(Command::Setup, &bytes).is_ok());
        prop_assert!(largest <= SETUP_LIST_ALLOWANCE, "Setup: {} bytes", largest);
    }

    /// Valid headers (any command, length up to the caps and beyond, old and new
    /// versions) with random payload bytes: no panic, allocation bounded by what arrived.
    #[test]
    fn valid_headers_with_random_payloads(
        command in commands(),
        len in prop_oneof![0u32..512, any::<u32>()],
        version in prop_oneof![Just(PROTOCOL_VERSION), Just(1u16), any::<u16>()],
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut input = header(command, len, version).to_vec();
        input.extend(&body);
        let (r, largest) = largest_alloc(|| {
            let r = read_frame(&mut Cursor::new(&input));
            if let Ok(f) = &r {
                decode_all(&f.payload);
            }
            r
        });
        prop_assert!(largest <= frame_allowance(input.len()), "{} bytes", largest);
        if let Ok(f) = r {
            prop_assert!(f.payload.len() as u64 <= u64::from(len));
        }
    }

    /// Mutations of valid frames (a bit flipped, cut, extended): no panic, and a frame
    /// whose checksummed bytes changed is never accepted as the original.
    #[test]
    fn mutated_valid_frames(
        vm in "[a-z]{1,300}",
        ticket in proptest::collection::vec(any::<u8>(), 0..100),
        connections in any::<u16>(),
        flip in any::<usize>(),
        bit in 0u8..8,
        cut in any::<usize>(),
    ) {
        let hello = Hello { vm_name: vm, ticket, connections };
        let p = encode_payload(Command::Hello, &hello);
        prop_assume!(p.is_ok());
        let p = p.unwrap();
        let mut f = Vec::new();
        prop_assume!(write_frame(&mut f, Command::Hello, &p).is_ok());
        // The bounds of every field are checked after decoding.
        let back: Hello = decode_payload(Command::Hello, &read_frame(&mut Cursor::new(&f)).unwrap().payload).unwrap();
        let valid = back.validate().is_ok();
        prop_assert_eq!(valid, (1..=16).contains(&usize::from(back.connections))
            && back.vm_name.len() <= 255 && back.ticket.len() <= 64);
        let mut flipped = f.clone();
        let i = flip % flipped.len();
        flipped[i] ^= 1 << bit;
        let (r, largest) = largest_alloc(|| read_frame_of(&mut Cursor::new(&flipped), &[Command::Hello, Command::DataHello]));
        prop_assert!(largest <= frame_allowance(flipped.len()));
        if let Ok(fr) = r {
            prop_assert!(fr.payload != p || fr.command != Command::Hello, "a flipped bit went unnoticed");
        }
        let cut = &f[..cut % (f.len() + 1)];
        let r = read_frame(&mut Cursor::new(cut));
        prop_assert!(r.is_err() == (cut.len() < f.len()));
    }
}
