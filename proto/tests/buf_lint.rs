//! `buf lint` (STANDARD rules, `proto/buf.yaml`) passes on the .proto files: one package
//! per directory, `Service` suffixes, one request and one response message per rpc,
//! enums with an `_UNSPECIFIED` zero value.
//!
//! buf comes from npm (`@bufbuild/buf`); `deploy/setup.sh` installs it into the
//! workspace's `.tools/`. Like promtool and chromium elsewhere in the suite, a missing
//! buf fails the test with what to install: CI must not pass without linting.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `$BUF`, else the workspace's `.tools/node_modules/.bin/buf`, else `buf` on PATH.
fn buf() -> PathBuf {
    if let Some(path) = std::env::var_os("BUF") {
        return PathBuf::from(path);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/node_modules/.bin/buf");
    if local.exists() {
        return local;
    }
    PathBuf::from("buf")
}

#[test]
fn buf_lint_passes() {
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let buf = buf();
    let out = Command::new(&buf)
        .arg("lint")
        .current_dir(proto_dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (deploy/setup.sh installs buf: npm install --prefix .tools @bufbuild/buf; \
                 or set BUF to a buf binary)",
                buf.display()
            )
        });
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "buf lint:\n{findings}"
    );
}
