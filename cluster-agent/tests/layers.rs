//! The layering rules of `cluster-agent/src` (see `src/lib.rs` and ARCHITECTURE.md),
//! checked on the source text: which folders a folder may name (`crate::FOLDER`), and
//! which crates only the API layer may use. A rule broken here is an import cycle or a
//! wire type leaking into a core layer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers of `src/`, each with the layers it may use (`crate::error_chain` and
/// `crate::node::config`-style paths into a lower layer are fine; upward paths are not).
const LAYERS: &[(&str, &[&str])] = &[
    ("state", &[]),
    ("vmhost", &["state"]),
    ("raft", &["state"]),
    ("node", &["state", "raft"]),
    ("control", &["state", "raft", "node", "vmhost"]),
    ("api", &["state", "raft", "node", "vmhost", "control"]),
];

/// Crates only `api/` may name (the wire layer).
const WIRE_CRATES: &[&str] = &["tonic", "cluster_proto", "prost"];

/// Crates `state/` may not name: it is pure (no runtime, no storage, no consensus).
const RUNTIME_CRATES: &[&str] = &["tokio", "tonic", "cluster_proto", "openraft", "rocksdb"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for e in entries {
        let p = e
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's code without comments (line comments and doc comments), so prose may
/// mention any module.
fn code_of(path: &Path) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn names_crate(code: &str, krate: &str) -> bool {
    code.match_indices(krate).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = &code[i + krate.len()..];
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            && (after.starts_with("::") || after.starts_with(';'))
    })
}

fn crate_paths(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn each_layer_uses_only_the_layers_below_it_and_only_api_knows_the_wire() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut checked = 0;
    for (layer, allowed) in LAYERS {
        let mut files = Vec::new();
        rust_files(&src.join(layer), &mut files);
        assert!(!files.is_empty(), "src/{layer} has no files");
        for f in files {
            checked += 1;
            let code = code_of(&f);
            let rel = f.strip_prefix(&src).unwrap_or(&f).display().to_string();
            for used in crate_paths(&code) {
                let is_layer = LAYERS.iter().any(|(l, _)| *l == used) || used == "server";
                if is_layer && used != *layer && !allowed.contains(&used.as_str()) {
                    problems.push(format!("{rel} names crate::{used}"));
                }
            }
            if *layer != "api" {
                for krate in WIRE_CRATES {
                    if names_crate(&code, krate) {
                        problems.push(format!("{rel} names {krate} (only api/ may)"));
                    }
                }
            }
            if *layer == "state" {
                for krate in RUNTIME_CRATES {
                    if names_crate(&code, krate) {
                        problems.push(format!("{rel} names {krate} (state/ is pure)"));
                    }
                }
            }
        }
    }
    // The wiring and the binaries above the layers do not speak the wire either.
    for top in ["server.rs", "main.rs", "lib.rs"] {
        let code = code_of(&src.join(top));
        for krate in WIRE_CRATES {
            if names_crate(&code, krate) {
                problems.push(format!("{top} names {krate} (only api/ may)"));
            }
        }
    }
    assert!(checked > 20, "only {checked} files checked; did src/ move?");
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_must_refuse() {
    // The checker itself: a path and a crate name are found, prose is not.
    let code = "use crate::api::status;\nlet x = tokio::spawn(f); // crate::control in a comment\n";
    let path = std::env::temp_dir().join(format!("layers-{}.rs", std::process::id()));
    std::fs::write(&path, code).expect("write temp file");
    let c = code_of(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        crate_paths(&c),
        BTreeSet::from(["api".to_string()]),
        "comment paths must be ignored"
    );
    assert!(names_crate(&c, "tokio"));
    assert!(!names_crate(&c, "tonic"));
    assert!(!names_crate("my_tokio::x", "tokio"));
}
