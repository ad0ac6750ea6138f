//! Helpers shared by the clusterctl process tests.

use std::process::{Command, Output};

/// Run clusterctl against `endpoint` (ignoring any `CLUSTERCTL_ENDPOINT` of the caller).
pub fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("CLUSTERCTL_ENDPOINT")
        .output()
        .unwrap_or_else(|e| panic!("cannot run clusterctl: {e}"))
}

/// stdout and stderr of a finished clusterctl run.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
