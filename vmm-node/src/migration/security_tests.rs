//! Security of the migration listener, over real sockets and real TLS: strangers and
//! unauthorized sources are refused with a reason before anything exists on the target,
//! slow senders hold nothing, the session cap refuses at once, and the target's session
//! state machine survives random and mutated frames.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Instant;

use super::*;
use crate::migration::conn::Conn;
use crate::migration::protocol::{
    decode_payload, encode_payload, read_frame, write_frame, DataHello, Hello, Setup, Welcome,
};
use crate::migration::stats::MigrationStats;
use crate::migration::target::{error_chain, serve_sessions, wake_listener};
use crate::migration::test_pki::NodeCert;
use crate::migration::tls::{SessionAuthorizer, TicketSet};

/// A target serving sessions on its own thread, with what it built and handed off.
struct Target {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// One entry per session: the VM name that arrived, or the error chain.
    outcomes: Arc<Mutex<Vec<Result<String, String>>>>,
    factory: Arc<SimFactory>,
    handoff: Arc<RecordingHandoff>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    fn start(ro: ReceiveOptions) -> Target {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
        let factory = Arc::new(factory());
        let handoff = Arc::new(RecordingHandoff::default());
        let (s, o, f, h) = (
            stop.clone(),
            outcomes.clone(),
            factory.clone(),
            handoff.clone(),
        );
        let thread = std::thread::spawn(move || {
            serve_sessions(&l, f.as_ref(), h.as_ref(), &ro, &s, &|r| {
                o.lock()
                    .unwrap()
                    .push(r.map(|r| r.vm_name).map_err(|e| error_chain(&e)));
            })
            .unwrap();
        });
        Target {
            addr,
            stop,
            outcomes,
            factory,
            handoff,
            thread: Some(thread),
        }
    }

    fn built(&self) -> usize {
        self.factory.created.lock().unwrap().len()
    }

    fn acquires(&self) -> usize {
        let log = self.handoff.log.lock().unwrap();
        log.iter().filter(|l| l.starts_with("acquire")).count()
    }

    /// Waits (with a deadline) until `n` sessions have ended.
    fn wait_outcomes(&self, n: usize) -> Vec<Result<String, String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = self.outcomes.lock().unwrap().clone();
            if o.len() >= n {
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "only {} sessions ended: {o:?}",
                o.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        wake_listener(self.addr);
        if let Some(t) = self.thread.take() {
            // A panic in any session thread surfaces here.
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("the target's serve_sessions panicked");
            }
        }
    }
}

/// Receive options with `authorizer` over the cluster's TLS.
fn ro_with(authorizer: Arc<dyn SessionAuthorizer>) -> ReceiveOptions {
    ReceiveOptions {
        io_timeout: Duration::from_secs(20),
        ..ReceiveOptions::new(tls(), authorizer)
    }
}

/// A client-side TLS configuration trusting `roots` and presenting `cert` (if any).
fn client_tls(roots: &TestCa, cert: Option<&NodeCert>) -> Transport {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut store = rustls::RootCertStore::empty();
    store
        .add(CertificateDer::from_pem_slice(roots.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(super::super::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store);
    let client = match cert {
        None => b.with_no_client_auth(),
        Some(c) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let Transport::Tls(t) = tls() else {
        unreachable!()
    };
    Transport::Tls(MigrationTls {
        client: Arc::new(client),
        server: t.server,
    })
}

fn migrate_with(
    vm: &SimVm,
    addr: SocketAddr,
    transport: Transport,
    ticket: &[u8],
) -> Result<MigrationStats, MigrationError> {
    let o = MigrateOptions {
        transport,
        ticket: ticket.to_vec(),
        io_timeout: Duration::from_secs(20),
        ..opts(50, 30_000)
    };
    migrate(
        vm,
        addr,
        &o,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
}

/// Every stranger and unauthorized source is refused with a reason naming what is wrong;
/// nothing is built and no disk lock is acquired for them; the target serves real
/// migrations before and after, and a used ticket cannot be replayed.
#[test]
fn strangers_and_unauthorized_sources_are_refused_and_the_target_keeps_serving() {
    let tickets = Arc::new(TicketSet::new());
    let other_ca = TestCa::new("another cluster's CA");
    let ip = ["127.0.2.1".parse().unwrap()];
    let foreign = other_ca.node("foreign-node", &ip);
    let source_node = ca().node("source-node", &ip);
    let other_member = ca().node("other-member", &ip);
    tickets.insert("sim", b"t-good");
    tickets.insert("sim", b"t-good-2");
    tickets.insert("other-vm", b"t-other-vm");
    tickets.insert_for_peer("sim", b"t-for-source", &source_node.cert_der);
    let target = Target::start(ro_with(tickets.clone()));
    let addr = target.addr;

    struct Case {
        what: &'static str,
        transport: Transport,
        ticket: &'static [u8],
        /// Texts the source's error must contain.
        expect: &'static [&'static str],
    }
    let cases = [
        Case {
            what: "a stranger without a certificate",
            transport: client_tls(ca(), None),
            ticket: b"t-good",
            expect: &["CertificateRequired"],
        },
        Case {
            what: "a certificate from another CA",
            transport: client_tls(ca(), Some(&foreign)),
            ticket: b"t-good",
            expect: &["UnknownCA"],
        },
        Case {
            what: "a source that does not trust the target's CA",
            transport: client_tls(&other_ca, Some(&foreign)),
            ticket: b"t-good",
            expect: &["UnknownIssuer"],
        },
        Case {
            what: "a plaintext source",
            transport: Transport::Plaintext,
            ticket: b"t-good",
            expect: &["requires TLS"],
        },
        Case {
            what: "a member whose certificate the authorizer rejects",
            transport: client_tls(ca(), Some(&other_member)),
            ticket: b"t-for-source",
            expect: &["not authorized", "another source node"],
        },
        Case {
            what: "a missing ticket",
            transport: tls(),
            ticket: b"",
            expect: &["not authorized", "no migration ticket"],
        },
        Case {
            what: "another VM's ticket",
            transport: tls(),
            ticket: b"t-other-vm",
            expect: &["not authorized", "another VM"],
        },
        Case {
            what: "an unknown ticket",
            transport: tls(),
            ticket: b"guessed",
            expect: &["not authorized", "unknown or already used"],
        },
    ];
    let vm = SimVm::start(16 << 20, 0);
    for c in cases {
        let e = migrate_with(&vm, addr, c.transport, c.ticket).unwrap_err();
        let chain = error_chain(&e);
        for x in c.expect {
            assert!(chain.contains(x), "{}: {x:?} not in {chain}", c.what);
        }
        assert!(!vm.paused(), "{}: the source must keep running", c.what);
        eprintln!("refused, {}: {chain}", c.what);
    }
    assert_eq!(target.built(), 0, "a refused session built a VM");
    assert_eq!(target.acquires(), 0, "a refused session moved a disk lock");

    // The real migration, with the ticket the cluster committed.
    migrate_with(&vm, addr, tls(), b"t-good").unwrap();
    assert_eq!((target.built(), target.acquires()), (1, 1));
    // Its ticket replayed (by anyone, the same source included).
    let vm2 = SimVm::start(16 << 20, 0);
    let e = migrate_with(&vm2, addr, tls(), b"t-good").unwrap_err();
    assert!(
        error_chain(&e).contains("unknown or already used"),
        "replay: {e}"
    );
    // The source the ticket was issued to may use it.
    let src_tls = Transport::Tls(tls_of(ca(), &source_node));
    migrate_with(&vm2, addr, src_tls, b"t-for-source").unwrap();
    let vm3 = SimVm::start(16 << 20, 0);
    migrate_with(&vm3, addr, tls(), b"t-good-2").unwrap();
    assert_eq!((target.built(), target.acquires()), (3, 3));
    // Refused sessions are reported as such (the two without a handshake have no session).
    let o = target.wait_outcomes(8);
    let refused = o
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| e.contains("refused")))
        .count();
    assert_eq!(refused, 5, "{o:?}");
}

/// Trickles `bytes` to `conn`, one every `every`, until `stop`; returns how many went out
/// and whether the peer closed the connection meanwhile.
fn trickle(
    mut conn: impl std::io::Write + Send + 'static,
    bytes: Vec<u8>,
    every: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        for b in bytes {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            if conn.write_all(&[b]).and_then(|_| conn.flush()).is_err() {
                return true;
            }
            sent.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(every);
        }
        false
    })
}

fn hello_frame(vm: &str, ticket: &[u8]) -> Vec<u8> {
    let h = Hello {
        vm_name: vm.into(),
        ticket: ticket.to_vec(),
        connections: 1,
    };
    let mut f = Vec::new();
    write_frame(
        &mut f,
        Command::Hello,
        &encode_payload(Command::Hello, &h).unwrap(),
    )
    .unwrap();
    f
}

/// The slow-frame attack: connections that send one byte of a frame at a time (a TLS
/// ClientHello, a Hello frame inside TLS from a certified member) and
/// connections that send nothing are open while a real migration runs. The real migration
/// does not wait for any of them: it completes while they are all still open and
/// unfinished (their deadline is 120 s, far beyond the migration), so the delay they add
/// is at most the scheduling of their threads — printed next to a baseline migration.
#[test]
fn slow_senders_do_not_delay_a_real_migration() {
    let tickets = Arc::new(TicketSet::new());
    tickets.insert("sim", b"baseline");
    tickets.insert("sim", b"real");
    let ro = ReceiveOptions {
        handshake_timeout: Duration::from_secs(120),
        ..ro_with(tickets)
    };
    let target = Target::start(ro);
    let addr = target.addr;
    let vm = SimVm::start(16 << 20, 0);
    let t0 = Instant::now();
    migrate_with(&vm, addr, tls(), b"baseline").unwrap();
    let baseline = t0.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(200);
    let mut attackers = Vec::new();
    let mut counters = Vec::new();
    let mut spawn = |conn: Box<dyn std::io::Write + Send>, bytes: Vec<u8>| {
        let sent = Arc::new(AtomicUsize::new(0));
        counters.push(sent.clone());
        attackers.push(trickle(conn, bytes, every, stop.clone(), sent));
    };
    // A ClientHello trickled byte by byte (the record header announces 512 bytes).
    let mut client_hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    client_hello.resize(517, 0);
    spawn(
        Box::new(std::net::TcpStream::connect(addr).unwrap()),
        client_hello,
    );
    // A certified member trickling its Hello inside TLS.
    let t = Duration::from_secs(10);
    let member = Conn::connect(&tls(), None, addr, t, t).unwrap();
    spawn(Box::new(member), hello_frame("sim", b"whatever"));
    // (A plaintext frame is refused at its first byte: it holds nothing.)
    // Silent connections.
    let silent: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // Every trickler is mid-frame.
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.iter().any(|c| c.load(Ordering::SeqCst) < 3) {
        assert!(Instant::now() < deadline, "the attackers could not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let vm2 = SimVm::start(16 << 20, 0);
    let t1 = Instant::now();
    migrate_with(&vm2, addr, tls(), b"real").unwrap();
    let attacked = t1.elapsed();
    let cut = attackers.iter().filter(|a| a.is_finished()).count();
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        cut, 0,
        "an attacker finished or was cut before the migration ended"
    );
    eprintln!(
        "real migration: {baseline:?} alone, {attacked:?} with 2 byte-a-{every:?} senders and 8 silent connections"
    );
    for a in attackers {
        assert!(
            !a.join().unwrap(),
            "the target closed a connection before its deadline"
        );
    }
    drop(silent);
    assert_eq!(target.built(), 2);
}

/// A frame that trickles in faster than any per-read timeout but slower than the
/// handshake deadline is cut at the deadline (not earlier), and the target keeps serving.
#[test]
fn the_first_frame_has_one_deadline_however_slowly_it_trickles() {
    let tickets = Arc::new(TicketSet::new());
    tickets.insert("sim", b"after");
    let deadline = Duration::from_secs(1);
    let ro = ReceiveOptions {
        handshake_timeout: deadline,
        ..ro_with(tickets)
    };
    let target = Target::start(ro);
    let addr = target.addr;
    let t = Duration::from_secs(10);
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(50);
    let started = Instant::now();
    let member = Conn::connect(&tls(), None, addr, t, t).unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let frame = hello_frame("sim", &[7; 64]);
    let len = frame.len();
    // Padded so the trickle outlasts the deadline on any machine (a frame is never whole).
    let cut = trickle(
        member,
        frame[..len - 1].to_vec(),
        every,
        stop.clone(),
        sent.clone(),
    );
    let closed = cut.join().unwrap();
    let held = started.elapsed();
    assert!(closed, "the slow frame was never cut");
    assert!(
        held >= deadline,
        "cut after {held:?}, before the deadline {deadline:?}"
    );
    assert!(sent.load(Ordering::SeqCst) < len, "the frame completed");
    eprintln!(
        "slow frame cut after {held:?} ({} of {len} bytes sent)",
        sent.load(Ordering::SeqCst)
    );
    let vm = SimVm::start(16 << 20, 0);
    migrate_with(&vm, addr, tls(), b"after").unwrap();
}

/// Opens a session as a certified member (Hello answered with Welcome) and keeps it idle.
fn open_session(addr: SocketAddr, transport: &Transport) -> Result<(Conn, [u8; 16]), String> {
    let t = Duration::from_secs(10);
    let mut c = Conn::connect(transport, None, addr, t, t).map_err(|e| error_chain(&e))?;
    let f = hello_frame("sim", b"any");
    std::io::Write::write_all(&mut c, &f).map_err(|e| e.to_string())?;
    let r = read_frame(&mut c).map_err(|e| e.to_string())?;
    let w: Welcome = decode_payload(Command::Welcome, &r.payload).map_err(|e| e.to_string())?;
    Ok((c, w.session_id))
}

/// Sessions beyond the cap are refused at once with the reason; a data connection joins
/// a session only with its id and its certificate; a freed slot is usable again.
#[test]
fn the_session_cap_refuses_at_once_and_data_connections_must_match_their_session() {
    let ro = ReceiveOptions {
        max_sessions: 2,
        ..ro_with(Arc::new(crate::migration::tls::AllowAll))
    };
    let target = Target::start(ro);
    let addr = target.addr;
    let (first, id) = open_session(addr, &tls()).unwrap();
    let (_second, _) = open_session(addr, &tls()).unwrap();
    let e = open_session(addr, &tls()).unwrap_err();
    assert!(e.contains("already handles 2 incoming migrations"), "{e}");

    let data_hello = |transport: &Transport, session_id: [u8; 16]| {
        let t = Duration::from_secs(10);
        let mut c = Conn::connect(transport, None, addr, t, t).unwrap();
        let p = encode_payload(
            Command::DataHello,
            &DataHello {
                session_id,
                index: 0,
            },
        )
        .unwrap();
        write_frame(&mut c, Command::DataHello, &p).unwrap();
        read_frame(&mut c).unwrap_err().to_string()
    };
    let other = Transport::Tls(tls_of(
        ca(),
        &ca().node("other", &["127.0.2.1".parse().unwrap()]),
    ));
    let e = data_hello(&other, id);
    assert!(e.contains("another certificate"), "{e}");
    let e = data_hello(&tls(), [0x55; 16]);
    assert!(e.contains("no such migration session"), "{e}");

    // The first session goes away: its slot frees (waited for, with a deadline).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    let third = loop {
        match open_session(addr, &tls()) {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "slot never freed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(third);
    assert_eq!(target.built(), 0);
}

// --- Fuzzing the target's session state machine ---------------------------------------

/// xorshift64*: a seeded generator (failures name the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// `frame` with a few random bytes changed, cut or extended.
    fn mutate(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        match self.below(4) {
            0 => {}
            1 => {
                for _ in 0..=self.below(3) {
                    if !frame.is_empty() {
                        let i = self.below(frame.len() as u64) as usize;
                        frame[i] ^= 1 << self.below(8);
                    }
                }
            }
            2 => frame.truncate(self.below(frame.len() as u64 + 1) as usize),
            _ => {
                let n = self.below(64) as usize;
                frame.extend(self.bytes(n));
            }
        }
        frame
    }
}

fn frame(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    write_frame(&mut f, command, payload).unwrap();
    f
}

/// A random control frame: any command, a well-formed or random payload.
fn random_control_frame(rng: &mut Rng, vm: &SimVm) -> Vec<u8> {
    use crate::migration::protocol::{RoundEnd, StatePayload};
    let commands = [
        Command::Setup,
        Command::State,
        Command::StorageReleased,
        Command::Commit,
        Command::Cancel,
        Command::RoundEnd,
        Command::Pages,
        Command::Hello,
        Command::DataHello,
        Command::EndOfStream,
        Command::Receipt,
    ];
    let c = commands[rng.below(commands.len() as u64) as usize];
    let payload = match (c, rng.below(2)) {
        (Command::Setup, 0) => encode_payload(
            c,
            &Setup {
                requirements: vm.requirements(),
                config: vm.config_blob().unwrap(),
            },
        )
        .unwrap(),
        (Command::State, 0) => encode_payload(
            c,
            &StatePayload {
                state: bincode::serialize(&rng.next()).unwrap(),
            },
        )
        .unwrap(),
        (Command::RoundEnd, 0) => encode_payload(
            c,
            &RoundEnd {
                round: rng.below(3) as u32,
                data_pages: rng.next(),
                zero_pages: rng.next(),
            },
        )
        .unwrap(),
        _ => {
            let n = rng.below(96) as usize;
            rng.bytes(n)
        }
    };
    rng.mutate(frame(c, &payload))
}

/// Random and mutated frames on the control and data connections of authenticated
/// sessions, at every step of the session state machine: the target never panics (a
/// panic in any session thread fails the test when the target stops), a disk lock moves
/// only in a session that sent its VM state before `StorageReleased`, and a real
/// migration succeeds afterwards.
#[test]
fn random_and_mutated_frames_never_panic_the_target_session_state_machine() {
    let seed = std::env::var("MIGSEC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    let cases: u64 = std::env::var("MIGSEC_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let ro = ReceiveOptions {
        io_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_millis(500),
        ..ReceiveOptions::new(
            Transport::Plaintext,
            Arc::new(crate::migration::tls::AllowAll),
        )
    };
    let target = Target::start(ro);
    let addr = target.addr;
    let vm = SimVm::start(1 << 20, 0);
    let mut rng = Rng(seed | 1);
    let mut welcomed = 0;
    use std::io::{Read, Write};
    for _case in 0..cases {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = c.set_nodelay(true);
        // Step 1: Hello, well formed most of the time.
        let hello = hello_frame("sim", b"t");
        let hello = if rng.below(4) == 0 {
            rng.mutate(hello)
        } else {
            hello
        };
        let _ = c.write_all(&hello);
        let welcome = read_frame(&mut c)
            .ok()
            .and_then(|f| decode_payload::<Welcome>(Command::Welcome, &f.payload).ok());
        if let Some(w) = welcome {
            welcomed += 1;
            // Step 2: Setup (usually valid), a data connection (usually valid), then
            // random control and data frames.
            let setup = encode_payload(
                Command::Setup,
                &Setup {
                    requirements: vm.requirements(),
                    config: vm.config_blob().unwrap(),
                },
            )
            .unwrap();
            let setup = frame(Command::Setup, &setup);
            let setup = if rng.below(5) == 0 {
                rng.mutate(setup)
            } else {
                setup
            };
            let _ = c.write_all(&setup);
            let mut d = std::net::TcpStream::connect(addr).unwrap();
            let p = encode_payload(
                Command::DataHello,
                &DataHello {
                    session_id: w.session_id,
                    index: 0,
                },
            )
            .unwrap();
            let dh = frame(Command::DataHello, &p);
            let dh = if rng.below(5) == 0 {
                rng.mutate(dh)
            } else {
                dh
            };
            let _ = d.write_all(&dh);
            for _ in 0..rng.below(4) {
                let _ = d.write_all(&random_control_frame(&mut rng, &vm));
            }
            for _ in 0..rng.below(6) {
                let _ = c.write_all(&random_control_frame(&mut rng, &vm));
            }
            let _ = d.shutdown(std::net::Shutdown::Write);
        }
        // The session ends (an error or, rarely, a whole valid sequence): the target
        // closes the control connection.
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = c.read_to_end(&mut Vec::new());
    }
    eprintln!("{cases} fuzz cases (seed {seed:#x}), {welcomed} sessions welcomed");
    let acquires = target.acquires();
    eprintln!("{} VMs built, {acquires} lock acquires", target.built());
    // Every acquire followed a State frame: the state machine checks it before acquire
    // (a StorageReleased without State is refused), so acquires ≤ sessions that built a VM.
    assert!(acquires <= target.built());
    // Still serving: a real migration over plaintext.
    let o = MigrateOptions {
        transport: Transport::Plaintext,
        connections: 2,
        ..opts(50, 30_000)
    };
    let real = SimVm::start(16 << 20, 0);
    migrate(
        &real,
        addr,
        &o,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .unwrap();
}
