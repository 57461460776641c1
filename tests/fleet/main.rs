//! Fleet end-to-end test: three `till serve` processes on loopback sharing one
//! FoundationDB cluster (spec/ledger-fdb.md §6).
//!
//! Registered as a `till-cli` test with `required-features = ["fdb"]`. Gated: runs only
//! when `TILL_FDB_CLUSTER_FILE` names a cluster file (`fdb/local.sh start` prints one);
//! otherwise prints `SKIPPED: set TILL_FDB_CLUSTER_FILE ...` and returns.
//!
//! Scenario (TEST-MATRIX rows 1, 2, 6, 11): one upstream that counts what reaches it; a
//! token with cap N and two sub-tokens hammered through all three proxies at once; one
//! proxy killed (SIGKILL) mid-load and restarted. Afterwards: exactly N slots claimed,
//! the upstream saw every claimed request except those in flight on the killed proxy,
//! never more than N, sub-caps held, `till audit` clean; a revocation issued through one
//! proxy's ledger is refused by the other two at their next request.
//!
//! Everything is std-only and bounded: every load loop has a request budget and a
//! deadline, every socket a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod alerts;
mod shapes;

const ENV_CLUSTER_FILE: &str = "TILL_FDB_CLUSTER_FILE";
const TILL: &str = env!("CARGO_BIN_EXE_till");
/// Root cap of the hammered token.
const CAP: u64 = 120;
/// Sub-token caps.
const SUB_CAPS: [u64; 2] = [25, 15];
/// Concurrent clients per proxy.
const CLIENTS_PER_PROXY: usize = 8;
/// Upper bound on the whole hammer phase.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
const UPSTREAM_SECRET: &str = "sk-upstream-secret-for-fleet-test";

// ---------------------------------------------------------------------------------------
// The `till` command line this test relies on. If the CLI spells something differently,
// adapt it here (and only here).

fn keygen(dir: &Path) {
    run_ok(Command::new(TILL).arg("--dir").arg(dir).arg("keygen"));
}

fn mint(dir: &Path, cap: u64) -> String {
    let out = run_ok(Command::new(TILL).arg("--dir").arg(dir).args([
        "mint",
        "--upstream",
        "up",
        "--cap",
        &cap.to_string(),
    ]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn attenuate(token: &str, cap: u64) -> String {
    let out = run_ok(Command::new(TILL).args(["attenuate", token, "--cap", &cap.to_string()]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn ledger_arg(cluster: &Path) -> String {
    format!("fdb:{}", cluster.display())
}

/// This run's key space (fresh per run, so runs on one cluster never see each other):
/// the proxies get it from `[ledger] keyspace` in their till.toml, the ledger commands
/// from `--keyspace`.
fn keyspace() -> &'static str {
    static KS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KS.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("till-fleet-{}-{nanos}", std::process::id())
    })
}

/// `till.toml` for one proxy: listen address, the `[ledger]` table (the documented
/// form, key space included) and one generic-bearer upstream.
fn write_config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    cluster: &Path,
    keyspace: &str,
) -> PathBuf {
    let path = dir.join("till.toml");
    let table = format!(
        "backend = \"fdb\"\ncluster_file = \"{}\"\nkeyspace = \"{keyspace}\"",
        cluster.display()
    );
    let toml = shapes::proxy_config(&listen.to_string(), &upstream.to_string(), &table);
    std::fs::write(&path, toml).unwrap();
    path
}

/// The ledger (backend, cluster file, key space) comes from the config's `[ledger]` table.
fn serve(dir: &Path, config: &Path, proxy_id: &str) -> Child {
    Command::new(TILL)
        .arg("--dir")
        .arg(dir)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("TILL_FLEET_UPSTREAM_SECRET", UPSTREAM_SECRET)
        .env("TILL_PROXY_ID", proxy_id)
        .env("TILL_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn till serve")
}

fn revoke(dir: &Path, cluster: &Path, token: &str) {
    run_ok(Command::new(TILL).arg("--dir").arg(dir).args([
        "revoke",
        "--ledger",
        &ledger_arg(cluster),
        "--keyspace",
        keyspace(),
        token,
    ]));
}

/// `till audit --json`: returns the parsed report (must exit 0).
fn audit(dir: &Path, cluster: &Path, token: &str) -> serde_json::Value {
    let out = run_ok(Command::new(TILL).arg("--dir").arg(dir).args([
        "audit",
        "--json",
        "--ledger",
        &ledger_arg(cluster),
        "--keyspace",
        keyspace(),
        token,
    ]));
    serde_json::from_slice(&out.stdout).expect("audit --json prints JSON")
}

/// `till usage --json`: used activations of the token's first block.
fn usage(dir: &Path, cluster: &Path, token: &str) -> serde_json::Value {
    let out = run_ok(Command::new(TILL).arg("--dir").arg(dir).args([
        "usage",
        "--json",
        "--ledger",
        &ledger_arg(cluster),
        "--keyspace",
        keyspace(),
        token,
    ]));
    serde_json::from_slice(&out.stdout).expect("usage --json prints JSON")
}

// ---------------------------------------------------------------------------------------
// Plumbing

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run till");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn copy_keys(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jwk") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// An upstream that answers 200 to everything and counts requests carrying the real
/// credential (and, separately, any that do not: must stay zero).
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
}

fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let (h, b) = (Arc::clone(&hits), Arc::clone(&bad));
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (h, b) = (Arc::clone(&h), Arc::clone(&b));
            thread::spawn(move || serve_upstream(stream, &h, &b));
        }
    });
    Upstream { addr, hits, bad }
}

fn serve_upstream(stream: TcpStream, hits: &AtomicU64, bad: &AtomicU64) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    // Keep-alive: one request after another until the client closes.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut authorized = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if header.eq_ignore_ascii_case(&format!("authorization: Bearer {UPSTREAM_SECRET}")) {
                authorized = true;
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if authorized {
            hits.fetch_add(1, Ordering::SeqCst);
        } else {
            bad.fetch_add(1, Ordering::SeqCst);
        }
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request through a proxy; the HTTP status, or `None` on a connection failure.
fn call(proxy: SocketAddr, token: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    let body = "{\"model\":\"m\"}";
    let request = format!(
        "POST /up/v1/chat HTTP/1.1\r\nhost: {proxy}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn wait_ready(proxy: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("till serve on {proxy} exited early: {status}");
        }
        if TcpStream::connect_timeout(&proxy, Duration::from_millis(200)).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("till serve on {proxy} not listening after 30 s");
}

struct Proxy {
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    child: Child,
    id: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    capped: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
}

// ---------------------------------------------------------------------------------------

#[test]
fn fleet_of_three_on_one_cluster() {
    let Some(cluster) = std::env::var_os(ENV_CLUSTER_FILE).filter(|v| !v.is_empty()) else {
        println!(
            "SKIPPED: set {ENV_CLUSTER_FILE} to a cluster file (fdb/local.sh start prints one) \
             to run the FoundationDB fleet test"
        );
        return;
    };
    let cluster = PathBuf::from(cluster);
    let root = std::env::temp_dir().join(format!("till-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let up = upstream();

    // One set of keys for the whole fleet.
    let first = root.join("p1");
    keygen(&first);
    let mut proxies: Vec<Proxy> = (1..=3)
        .map(|i| {
            let dir = root.join(format!("p{i}"));
            if i > 1 {
                copy_keys(&first, &dir);
            }
            let addr = free_port();
            let config = write_config(&dir, addr, up.addr, &cluster, keyspace());
            let id = format!("p{i}");
            let child = serve(&dir, &config, &id);
            Proxy {
                dir,
                config,
                addr,
                child,
                id,
            }
        })
        .collect();
    for p in &mut proxies {
        wait_ready(p.addr, &mut p.child);
    }

    // --- Hammer: one token (cap N) and two sub-tokens, through all three proxies. ---
    let token = mint(&first, CAP);
    let subs: Vec<String> = SUB_CAPS.iter().map(|&c| attenuate(&token, c)).collect();
    let tokens: Vec<String> = [token.clone(), subs[0].clone(), subs[1].clone()].to_vec();
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    let started = Instant::now();
    // Each client stops after its budget, at the deadline, or once it has seen the
    // token family refuse 5 times in a row.
    let budget = CAP as usize * 2;
    let mut clients = Vec::new();
    for (pi, p) in proxies.iter().enumerate() {
        for c in 0..CLIENTS_PER_PROXY {
            let addr = p.addr;
            let tokens = tokens.clone();
            let tallies = tallies.clone();
            clients.push(thread::spawn(move || {
                let mut refusals_in_a_row = 0;
                for n in 0..budget {
                    if started.elapsed() > LOAD_DEADLINE || refusals_in_a_row >= 5 {
                        break;
                    }
                    let which = (pi + c + n) % 3;
                    let t = &tallies[which];
                    match call(addr, &tokens[which]) {
                        Some(200) => {
                            refusals_in_a_row = 0;
                            t.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(403) => {
                            refusals_in_a_row += usize::from(which == 0);
                            t.capped.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(_) => {
                            t.other.fetch_add(1, Ordering::SeqCst);
                        }
                        None => {
                            t.failed.fetch_add(1, Ordering::SeqCst);
                            // The killed proxy: stop using it.
                            if pi == 2 {
                                break;
                            }
                        }
                    }
                }
            }));
        }
    }
    // Kill proxy 3 (SIGKILL) once a third of the cap has been forwarded.
    let kill_deadline = Instant::now() + LOAD_DEADLINE;
    while up.hits.load(Ordering::SeqCst) < CAP / 3 && Instant::now() < kill_deadline {
        thread::sleep(Duration::from_millis(5));
    }
    proxies[2].child.kill().unwrap();
    proxies[2].child.wait().unwrap();
    let hits_at_kill = up.hits.load(Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    assert!(hits_at_kill > 0, "load never reached the upstream");

    // Restart the killed proxy: it must not reuse any slot.
    let (dir, config, addr, id) = {
        let p = &proxies[2];
        (p.dir.clone(), p.config.clone(), p.addr, p.id.clone())
    };
    let mut child = serve(&dir, &config, &id);
    wait_ready(addr, &mut child);
    proxies[2].child = child;
    assert_eq!(
        call(addr, &token),
        Some(403),
        "restarted proxy refuses the spent token"
    );

    // --- Invariants ---
    let ok: Vec<u64> = tallies
        .iter()
        .map(|t| t.ok.load(Ordering::SeqCst))
        .collect();
    let failed: u64 = tallies
        .iter()
        .map(|t| t.failed.load(Ordering::SeqCst))
        .sum();
    let other: u64 = tallies.iter().map(|t| t.other.load(Ordering::SeqCst)).sum();
    let hits = up.hits.load(Ordering::SeqCst);
    println!("ok per token {ok:?}, failed {failed}, other {other}, upstream hits {hits}");
    assert_eq!(
        up.bad.load(Ordering::SeqCst),
        0,
        "a request reached upstream without the real credential"
    );
    assert_eq!(
        other, 0,
        "only 200 and 403 answers (and connection failures on the killed proxy)"
    );
    let report = audit(&first, &cluster, &token);
    assert_eq!(shapes::audit_clean(&report), Some(true), "{report}");
    let receipts = shapes::audit_receipts(&report).expect("audit reports a receipt count");
    assert_eq!(
        receipts, CAP,
        "exactly N slots claimed and their receipts stored: {report}"
    );
    let used = usage(&first, &cluster, &token);
    println!("usage: {used}");
    assert_eq!(shapes::usage_used(&used, 0), Some(CAP), "{used}");
    // Never more forwarded than claimed; everything claimed was forwarded except what was
    // in flight on the killed proxy (at most its concurrent clients).
    assert!(hits <= CAP, "{hits} forwarded, cap {CAP}");
    assert!(
        hits + CLIENTS_PER_PROXY as u64 >= CAP,
        "{hits} forwarded of {CAP} claimed: more lost than were in flight on the killed proxy"
    );
    assert!(
        ok.iter().sum::<u64>() <= hits,
        "a 200 without an upstream hit"
    );
    assert!(
        ok[1] <= SUB_CAPS[0] && ok[2] <= SUB_CAPS[1],
        "sub-caps held: {ok:?}"
    );

    // --- Revocation through one proxy's ledger, refused by the other two. ---
    let fresh = mint(&first, 100);
    let child_token = attenuate(&fresh, 10);
    for p in &proxies {
        assert_eq!(
            call(p.addr, &child_token),
            Some(200),
            "proxy {} serves before revocation",
            p.id
        );
    }
    revoke(&proxies[0].dir, &cluster, &child_token);
    for p in &proxies[1..] {
        assert_eq!(
            call(p.addr, &child_token),
            Some(403),
            "proxy {} refuses after revocation",
            p.id
        );
    }
    // The parent is untouched.
    assert_eq!(call(proxies[1].addr, &fresh), Some(200));

    drop(proxies);
    let _ = std::fs::remove_dir_all(&root);
}
