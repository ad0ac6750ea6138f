//! Standby and wake-up of nodes: the replicated half of power saving.
//!
//! A node registers the commands that power it off and on ([`PowerCommands`], from its
//! config); the leader runs them (`crate::control::power`), since a node in standby
//! cannot power itself on. The life of a standby:
//!
//! ```text
//! Up/Paused ──RequestStandby──▶ (request pending; the leader drains the node)
//!           ──EnterStandby (owns no VM, none migrating to it)──▶ Standby ──(power-off command runs)
//! Standby ──BeginWake──▶ Waking ──(power-on command runs; heartbeats heard: liveness)──▶ Up
//! Standby ──PowerFailed(off)──▶ Up            Waking ──PowerFailed(on)──▶ Standby
//! ```
//!
//! **Invariant:** a node in standby or waking owns no VM and is the target of no
//! migration (`EnterStandby` is refused otherwise and placement never picks it), so its
//! silence needs no failover. Standby is refused unless at least a majority of the
//! registered nodes plus one stay awake (Up or Paused): the cluster keeps a Raft quorum
//! and a leader to wake the others even if one more node fails.

use serde::{Deserialize, Serialize};

use super::{ClusterState, EventKind, NodeState, StateKey};

/// Most arguments of a power command.
pub const POWER_ARGS_MAX: usize = 64;
/// Longest argument of a power command, in bytes.
pub const POWER_ARG_LEN_MAX: usize = 1024;
/// Longest reason or command error kept, in bytes (longer ones are cut).
pub const POWER_REASON_MAX: usize = 2048;

/// The argv lists that power a node off and on, run by the leader (not through a shell).
/// Both empty: the node is never put in standby; both or neither are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PowerCommands {
    pub off: Vec<String>,
    pub on: Vec<String>,
}

impl PowerCommands {
    /// Whether the node can be put in standby (and woken).
    pub fn configured(&self) -> bool {
        !self.off.is_empty() && !self.on.is_empty()
    }

    /// Refuse a half-configured pair, an empty program, or oversized lists.
    pub fn validate(&self) -> Result<(), String> {
        if self.off.is_empty() != self.on.is_empty() {
            return Err(
                "power_off_command and power_on_command must be set together (or neither)".into(),
            );
        }
        for (name, argv) in [
            ("power_off_command", &self.off),
            ("power_on_command", &self.on),
        ] {
            if argv.len() > POWER_ARGS_MAX {
                return Err(format!(
                    "{name} has {} arguments; at most {POWER_ARGS_MAX}",
                    argv.len()
                ));
            }
            if argv.first().is_some_and(|p| p.trim().is_empty()) {
                return Err(format!("{name} starts with an empty program name"));
            }
            if let Some(a) = argv
                .iter()
                .find(|a| a.len() > POWER_ARG_LEN_MAX || a.contains('\0'))
            {
                return Err(format!(
                    "{name} has an argument of {} bytes or with a NUL byte (at most {POWER_ARG_LEN_MAX} bytes, no NUL)",
                    a.len()
                ));
            }
        }
        Ok(())
    }
}

/// Standby asked for and not yet entered (see [`PowerCommand::RequestStandby`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyRequest {
    pub reason: String,
    pub requested_unix_ms: u64,
}

/// Which power command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Off,
    On,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Off => "off",
            PowerAction::On => "on",
        }
    }
}

/// Standby and wake-up commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "power", rename_all = "snake_case")]
pub enum PowerCommand {
    /// Ask for `node` to be drained and put in standby.
    RequestStandby {
        node: u64,
        reason: String,
        at_unix_ms: u64,
    },
    /// Drop a pending standby request (its drain failed, or the node went down).
    CancelStandby {
        node: u64,
        reason: String,
        at_unix_ms: u64,
    },
    /// The node is empty: standby now (its power-off command runs next).
    EnterStandby { node: u64, at_unix_ms: u64 },
    /// Wake a standby node (its power-on command runs next).
    BeginWake {
        node: u64,
        reason: String,
        at_unix_ms: u64,
    },
    /// A power command failed (or the node did not rejoin in time): a failed power-off
    /// returns the node to Up, a failed wake-up to Standby.
    PowerFailed {
        node: u64,
        action: PowerAction,
        error: String,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for PowerCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PowerCommand::RequestStandby { node, .. } => write!(f, "request_standby({node})"),
            PowerCommand::CancelStandby { node, .. } => write!(f, "cancel_standby({node})"),
            PowerCommand::EnterStandby { node, .. } => write!(f, "enter_standby({node})"),
            PowerCommand::BeginWake { node, .. } => write!(f, "begin_wake({node})"),
            PowerCommand::PowerFailed { node, action, .. } => {
                write!(f, "power_failed({node}, {})", action.as_str())
            }
        }
    }
}

/// Why a power command is refused. Each message names the node and what to do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PowerError {
    #[error("unknown node id {0}; `clusterctl node list` shows the members")]
    UnknownNode(u64),
    #[error("node {0} has no power_off_command and power_on_command in its config; it cannot be put in standby")]
    NoCommands(u64),
    #[error("node {node} is {state}; {what}")]
    WrongState {
        node: u64,
        state: NodeState,
        what: &'static str,
    },
    #[error("node {node} still runs or receives VM(s) {vms}; standby needs an empty node (drain it first)")]
    NotEmpty { node: u64, vms: String },
    #[error("standby of node {node} would leave {awake} of {total} nodes awake; at least {need} must stay up (a Raft majority plus one, so a leader remains to wake nodes if one more fails)")]
    Quorum {
        node: u64,
        awake: usize,
        total: usize,
        need: usize,
    },
    #[error("node {0} has no pending standby request")]
    NoRequest(u64),
    #[error("a reason or error of {0} bytes is too long (at most {POWER_REASON_MAX})")]
    TooLong(usize),
}

/// Nodes that must stay awake (Up or Paused) among `total` registered ones.
pub fn awake_needed(total: usize) -> usize {
    total / 2 + 2
}

/// Why `node` may not go to standby now (checked on request and again on entry).
pub fn check_standby(cs: &ClusterState, node: u64) -> Result<(), PowerError> {
    let rec = cs.nodes.get(&node).ok_or(PowerError::UnknownNode(node))?;
    if !rec.registration.power.configured() {
        return Err(PowerError::NoCommands(node));
    }
    if !matches!(rec.state, NodeState::Up | NodeState::Paused) {
        return Err(PowerError::WrongState {
            node,
            state: rec.state,
            what: "only an up or paused node can be put in standby",
        });
    }
    let total = cs.nodes.len();
    let awake = cs
        .nodes
        .iter()
        .filter(|(id, r)| **id != node && matches!(r.state, NodeState::Up | NodeState::Paused))
        .count();
    let need = awake_needed(total);
    if awake < need {
        return Err(PowerError::Quorum {
            node,
            awake,
            total,
            need,
        });
    }
    Ok(())
}

/// VMs owned by `node` or migrating to it.
pub fn vms_on(cs: &ClusterState, node: u64) -> Vec<String> {
    cs.vms
        .values()
        .filter(|v| v.owner == Some(node) || v.migrating_to == Some(node))
        .map(|v| v.spec.name.clone())
        .collect()
}

fn bounded(text: &str) -> String {
    if text.len() <= POWER_REASON_MAX {
        return text.to_owned();
    }
    let mut end = POWER_REASON_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn set_state(
    cs: &mut ClusterState,
    node: u64,
    state: NodeState,
    reason: &str,
    at: u64,
    touched: &mut Vec<StateKey>,
) {
    let Some(rec) = cs.nodes.get_mut(&node) else {
        return;
    };
    let from = rec.state;
    rec.state = state;
    rec.state_since_unix_ms = at;
    rec.state_reason = reason.to_owned();
    touched.push(StateKey::Node(node));
    cs.record_event(
        at,
        EventKind::NodeStateChanged,
        node,
        format!("node {node} {from} -> {state}: {reason}"),
        touched,
    );
}

/// Apply a power command; on refusal nothing changes.
pub fn apply(
    cs: &mut ClusterState,
    cmd: &PowerCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), PowerError> {
    match cmd {
        PowerCommand::RequestStandby {
            node,
            reason,
            at_unix_ms,
        } => {
            if reason.len() > POWER_REASON_MAX {
                return Err(PowerError::TooLong(reason.len()));
            }
            check_standby(cs, *node)?;
            let rec = cs
                .nodes
                .get_mut(node)
                .ok_or(PowerError::UnknownNode(*node))?;
            if rec.standby_request.is_some() {
                return Ok(());
            }
            rec.standby_request = Some(StandbyRequest {
                reason: reason.clone(),
                requested_unix_ms: *at_unix_ms,
            });
            touched.push(StateKey::Node(*node));
            cs.record_event(
                *at_unix_ms,
                EventKind::NodeUpdated,
                *node,
                format!("node {node}: standby requested ({reason}); draining it first"),
                touched,
            );
        }
        PowerCommand::CancelStandby {
            node,
            reason,
            at_unix_ms,
        } => {
            let rec = cs
                .nodes
                .get_mut(node)
                .ok_or(PowerError::UnknownNode(*node))?;
            if rec.standby_request.take().is_none() {
                return Err(PowerError::NoRequest(*node));
            }
            touched.push(StateKey::Node(*node));
            cs.record_event(
                *at_unix_ms,
                EventKind::NodeUpdated,
                *node,
                format!("node {node}: standby cancelled: {}", bounded(reason)),
                touched,
            );
        }
        PowerCommand::EnterStandby { node, at_unix_ms } => {
            let request = cs
                .nodes
                .get(node)
                .ok_or(PowerError::UnknownNode(*node))?
                .standby_request
                .clone()
                .ok_or(PowerError::NoRequest(*node))?;
            check_standby(cs, *node)?;
            let vms = vms_on(cs, *node);
            if !vms.is_empty() {
                return Err(PowerError::NotEmpty {
                    node: *node,
                    vms: vms.join(", "),
                });
            }
            if let Some(rec) = cs.nodes.get_mut(node) {
                rec.standby_request = None;
            }
            set_state(
                cs,
                *node,
                NodeState::Standby,
                &request.reason,
                *at_unix_ms,
                touched,
            );
        }
        PowerCommand::BeginWake {
            node,
            reason,
            at_unix_ms,
        } => {
            if reason.len() > POWER_REASON_MAX {
                return Err(PowerError::TooLong(reason.len()));
            }
            let state = cs
                .nodes
                .get(node)
                .ok_or(PowerError::UnknownNode(*node))?
                .state;
            if state != NodeState::Standby {
                return Err(PowerError::WrongState {
                    node: *node,
                    state,
                    what: "only a standby node can be woken",
                });
            }
            set_state(cs, *node, NodeState::Waking, reason, *at_unix_ms, touched);
        }
        PowerCommand::PowerFailed {
            node,
            action,
            error,
            at_unix_ms,
        } => {
            let state = cs
                .nodes
                .get(node)
                .ok_or(PowerError::UnknownNode(*node))?
                .state;
            let (from, to) = match action {
                PowerAction::Off => (NodeState::Standby, NodeState::Up),
                PowerAction::On => (NodeState::Waking, NodeState::Standby),
            };
            if state != from {
                return Err(PowerError::WrongState {
                    node: *node,
                    state,
                    what: "the power command's outcome no longer applies",
                });
            }
            let reason = format!(
                "power-{} command failed: {}",
                action.as_str(),
                bounded(error)
            );
            set_state(cs, *node, to, &reason, *at_unix_ms, touched);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::VmCommand;
    use crate::state::{Command, CommandResult};

    fn cluster(n: u64) -> ClusterState {
        let mut s = fixtures::cluster(n, |_| fixtures::amd(4, 4 << 30));
        for r in s.nodes.values_mut() {
            r.registration.power = PowerCommands {
                off: vec!["true".into()],
                on: vec!["true".into()],
            };
        }
        s
    }

    fn power(s: &mut ClusterState, c: PowerCommand) -> CommandResult {
        s.apply(&Command::Power(c)).0
    }

    fn request(node: u64) -> PowerCommand {
        PowerCommand::RequestStandby {
            node,
            reason: "test".into(),
            at_unix_ms: 5,
        }
    }

    fn rejected(r: &CommandResult, needle: &str) {
        match r {
            CommandResult::Rejected { reason } => {
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
            }
            other => panic!("expected a refusal with {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn standby_needs_an_empty_node_then_wakes_through_waking() {
        let mut s = cluster(5);
        let spec = VmSpec::test_guest("a", 1, 256, TestWorkload::new(WorkloadName::Idle));
        let r = s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(5),
            at_unix_ms: 2,
        }));
        assert_eq!(r.0, CommandResult::Ok);
        assert_eq!(power(&mut s, request(5)), CommandResult::Ok);
        let enter = PowerCommand::EnterStandby {
            node: 5,
            at_unix_ms: 6,
        };
        rejected(
            &power(&mut s, enter.clone()),
            "still runs or receives VM(s) a",
        );
        assert_eq!(s.nodes[&5].state, NodeState::Up);
        // Once the VM is elsewhere (as a drain would leave it), standby is allowed.
        for v in s.vms.values_mut() {
            v.owner = Some(1);
        }
        assert_eq!(power(&mut s, enter), CommandResult::Ok);
        assert_eq!(s.nodes[&5].state, NodeState::Standby);
        assert!(s.nodes[&5].standby_request.is_none());
        // Liveness cannot take it out of standby, nor set standby by hand.
        let up = Command::SetNodeState {
            node_id: 5,
            state: NodeState::Up,
            at_unix_ms: 8,
            reason: "x".into(),
        };
        rejected(&s.apply(&up).0, "node wake 5");
        let wake = PowerCommand::BeginWake {
            node: 5,
            reason: "load".into(),
            at_unix_ms: 9,
        };
        assert_eq!(power(&mut s, wake.clone()), CommandResult::Ok);
        assert_eq!(s.nodes[&5].state, NodeState::Waking);
        rejected(&power(&mut s, wake), "only a standby node can be woken");
        assert_eq!(s.apply(&up).0, CommandResult::NodeState { changed: true });
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = cluster(5);
        s.nodes.get_mut(&4).expect("node").registration.power = PowerCommands::default();
        let before = s.clone();
        rejected(&power(&mut s, request(4)), "no power_off_command");
        rejected(&power(&mut s, request(9)), "unknown node id 9");
        rejected(
            &power(
                &mut s,
                PowerCommand::EnterStandby {
                    node: 5,
                    at_unix_ms: 1,
                },
            ),
            "no pending standby request",
        );
        rejected(
            &power(
                &mut s,
                PowerCommand::PowerFailed {
                    node: 5,
                    action: PowerAction::On,
                    error: "x".into(),
                    at_unix_ms: 1,
                },
            ),
            "no longer applies",
        );
        rejected(
            &s.apply(&Command::SetNodeState {
                node_id: 5,
                state: NodeState::Standby,
                at_unix_ms: 1,
                reason: String::new(),
            })
            .0,
            "cannot be set standby directly",
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_majority_plus_one_stays_awake() {
        // 3 nodes: a majority (2) plus one is all of them: no standby at all.
        let mut s = cluster(3);
        rejected(&power(&mut s, request(3)), "at least 3 must stay up");
        // 5 nodes: one may sleep, not two.
        let mut s = cluster(5);
        assert_eq!(power(&mut s, request(5)), CommandResult::Ok);
        let r = power(
            &mut s,
            PowerCommand::EnterStandby {
                node: 5,
                at_unix_ms: 6,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        rejected(&power(&mut s, request(4)), "would leave 3 of 5 nodes awake");
    }

    #[test]
    fn a_failed_power_off_returns_the_node_up_with_the_error() {
        let mut s = cluster(5);
        power(&mut s, request(5));
        power(
            &mut s,
            PowerCommand::EnterStandby {
                node: 5,
                at_unix_ms: 6,
            },
        );
        let r = power(
            &mut s,
            PowerCommand::PowerFailed {
                node: 5,
                action: PowerAction::Off,
                error: "exit status 3: no BMC".into(),
                at_unix_ms: 7,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        assert_eq!(s.nodes[&5].state, NodeState::Up);
        assert!(s.nodes[&5].state_reason.contains("no BMC"));
        let last = s.events.values().last().expect("event");
        assert!(last
            .message
            .contains("power-off command failed: exit status 3: no BMC"));
    }

    #[test]
    fn half_configured_or_oversized_commands_are_refused() {
        let half = PowerCommands {
            off: vec!["ipmitool".into()],
            on: Vec::new(),
        };
        assert!(half.validate().unwrap_err().contains("set together"));
        let empty = PowerCommands {
            off: vec![" ".into()],
            on: vec!["x".into()],
        };
        assert!(empty.validate().unwrap_err().contains("empty program"));
        let long = PowerCommands {
            off: vec!["x".into(); POWER_ARGS_MAX + 1],
            on: vec!["x".into()],
        };
        assert!(long.validate().unwrap_err().contains("at most 64"));
    }
}
