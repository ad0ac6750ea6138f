//! Data-driven lock table scenarios: `tests/testdata/lock/*.txt`.
//!
//! Each file is a transcript. Directive lines set the context; command lines are
//! applied to one `LockTable`, and the `=> ...` lines after them are the expected
//! results. The runner re-renders every file and compares it with what is on disk;
//! with `BLESS_SCENARIOS=1` it rewrites the files instead (review the diff!).
//!
//! ```text
//! # comment                      down 1,3 | down -     term 2       index 40
//! acquire DISK NODE MODE         release DISK NODE     handoff DISK FROM TO
//! takeover DISK NODE MODE        release-all NODE      query DISK   query-node NODE
//! reserve DISK FROM TO           complete DISK FROM TO cancel DISK FROM TO
//! table                          (MODE: exclusive | shared)
//! ```
//! Every command uses the next log index (starting at 1, or as set by `index`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use csv_volume::{
    ApplyContext, DiskLock, DiskName, LockCommand, LockMode, LockOutcome, LockTable, NodeId,
};

fn mode_str(m: LockMode) -> &'static str {
    match m {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
    }
}

fn lock_str(l: &DiskLock) -> String {
    let reserved = l
        .handoff
        .map(|h| format!(" reserved-for={} token={}", h.to, h.token))
        .unwrap_or_default();
    format!(
        "{} {:?} token={} term={}{reserved}",
        mode_str(l.mode),
        l.holders,
        l.token,
        l.term
    )
}

fn parse_mode(s: &str) -> Result<LockMode, String> {
    match s {
        "exclusive" => Ok(LockMode::Exclusive),
        "shared" => Ok(LockMode::Shared),
        other => Err(format!("bad mode {other:?}")),
    }
}

fn parse_node(s: &str) -> Result<NodeId, String> {
    s.parse().map_err(|e| format!("bad node {s:?}: {e}"))
}

fn parse_disk(s: &str) -> Result<DiskName, String> {
    DiskName::parse(s).map_err(|e| format!("bad disk {s:?}: {e}"))
}

fn parse_command(words: &[&str]) -> Result<Option<LockCommand>, String> {
    let cmd = match words {
        ["acquire", d, n, m] => LockCommand::Acquire {
            disk: parse_disk(d)?,
            node: parse_node(n)?,
            mode: parse_mode(m)?,
        },
        ["release", d, n] => LockCommand::Release {
            disk: parse_disk(d)?,
            node: parse_node(n)?,
        },
        ["handoff", d, f, t] => LockCommand::Handoff {
            disk: parse_disk(d)?,
            from: parse_node(f)?,
            to: parse_node(t)?,
        },
        ["reserve", d, f, t] => LockCommand::ReserveHandoff {
            disk: parse_disk(d)?,
            from: parse_node(f)?,
            to: parse_node(t)?,
        },
        ["complete", d, f, t] => LockCommand::CompleteHandoff {
            disk: parse_disk(d)?,
            from: parse_node(f)?,
            to: parse_node(t)?,
        },
        ["cancel", d, f, t] => LockCommand::CancelHandoff {
            disk: parse_disk(d)?,
            from: parse_node(f)?,
            to: parse_node(t)?,
        },
        ["takeover", d, n, m] => LockCommand::ForceTakeover {
            disk: parse_disk(d)?,
            node: parse_node(n)?,
            mode: parse_mode(m)?,
        },
        ["release-all", n] => LockCommand::ReleaseAllOf {
            node: parse_node(n)?,
        },
        ["query", d] => LockCommand::Query {
            disk: parse_disk(d)?,
        },
        ["query-node", n] => LockCommand::QueryNode {
            node: parse_node(n)?,
        },
        _ => return Ok(None),
    };
    Ok(Some(cmd))
}

fn render_outcome(out: &mut String, result: &Result<LockOutcome, csv_volume::LockError>) {
    match result {
        Err(e) => writeln!(out, "=> error: {e}"),
        Ok(LockOutcome::Granted(g)) => writeln!(
            out,
            "=> granted {} node={} {} token={} term={}",
            g.disk,
            g.node,
            mode_str(g.mode),
            g.token,
            g.term
        ),
        Ok(LockOutcome::Reserved(g)) => writeln!(
            out,
            "=> reserved {} node={} {} token={} term={}",
            g.disk,
            g.node,
            mode_str(g.mode),
            g.token,
            g.term
        ),
        Ok(LockOutcome::Released {
            disk,
            node,
            remaining,
        }) => writeln!(
            out,
            "=> released {disk} node={node} remaining={remaining:?}"
        ),
        Ok(LockOutcome::ReleasedAll { node, disks }) => {
            let names: Vec<_> = disks.iter().map(|d| d.as_str()).collect();
            writeln!(out, "=> released-all node={node} disks={names:?}")
        }
        Ok(LockOutcome::Lock { disk, lock: None }) => writeln!(out, "=> {disk}: unlocked"),
        Ok(LockOutcome::Lock {
            disk,
            lock: Some(l),
        }) => writeln!(out, "=> {disk}: {}", lock_str(l)),
        Ok(LockOutcome::Locks { node, locks }) if locks.is_empty() => {
            writeln!(out, "=> node {node} holds nothing")
        }
        Ok(LockOutcome::Locks { locks, .. }) => {
            for (d, l) in locks {
                writeln!(out, "=> {d}: {}", lock_str(l)).unwrap();
            }
            Ok(())
        }
    }
    .unwrap();
}

fn run(text: &str) -> Result<String, String> {
    let mut table = LockTable::new();
    let mut ctx = ApplyContext {
        log_index: 0,
        term: 1,
        down_nodes: BTreeSet::new(),
    };
    let mut out = String::new();
    for (lineno, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}", lineno + 1);
        if line.starts_with("=>") {
            continue; // expected output, regenerated below
        }
        out.push_str(line);
        out.push('\n');
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [w, ..] if w.starts_with('#') => {}
            ["down", "-"] => ctx.down_nodes.clear(),
            ["down", list] => {
                ctx.down_nodes = list
                    .split(',')
                    .map(parse_node)
                    .collect::<Result<_, _>>()
                    .map_err(at)?
            }
            ["term", t] => ctx.term = t.parse().map_err(|e| at(format!("bad term: {e}")))?,
            ["index", i] => {
                let i: u64 = i.parse().map_err(|e| at(format!("bad index: {e}")))?;
                ctx.log_index = i.checked_sub(1).ok_or_else(|| at("index 0".into()))?;
            }
            ["table"] => {
                if table.is_empty() {
                    out.push_str("=> (no locks)\n");
                }
                for (d, l) in table.iter() {
                    writeln!(out, "=> {d}: {}", lock_str(l)).unwrap();
                }
            }
            _ => {
                let cmd = parse_command(&words)
                    .map_err(at)?
                    .ok_or_else(|| at(format!("unknown line {line:?}")))?;
                ctx.log_index += 1;
                let result = table.apply(cmd, &ctx);
                render_outcome(&mut out, &result);
            }
        }
    }
    Ok(out)
}

#[test]
fn lock_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/lock");
    let bless = std::env::var_os("BLESS_SCENARIOS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "scenario files missing in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let rendered = run(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if bless {
            std::fs::write(&file, &rendered).unwrap();
        } else if rendered != text {
            failures.push(format!(
                "{} differs; got:\n{rendered}",
                file.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
