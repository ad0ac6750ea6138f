//! Crash points for fault tests. `CLUSTER_AGENT_CRASH_AT=<point>` makes the agent abort
//! the moment it reaches the named point — no cleanup, no graceful shutdown: to the rest
//! of the cluster it is the same as `kill -9` at an instant a test cannot hit from
//! outside. Unset (the normal case) every point is a no-op; an unknown name is refused at
//! startup ([`check_env`]) so a typo cannot silently disable a fault test. Crash points
//! exist only in builds with the `test-hooks` feature (what `cargo test` builds); a
//! production build refuses to start with [`ENV`] set. Beside them, one hold for tests
//! that need a live migration to stay in pre-copy: [`HOLD_PRECOPY_ENV`].

/// The environment variable naming the point to crash at.
pub const ENV: &str = "CLUSTER_AGENT_CRASH_AT";

/// Source of a migration that succeeded — live: the target runs the VM (Commit
/// answered); quick: the VM is saved and its disks handed off — before the source
/// commits `FinishMigration`.
pub const MIGRATE_OUT_AFTER_SWITCHOVER: &str = "migrate-out-after-switchover";

/// Source of a quick migration, before it saves the VM (nothing handed off yet).
pub const QUICK_MIGRATE_OUT_BEFORE_SAVE: &str = "quick-migrate-out-before-save";

/// Target of a live migration, once it restored the VM and opened its disks (with the
/// staged handoff's reserved tokens), before it tells the source it is ready.
pub const MIGRATE_IN_AFTER_RESTORE: &str = "migrate-in-after-restore";

/// Every crash point.
pub const POINTS: &[&str] = &[
    MIGRATE_OUT_AFTER_SWITCHOVER,
    QUICK_MIGRATE_OUT_BEFORE_SAVE,
    MIGRATE_IN_AFTER_RESTORE,
];

/// `CLUSTER_AGENT_HOLD_PRECOPY=<vm>`: the source of a live migration of that VM finds the
/// VM's first page dirty again after every pre-copy round. Under a blackout cap shorter
/// than one page takes to send, the migration then never converges and stays in pre-copy
/// until it is cancelled or reaches its deadline: a hold that does not depend on how fast
/// the guest writes (a starved guest dirties nothing, and a round with nothing dirty
/// switches over).
pub const HOLD_PRECOPY_ENV: &str = "CLUSTER_AGENT_HOLD_PRECOPY";

/// Whether [`HOLD_PRECOPY_ENV`] names `vm`.
pub fn holds_precopy(vm: &str) -> bool {
    cfg!(feature = "test-hooks") && std::env::var(HOLD_PRECOPY_ENV).is_ok_and(|v| v == vm)
}

/// A bad [`ENV`] setting.
#[derive(Debug, thiserror::Error)]
pub enum CrashPointError {
    #[error("{ENV}={name:?} names no crash point (known: {known})", known = POINTS.join(", "))]
    Unknown { name: String },
    #[error("{0} is set, but this build has no crash points (they need the `test-hooks` feature)")]
    NotBuilt(&'static str),
}

/// Refuses an unknown point name in [`ENV`], and any name in a build without crash points.
pub fn check_env() -> Result<(), CrashPointError> {
    if !cfg!(feature = "test-hooks") && std::env::var_os(HOLD_PRECOPY_ENV).is_some() {
        return Err(CrashPointError::NotBuilt(HOLD_PRECOPY_ENV));
    }
    match std::env::var(ENV) {
        Ok(_) if !cfg!(feature = "test-hooks") => Err(CrashPointError::NotBuilt(ENV)),
        Ok(p) if !POINTS.contains(&p.as_str()) => Err(CrashPointError::Unknown { name: p }),
        _ => Ok(()),
    }
}

/// Aborts the process if [`ENV`] names `point`.
pub fn reached(point: &str) {
    if cfg!(feature = "test-hooks") && std::env::var(ENV).is_ok_and(|p| p == point) {
        tracing::error!(point, "crash point reached; aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_unique_and_named_in_the_list() {
        let mut p = POINTS.to_vec();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), POINTS.len());
        assert!(POINTS.contains(&MIGRATE_OUT_AFTER_SWITCHOVER));
    }
}
