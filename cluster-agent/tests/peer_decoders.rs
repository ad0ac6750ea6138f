//! Every decoder of peer-plane network input, fed random and mutated bytes: Raft
//! requests (append-entries with their `Command` entry payloads and membership configs,
//! votes, snapshot chunks), forwarded writes, heartbeats and snapshot blobs. None panics,
//! each checks its size limit before decoding, and what it allocates stays within a
//! linear bound of its input — measured with a counting allocator (the largest single
//! allocation made on the decoding thread), not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster_agent::api::peer::client::{decode, PeerError, PEER_MESSAGE_LEN_MAX};
use cluster_agent::node::liveness::{Liveness, Timing};
use cluster_agent::node::ForwardRequest;
use cluster_agent::raft::store::{decode_snapshot, SnapshotPayload, SNAPSHOT_LEN_MAX};
use cluster_agent::raft::{PeerNode, TypeConfig};
use cluster_agent::state::join_tokens::TokenCommand;
use cluster_agent::state::revocations::{Revocation, RevocationCommand};
use cluster_agent::state::vms::VmCommand;
use cluster_agent::state::{Command, NodeState};
use cluster_proto::raft::HeartbeatRequest;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
use proptest::prelude::*;
use prost::Message;

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

/// What decoding `input` bytes may allocate at once. JSON and protobuf carry no length
/// prefix a decoder trusts: every element of a list costs at least two input bytes and
/// is at most a few hundred bytes in memory, and a `Vec` grows to at most twice its
/// content; plus the error message. Linear in the input, which the size limit bounds.
fn allowance(input: usize) -> usize {
    256 * input + 16 * 1024
}

fn log_id(term: u64, node: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

/// One of each kind of replicated command a leader appends.
fn commands() -> Vec<Command> {
    vec![
        Command::PutKv {
            key: "k".into(),
            value: "v".repeat(40),
        },
        Command::DeleteKv { key: "k".into() },
        Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 5,
            reason: "silent".into(),
        },
        Command::RegisterNode {
            registration: cluster_agent::state::fixtures::registration(3, Default::default()),
            at_unix_ms: 6,
        },
        Command::RemoveNode {
            node_id: 3,
            at_unix_ms: 7,
        },
        Command::NodeFenced {
            node_id: 2,
            vms: vec!["a".into(), "b".into()],
            reason: "lease lapsed".into(),
            at_unix_ms: 8,
        },
        Command::Vm(VmCommand::StartMigration {
            name: "vm".into(),
            to: 2,
            at_unix_ms: 9,
            quick: false,
            max_downtime_ms: Some(300),
            deadline_ms: None,
            bandwidth_bytes_per_s_max: Some(1 << 20),
            predicted: None,
        }),
        Command::Vm(VmCommand::StopVm {
            name: "vm".into(),
            at_unix_ms: 10,
        }),
        Command::Token(TokenCommand::Create {
            id: "abc".into(),
            secret_sha256: "0".repeat(64),
            expires_unix_ms: 100,
            at_unix_ms: 11,
        }),
        Command::Revocation(RevocationCommand::Revoke(Revocation {
            user: "bob".into(),
            role: String::new(),
            cert_sha256: None,
            expires_unix_ms: 1_000,
            at_unix_ms: 12,
            by: "admin".into(),
        })),
    ]
}

fn membership() -> Membership<u64, PeerNode> {
    let nodes: BTreeMap<u64, PeerNode> = (1..=3)
        .map(|id| {
            (
                id,
                PeerNode {
                    raft_addr: format!("127.0.1.{id}:7002"),
                    mgmt_addr: format!("127.0.1.{id}:7001"),
                },
            )
        })
        .collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

/// A valid append-entries request carrying every kind of entry.
fn append_entries() -> AppendEntriesRequest<TypeConfig> {
    let mut entries: Vec<Entry<TypeConfig>> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: log_id(3, 1, 11 + i as u64),
            payload: EntryPayload::Normal(c),
        })
        .collect();
    entries.push(Entry {
        log_id: log_id(3, 1, 30),
        payload: EntryPayload::Membership(membership()),
    });
    entries.push(Entry {
        log_id: log_id(3, 1, 31),
        payload: EntryPayload::Blank,
    });
    AppendEntriesRequest {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(3, 1, 10)),
        entries,
        leader_commit: Some(log_id(3, 1, 9)),
    }
}

fn snapshot_blob() -> Vec<u8> {
    let mut state = cluster_agent::state::fixtures::cluster(3, |_| Default::default());
    for c in commands() {
        state.apply(&c);
    }
    let payload = SnapshotPayload {
        format_version: cluster_agent::raft::store::SNAPSHOT_FORMAT_VERSION,
        last_applied: Some(log_id(3, 1, 40)),
        membership: openraft::StoredMembership::new(Some(log_id(3, 1, 30)), membership()),
        state,
    };
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// The valid encodings of every peer request kind (JSON payloads).
fn valid_payloads() -> Vec<Vec<u8>> {
    let vote: VoteRequest<u64> = VoteRequest {
        vote: Vote::new(4, 2),
        last_log_id: Some(log_id(3, 1, 31)),
    };
    let snap: InstallSnapshotRequest<TypeConfig> = InstallSnapshotRequest {
        vote: Vote::new_committed(3, 1),
        meta: openraft::SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 40)),
            last_membership: openraft::StoredMembership::new(Some(log_id(3, 1, 30)), membership()),
            snapshot_id: "3-1-40".into(),
        },
        offset: 0,
        data: snapshot_blob()[..64].to_vec(),
        done: false,
    };
    let mut v = vec![
        serde_json::to_vec(&append_entries()).unwrap_or_default(),
        serde_json::to_vec(&vote).unwrap_or_default(),
        serde_json::to_vec(&snap).unwrap_or_default(),
        serde_json::to_vec(&ForwardRequest::Remove { node_id: 3 }).unwrap_or_default(),
    ];
    for c in commands() {
        v.push(serde_json::to_vec(&ForwardRequest::Command(c)).unwrap_or_default());
    }
    v
}

/// Decodes `bytes` as every peer request and the snapshot blob, as the agent would.
fn decode_all(bytes: &[u8]) {
    let _ = decode::<AppendEntriesRequest<TypeConfig>>("peer", "append_entries", bytes);
    let _ = decode::<VoteRequest<u64>>("peer", "vote", bytes);
    let _ = decode::<InstallSnapshotRequest<TypeConfig>>("peer", "install_snapshot", bytes);
    let _ = decode::<ForwardRequest>("peer", "forward", bytes);
    let _ = decode::<Command>("peer", "entry payload", bytes);
    let _ = decode_snapshot(bytes);
}

/// Decodes `bytes` as a heartbeat and hands it to liveness, as the agent would.
fn heartbeat(bytes: &[u8], liveness: &mut Liveness) {
    if let Ok(hb) = HeartbeatRequest::decode(bytes) {
        liveness.heard(
            &cluster_agent::api::peer::server::heartbeat_from_pb(&hb),
            Instant::now(),
        );
    }
}

#[test]
fn the_valid_encodings_decode() {
    let ae = serde_json::to_vec(&append_entries()).unwrap_or_default();
    let back: AppendEntriesRequest<TypeConfig> =
        decode("peer", "append_entries", &ae).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.entries.len(), commands().len() + 2);
    let s = decode_snapshot(&snapshot_blob()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.state.nodes.len(), 2, "three registered, one removed");
    for v in valid_payloads() {
        let (_, largest) = largest_alloc(|| decode_all(&v));
        assert!(
            largest <= allowance(v.len()),
            "{largest} for {} bytes",
            v.len()
        );
    }
}

/// The size limit is checked before decoding: a payload over it is refused without
/// anything of its size allocated (the buffers below are zeroed lazily by the kernel).
#[test]
fn payloads_over_the_size_limit_are_refused_before_decoding() {
    let p = vec![b' '; PEER_MESSAGE_LEN_MAX + 1];
    let (r, largest) =
        largest_alloc(|| decode::<AppendEntriesRequest<TypeConfig>>("peer", "append", &p));
    assert!(matches!(r, Err(PeerError::TooLarge { .. })), "{r:?}");
    assert!(largest <= 4096, "{largest} bytes allocated");
    let blob = vec![0u8; SNAPSHOT_LEN_MAX + 1];
    let (r, largest) = largest_alloc(|| decode_snapshot(&blob).map(|_| ()));
    let e = r.expect_err("an oversized snapshot");
    assert!(e.contains("the limit is"), "{e}");
    assert!(largest <= 4096, "{largest} bytes allocated");
    // A snapshot of another format version is refused by name.
    let mut other: serde_json::Value = serde_json::from_slice(&snapshot_blob()).unwrap_or_default();
    other["format_version"] = 99.into();
    let e = decode_snapshot(&serde_json::to_vec(&other).unwrap_or_default())
        .map(|_| ())
        .expect_err("another format");
    assert!(e.contains("format version 99"), "{e}");
}

/// A member's heartbeat cannot grow another node's memory: reports about nodes that are
/// not members are not kept, whatever the heartbeat lists.
#[test]
fn a_heartbeat_listing_many_nodes_keeps_one_report_per_member() {
    let mut l = Liveness::new(
        1,
        Timing::new(Duration::from_millis(100), Duration::from_secs(1)),
    );
    l.set_members(vec![1, 2, 3]);
    let hb = HeartbeatRequest {
        node_id: 2,
        incarnation: 1,
        demand: None,
        silences: (0..100_000)
            .map(|i| cluster_proto::raft::PeerSilence {
                node_id: 1_000 + i,
                silent_ms: 60_000,
            })
            .chain([cluster_proto::raft::PeerSilence {
                node_id: 3,
                silent_ms: 60_000,
            }])
            .collect(),
    };
    heartbeat(&hb.encode_to_vec(), &mut l);
    // Node 2's report about node 3 is kept; the 100,000 strangers are not.
    assert_eq!(l.reported_entries(), 1);
}

/// One mutation of `v`: a flipped bit, a cut, a duplicated or deleted run, an inserted
/// byte.
fn mutate(v: &[u8], kind: u8, at: usize, len: usize, byte: u8) -> Vec<u8> {
    let mut m = v.to_vec();
    if m.is_empty() {
        return vec![byte];
    }
    let i = at % m.len();
    let n = (len % 64).min(m.len() - i);
    match kind % 5 {
        0 => m[i] ^= 1 << (byte % 8),
        1 => m.truncate(i),
        2 => {
            let run = m[i..i + n].to_vec();
            m.splice(i..i, run);
        }
        3 => {
            m.drain(i..i + n);
        }
        _ => m.insert(i, byte),
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_nor_allocate_beyond_their_size(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let (_, largest) = largest_alloc(|| decode_all(&bytes));
        prop_assert!(largest <= allowance(bytes.len()), "{} for {} bytes", largest, bytes.len());
        let mut l = Liveness::new(1, Timing::new(Duration::from_millis(100), Duration::from_secs(1)));
        l.set_members(vec![1, 2, 3]);
        let (_, largest) = largest_alloc(|| heartbeat(&bytes, &mut l));
        prop_assert!(largest <= allowance(bytes.len()));
    }

    #[test]
    fn mutated_valid_encodings_never_panic_nor_allocate_beyond_their_size(
        which in any::<usize>(),
        mutations in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let valid = valid_payloads();
        let mut v = valid[which % valid.len()].clone();
        if which % 7 == 0 {
            v = snapshot_blob();
        }
        for (kind, at, len, byte) in mutations {
            v = mutate(&v, kind, at, len, byte);
        }
        let (_, largest) = largest_alloc(|| decode_all(&v));
        prop_assert!(largest <= allowance(v.len()), "{} for {} bytes", largest, v.len());
    }

    #[test]
    fn mutated_heartbeats_never_panic_and_keep_only_members(
        silences in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..64),
        mutations in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>()), 0..4),
    ) {
        let hb = HeartbeatRequest {
            node_id: 2,
            incarnation: 7,
            demand: None,
            silences: silences
                .iter()
                .map(|(n, s)| cluster_proto::raft::PeerSilence { node_id: *n, silent_ms: *s })
                .collect(),
        };
        let mut v = hb.encode_to_vec();
        for (kind, at, len, byte) in mutations {
            v = mutate(&v, kind, at, len, byte);
        }
        let mut l = Liveness::new(1, Timing::new(Duration::from_millis(100), Duration::from_secs(1)));
        l.set_members(vec![1, 2, 3]);
        let (_, largest) = largest_alloc(|| heartbeat(&v, &mut l));
        prop_assert!(largest <= allowance(v.len()));
        prop_assert!(l.reported_entries() <= 3);
    }
}
