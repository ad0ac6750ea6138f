//! Property tests of the lock table over random command sequences.
//!
//! Invariants checked after every step:
//! - never two write owners (exclusive ⇒ one holder, shared ⇒ ≥ 1 holder);
//! - a new lock epoch (new lock, handoff, takeover, change of mode: anything but
//!   readers joining or leaving a shared lock) gets a token
//!   strictly greater than every token the disk ever had; otherwise the token stays;
//! - release by a non-owner is refused;
//! - takeover succeeds only when every holder is Down, handoff only by the owner;
//! - a refused command changes nothing;
//! - apply is deterministic (replaying from a clone gives equal tables and results)
//!   and the table survives a snapshot round trip.

use std::collections::{BTreeMap, BTreeSet};

use csv_volume::{
    ApplyContext, DiskName, LockCommand, LockError, LockMode, LockOutcome, LockTable, NodeId,
};
use proptest::prelude::*;

const DISKS: [&str; 3] = ["v/a.img", "v/b.img", "w/dir/c.img"];

fn disk(i: usize) -> DiskName {
    DiskName::parse(DISKS[i]).unwrap()
}

fn mode() -> impl Strategy<Value = LockMode> {
    prop_oneof![Just(LockMode::Exclusive), Just(LockMode::Shared)]
}

fn command() -> impl Strategy<Value = LockCommand> {
    let d = (0..DISKS.len()).prop_map(disk);
    let n = 1u64..=4;
    prop_oneof![
        4 => (d.clone(), n.clone(), mode()).prop_map(|(disk, node, mode)| LockCommand::Acquire { disk, node, mode }),
        3 => (d.clone(), n.clone()).prop_map(|(disk, node)| LockCommand::Release { disk, node }),
        2 => (d.clone(), n.clone(), n.clone()).prop_map(|(disk, from, to)| LockCommand::Handoff { disk, from, to }),
        2 => (d.clone(), n.clone(), mode()).prop_map(|(disk, node, mode)| LockCommand::ForceTakeover { disk, node, mode }),
        3 => (d.clone(), n.clone(), n.clone()).prop_map(|(disk, from, to)| LockCommand::ReserveHandoff { disk, from, to }),
        3 => (d.clone(), n.clone(), n.clone()).prop_map(|(disk, from, to)| LockCommand::CompleteHandoff { disk, from, to }),
        1 => (d.clone(), n.clone(), n.clone()).prop_map(|(disk, from, to)| LockCommand::CancelHandoff { disk, from, to }),
        1 => n.clone().prop_map(|node| LockCommand::ReleaseAllOf { node }),
        1 => d.prop_map(|disk| LockCommand::Query { disk }),
        1 => n.prop_map(|node| LockCommand::QueryNode { node }),
    ]
}

/// A step: the command, the index gap, whether the term moves, and the Down set.
fn step() -> impl Strategy<Value = (LockCommand, u64, bool, BTreeSet<NodeId>)> {
    (
        command(),
        1u64..4,
        proptest::bool::weighted(0.1),
        proptest::collection::btree_set(1u64..=4, 0..3),
    )
}

fn contexts(steps: &[(LockCommand, u64, bool, BTreeSet<NodeId>)]) -> Vec<ApplyContext> {
    let (mut index, mut term) = (0u64, 1u64);
    steps
        .iter()
        .map(|(_, gap, new_term, down)| {
            index += gap;
            term += u64::from(*new_term);
            ApplyContext {
                log_index: index,
                term,
                down_nodes: down.clone(),
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn lock_table_invariants(steps in proptest::collection::vec(step(), 1..80)) {
        let ctxs = contexts(&steps);
        let mut table = LockTable::new();
        let mut max_token: BTreeMap<DiskName, u64> = BTreeMap::new();
        let mut results = Vec::new();

        for ((cmd, ..), ctx) in steps.iter().zip(&ctxs) {
            let before = table.clone();
            let result = table.apply(cmd.clone(), ctx);
            results.push(result.clone());

            // Structural invariant: never two write owners.
            for (d, l) in table.iter() {
                match l.mode {
                    LockMode::Exclusive => prop_assert_eq!(l.holders.len(), 1, "disk {}", d),
                    LockMode::Shared => prop_assert!(!l.holders.is_empty()),
                }
            }
            prop_assert!(table.check().is_ok());

            match &result {
                Err(_) => prop_assert_eq!(&table, &before, "a refused command changed the table"),
                Ok(_) => prop_assert_eq!(table.last_applied_index(), Some(ctx.log_index)),
            }

            // Tokens: strictly greater on every new epoch, unchanged otherwise.
            for i in 0..DISKS.len() {
                let d = disk(i);
                let (b, a) = (before.lock(&d), table.lock(&d));
                if let Some(a) = a {
                    let new_epoch = match b {
                        None => true,
                        // Same mode and one holder set contains the other: readers
                        // joined or left. Anything else replaced the holders.
                        // So did the holder taking the disk back from a staged handoff.
                        Some(b) => b.mode != a.mode
                            || !(a.holders.is_superset(&b.holders) || b.holders.is_superset(&a.holders))
                            || (b.handoff.is_some() && result.is_ok()
                                && matches!(cmd, LockCommand::Acquire { disk: cd, node, .. } if *cd == d && b.holders.contains(node))),
                    };
                    let prev = max_token.get(&d).copied();
                    let completed = result.is_ok()
                        && matches!(cmd, LockCommand::CompleteHandoff { disk: cd, .. } if *cd == d);
                    if new_epoch {
                        prop_assert!(prev.is_none_or(|p| a.token.0 > p),
                            "disk {} new epoch token {} not above {:?}", d, a.token, prev);
                        if completed {
                            // A staged handoff's target gets the token reserved for it.
                            let reserved = b.and_then(|b| b.handoff).map(|h| h.token);
                            prop_assert_eq!(Some(a.token), reserved);
                        } else {
                            prop_assert_eq!(a.token.0, ctx.log_index);
                        }
                    } else {
                        prop_assert_eq!(Some(a.token), b.map(|b| b.token));
                    }
                    let m = max_token.entry(d).or_insert(0);
                    *m = (*m).max(a.token.0);
                }
            }

            match cmd {
                LockCommand::Acquire { disk, node, mode } => {
                    if let Some(b) = before.lock(disk) {
                        let other_writer = b.mode == LockMode::Exclusive && !b.holders.contains(node);
                        let writer_vs_readers = *mode == LockMode::Exclusive && !b.holders.contains(node);
                        if other_writer || writer_vs_readers {
                            let refused = matches!(result, Err(LockError::HeldByOther { .. }) | Err(LockError::NodeDown { .. }));
                            prop_assert!(refused, "acquire of a held disk gave {:?}", result);
                        }
                    }
                    if ctx.down_nodes.contains(node) {
                        prop_assert!(result.is_err(), "a Down node was granted a lock");
                    }
                }
                LockCommand::Release { disk, node } => {
                    let holds = before.lock(disk).is_some_and(|l| l.holders.contains(node));
                    if !holds {
                        prop_assert!(matches!(result, Err(LockError::NotOwner { .. }) | Err(LockError::NotLocked { .. })),
                            "release by non-owner gave {:?}", result);
                    } else {
                        prop_assert!(result.is_ok());
                        prop_assert!(table.lock(disk).is_none_or(|l| !l.holders.contains(node)));
                    }
                }
                LockCommand::Handoff { disk, from, to } => {
                    if result.is_ok() {
                        let b = before.lock(disk).expect("handoff of an unlocked disk succeeded");
                        prop_assert_eq!(b.exclusive_owner(), Some(*from));
                        prop_assert_eq!(table.lock(disk).unwrap().exclusive_owner(), Some(*to));
                        prop_assert!(!ctx.down_nodes.contains(to));
                    }
                }
                LockCommand::ForceTakeover { disk, node, .. } => {
                    let b = before.lock(disk);
                    let all_down = b.is_some_and(|b| b.holders.iter().all(|h| ctx.down_nodes.contains(h)));
                    if result.is_ok() {
                        prop_assert!(all_down, "takeover from a live holder");
                        prop_assert!(!ctx.down_nodes.contains(node));
                        let holders: Vec<_> = table.lock(disk).unwrap().holders.iter().copied().collect();
                        prop_assert_eq!(holders, vec![*node]);
                    } else if b.is_some() && !ctx.down_nodes.contains(node) {
                        prop_assert!(!all_down, "takeover from Down holders refused: {:?}", result);
                    }
                }
                LockCommand::ReleaseAllOf { node } => {
                    prop_assert!(table.locks_of(*node).next().is_none());
                    prop_assert!(table.iter().all(|(_, l)| l.handoff.is_none_or(|h| h.to != *node)));
                }
                LockCommand::ReserveHandoff { disk, from, to } => {
                    if result.is_ok() {
                        let (b, a) = (before.lock(disk).unwrap(), table.lock(disk).unwrap());
                        // The holder and its epoch stay; the reservation is this entry.
                        prop_assert_eq!(b.exclusive_owner(), Some(*from));
                        prop_assert_eq!((&a.holders, a.token), (&b.holders, b.token));
                        let h = a.handoff.unwrap();
                        prop_assert_eq!((h.to, h.token.0), (*to, ctx.log_index));
                        prop_assert!(!ctx.down_nodes.contains(to));
                    }
                }
                LockCommand::CompleteHandoff { disk, from, to } => {
                    if result.is_ok() {
                        prop_assert_eq!(table.lock(disk).unwrap().exclusive_owner(), Some(*to));
                        prop_assert!(table.lock(disk).unwrap().handoff.is_none());
                    } else {
                        let could = before.lock(disk).is_some_and(|b| {
                            (b.exclusive_owner() == Some(*from) && b.handoff.is_some_and(|h| h.to == *to))
                                || (b.exclusive_owner() == Some(*to) && b.handoff.is_none())
                        });
                        prop_assert!(!could, "completion refused: {:?}", result);
                    }
                }
                LockCommand::CancelHandoff { disk, from, to } => {
                    prop_assert!(result.is_ok());
                    let (b, a) = (before.lock(disk), table.lock(disk));
                    prop_assert_eq!(a.map(|a| (&a.holders, a.token)), b.map(|b| (&b.holders, b.token)));
                    if b.is_some_and(|b| b.exclusive_owner() == Some(*from)) {
                        prop_assert!(a.unwrap().handoff.is_none_or(|h| h.to != *to));
                    }
                }
                LockCommand::Query { disk } => {
                    prop_assert_eq!(&result, &Ok(LockOutcome::Lock { disk: disk.clone(), lock: before.lock(disk).cloned() }));
                }
                LockCommand::QueryNode { .. } => prop_assert!(result.is_ok()),
            }
        }

        // Determinism: replaying the same log from scratch gives the same table and results.
        let mut replay = LockTable::new();
        let replay_results: Vec<_> = steps.iter().zip(&ctxs)
            .map(|((cmd, ..), ctx)| replay.apply(cmd.clone(), ctx))
            .collect();
        prop_assert_eq!(&replay, &table);
        prop_assert_eq!(replay_results, results);

        // Snapshot round trip, and applying the log again is refused as stale.
        let bytes = bincode::serialize(&table).unwrap();
        let mut restored: LockTable = bincode::deserialize(&bytes).unwrap();
        prop_assert_eq!(&restored, &table);
        if let Some(last) = table.last_applied_index() {
            let ctx = ApplyContext { log_index: last, ..ApplyContext::default() };
            let stale = restored.apply(steps[0].0.clone(), &ctx);
            prop_assert!(matches!(stale, Err(LockError::StaleLogIndex { .. })), "replay gave {:?}", stale);
            prop_assert_eq!(&restored, &table);
        }
    }

    /// Replaying a suffix from a cloned mid-point equals continuing the original.
    #[test]
    fn replay_from_clone(steps in proptest::collection::vec(step(), 2..60), cut in any::<prop::sample::Index>()) {
        let ctxs = contexts(&steps);
        let cut = cut.index(steps.len());
        let mut table = LockTable::new();
        for ((cmd, ..), ctx) in steps[..cut].iter().zip(&ctxs) {
            let _ = table.apply(cmd.clone(), ctx);
        }
        let mut clone = table.clone();
        for ((cmd, ..), ctx) in steps[cut..].iter().zip(&ctxs[cut..]) {
            let a = table.apply(cmd.clone(), ctx);
            let b = clone.apply(cmd.clone(), ctx);
            prop_assert_eq!(a, b);
        }
        prop_assert_eq!(clone, table);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// The fence-record decoder takes any bytes without panicking, and only accepts
    /// what the encoder could have produced.
    #[test]
    fn fence_decoder_total(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(r) = csv_volume::FenceRecord::decode(&bytes) {
            let encoded = r.encode();
            prop_assert_eq!(encoded.as_slice(), bytes.as_slice());
        }
    }

    #[test]
    fn fence_record_round_trip(token in any::<u64>(), node in any::<u64>(), term in any::<u64>(), m in mode()) {
        let r = csv_volume::FenceRecord { token: csv_volume::FencingToken(token), node, mode: m, term };
        prop_assert_eq!(csv_volume::FenceRecord::decode(&r.encode()).unwrap(), r);
    }

    /// Any accepted name stays inside its volume: relative, no dot components, no
    /// empty components, no control characters.
    #[test]
    fn accepted_names_cannot_escape(s in "[a-z./\\\\\u{0}\n]{0,24}") {
        if let Ok(n) = DiskName::parse(&s) {
            prop_assert!(!s.starts_with('/'));
            for c in n.as_str().split('/') {
                prop_assert!(!c.is_empty() && c != "." && c != "..");
            }
            prop_assert!(!s.chars().any(|c| c.is_control() || c == '\\'));
            prop_assert!(!n.relative_path().is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// A damaged snapshot either fails to load or loads as a table that satisfies
    /// the invariants; it never panics and never yields two write owners.
    #[test]
    fn damaged_snapshot_never_loads_inconsistent(
        steps in proptest::collection::vec(step(), 1..30),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        use bincode::Options;
        let ctxs = contexts(&steps);
        let mut table = LockTable::new();
        for ((cmd, ..), ctx) in steps.iter().zip(&ctxs) {
            let _ = table.apply(cmd.clone(), ctx);
        }
        let opts = bincode::DefaultOptions::new().with_limit(1 << 20);
        let mut bytes = opts.serialize(&table).unwrap();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Ok(loaded) = opts.deserialize::<LockTable>(&bytes) {
            prop_assert!(loaded.check().is_ok());
            for (_, l) in loaded.iter() {
                if l.mode == LockMode::Exclusive {
                    prop_assert_eq!(l.holders.len(), 1);
                }
            }
        }
    }
}
