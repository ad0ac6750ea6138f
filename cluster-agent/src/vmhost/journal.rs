//! The console journal: every console line each VM printed on this host, stamped with
//! the host's wall clock when it reached the agent, kept per VM name after the VM stopped
//! or left (bounded). It is this node's own record of where a VM ran — the evidence a
//! checker needs to prove that no VM ever ran on two nodes at once, including a copy that
//! ran for a moment and was fenced again.
//!
//! One thread per hosted VM copies its console subscription into the journal; it ends
//! when the VM is gone (the console drops its subscribers). Readers wait on a condvar.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines kept per VM name (the oldest go first): about 27 minutes of the test guest's
/// 100 ms heartbeats.
pub const JOURNAL_LINES_MAX: usize = 16_384;
/// VM names kept (the one written longest ago goes first).
pub const JOURNAL_VMS_MAX: usize = 256;

/// One console line as this host received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalLine {
    /// Position in this name's journal, from 0, never reused while the agent runs.
    pub index: u64,
    /// When the agent received the line, microseconds since the Unix epoch.
    pub at_unix_us: u64,
    pub text: String,
}

#[derive(Default)]
struct VmJournal {
    lines: VecDeque<JournalLine>,
    next: u64,
    /// The journal-wide write counter at the last push (eviction order).
    touched: u64,
}

#[derive(Default)]
struct Inner {
    vms: BTreeMap<String, VmJournal>,
    writes: u64,
}

/// The console journal of one host (see the module doc).
#[derive(Default)]
pub struct ConsoleJournal {
    inner: Mutex<Inner>,
    changed: Condvar,
}

pub(crate) fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl ConsoleJournal {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the console lines of VM `name` from `lines` into the journal on a thread of
    /// its own, until the VM is gone; each stamped as it arrives.
    pub fn follow(self: &Arc<Self>, name: &str, lines: Receiver<String>) {
        self.follow_with(name, lines, |line| (line, now_unix_us()));
    }

    /// Like [`ConsoleJournal::follow`] for lines stamped where they were printed (a VM
    /// worker process stamps its console: its agent may read them late, e.g. after a
    /// freeze, and must not date them then).
    pub fn follow_stamped(self: &Arc<Self>, name: &str, lines: Receiver<(String, u64)>) {
        self.follow_with(name, lines, |l| l);
    }

    fn follow_with<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        lines: Receiver<T>,
        stamp: impl Fn(T) -> (String, u64) + Send + 'static,
    ) {
        let journal = self.clone();
        let vm = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("journal-{name}"))
            .spawn(move || {
                while let Ok(line) = lines.recv() {
                    let (text, at) = stamp(line);
                    journal.push(&vm, text, at);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(vm = name, error = %e, "cannot start the console journal thread; this VM's lines are not journaled");
        }
    }

    /// Appends `text` to `name`'s journal, received at `at_unix_us`.
    pub fn push(&self, name: &str, text: String, at_unix_us: u64) {
        let mut g = self.lock();
        g.writes += 1;
        let writes = g.writes;
        if !g.vms.contains_key(name) && g.vms.len() >= JOURNAL_VMS_MAX {
            let oldest = g
                .vms
                .iter()
                .min_by_key(|(_, j)| j.touched)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                g.vms.remove(&n);
            }
        }
        let j = g.vms.entry(name.to_owned()).or_default();
        if j.lines.len() >= JOURNAL_LINES_MAX {
            j.lines.pop_front();
        }
        j.lines.push_back(JournalLine {
            index: j.next,
            at_unix_us,
            text,
        });
        j.next += 1;
        j.touched = writes;
        drop(g);
        self.changed.notify_all();
    }

    /// The lines of `name` from position `from` on (those still kept); when there are
    /// none yet, waits up to `wait` for one. Empty for a name never seen here.
    pub fn read(&self, name: &str, from: u64, wait: Duration) -> Vec<JournalLine> {
        let collect = |g: &Inner| -> Vec<JournalLine> {
            g.vms
                .get(name)
                .map(|j| {
                    j.lines
                        .iter()
                        .filter(|l| l.index >= from)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let g = self.lock();
        let found = collect(&g);
        if !found.is_empty() || wait.is_zero() {
            return found;
        }
        let (g, _) = self
            .changed
            .wait_timeout_while(g, wait, |g| collect(g).is_empty())
            .unwrap_or_else(|p| p.into_inner());
        collect(&g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_per_name_in_order_bounded_and_outliving_the_vm() {
        let j = Arc::new(ConsoleJournal::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        j.follow("a", rx);
        tx.send("BOOT".into()).unwrap();
        tx.send("HB seq=1".into()).unwrap();
        drop(tx); // the VM is gone: its lines stay
        let got = j.read("a", 0, Duration::from_secs(5));
        assert!(!got.is_empty());
        let all = Wait(&j).until_len("a", 2);
        assert_eq!(
            all.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["BOOT", "HB seq=1"]
        );
        assert!(all[0].at_unix_us > 0 && all[0].at_unix_us <= all[1].at_unix_us);
        assert_eq!(j.read("a", 1, Duration::ZERO)[0].text, "HB seq=1");
        assert!(j.read("never", 0, Duration::from_millis(10)).is_empty());
        for i in 0..JOURNAL_LINES_MAX + 5 {
            j.push("b", format!("{i}"), 1);
        }
        let b = j.read("b", 0, Duration::ZERO);
        assert_eq!(b.len(), JOURNAL_LINES_MAX);
        assert_eq!(b[0].index, 5);
        for i in 0..JOURNAL_VMS_MAX {
            j.push(&format!("vm-{i}"), "x".into(), 1);
        }
        assert!(
            j.read("a", 0, Duration::ZERO).is_empty(),
            "oldest name evicted"
        );
    }

    /// Reads until `n` lines of `name` arrived (the follow thread runs on its own).
    struct Wait<'a>(&'a ConsoleJournal);

    impl Wait<'_> {
        fn until_len(&self, name: &str, n: usize) -> Vec<JournalLine> {
            loop {
                let got = self.0.read(name, 0, Duration::from_secs(5));
                if got.len() >= n {
                    return got;
                }
                let last = got.last().map_or(0, |l| l.index + 1);
                assert!(
                    !self.0.read(name, last, Duration::from_secs(5)).is_empty(),
                    "no more lines of {name} after {got:?}"
                );
            }
        }
    }
}
