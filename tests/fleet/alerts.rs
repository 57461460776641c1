//! Alerts across a fleet (issue 8, TEST-MATRIX row 32): two `till serve` on one
//! FoundationDB cluster, both delivering to one loopback webhook receiver. Cap 10,
//! thresholds 80 % and 100 %, 50 concurrent requests spread over both proxies → exactly
//! one 80 % and one 100 % delivery (the alert is decided in the claim transaction that
//! crosses the threshold, and an outbox lease keeps the two deliverers from both sending).
//! Gated like the rest of this file: SKIPPED without `TILL_FDB_CLUSTER_FILE`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    call, copy_keys, free_port, keygen, keyspace, mint, run_ok, upstream, wait_ready, write_config,
    ENV_CLUSTER_FILE, TILL, UPSTREAM_SECRET,
};

/// A webhook receiver: answers 200 and counts deliveries per `webhook-id`.
fn receiver() -> (SocketAddr, Arc<Mutex<BTreeMap<String, u32>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let s = Arc::clone(&seen);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let s = Arc::clone(&s);
            thread::spawn(move || serve_hook(stream, &s));
        }
    });
    (addr, seen)
}

fn serve_hook(stream: TcpStream, seen: &Mutex<BTreeMap<String, u32>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut id = None;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "webhook-id" => id = Some(v.trim().to_string()),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    if let Some(id) = id {
        *seen.lock().unwrap().entry(id).or_default() += 1;
    }
    let mut stream = reader.into_inner();
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}

fn serve_with_alerts(dir: &Path, config: &Path, proxy_id: &str) -> Child {
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

#[test]
fn threshold_alerts_once_across_two_proxies() {
    let Some(cluster) = std::env::var_os(ENV_CLUSTER_FILE).filter(|v| !v.is_empty()) else {
        println!(
            "SKIPPED: set {ENV_CLUSTER_FILE} to a cluster file (fdb/local.sh start prints one) \
             to run the FoundationDB fleet alert test"
        );
        return;
    };
    let cluster = PathBuf::from(cluster);
    let root = std::env::temp_dir().join(format!("till-fleet-alerts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let up = upstream();
    let (hook, seen) = receiver();
    let secret_file = root.join("hook.secret");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();

    let first = root.join("a1");
    keygen(&first);
    let mut proxies: Vec<(Child, SocketAddr)> = (1..=2)
        .map(|i| {
            let dir = root.join(format!("a{i}"));
            if i > 1 {
                copy_keys(&first, &dir);
            }
            let addr = free_port();
            let config = write_config(&dir, addr, up.addr, &cluster, keyspace());
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!(
                "\n[alerts]\nthresholds = [80, 100]\nrevocations = false\n\
                 webhook_url = \"http://{hook}/hook\"\nwebhook_secret_file = \"{}\"\n",
                secret_file.display()
            ));
            std::fs::write(&config, text).unwrap();
            (serve_with_alerts(&dir, &config, &format!("a{i}")), addr)
        })
        .collect();
    for (child, addr) in &mut proxies {
        wait_ready(*addr, child);
    }

    let token = mint(&first, 10);
    let family = {
        let out = run_ok(Command::new(TILL).args(["inspect", "--json", &token]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["blocks"][0]["revocation_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let addrs: Vec<SocketAddr> = proxies.iter().map(|(_, a)| *a).collect();
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let (addr, token) = (addrs[i % 2], token.clone());
            thread::spawn(move || call(addr, &token))
        })
        .collect();
    let ok = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .filter(|s| *s == Some(200))
        .count();
    assert_eq!(ok, 10, "cap 10 across the fleet");

    let want: Vec<String> = vec![
        format!("threshold:{family}:100"),
        format!("threshold:{family}:80"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && seen.lock().unwrap().len() < 2 {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(3)); // nothing more arrives
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), want, "{seen:?}");
    assert!(
        seen.values().all(|n| *n == 1),
        "each alert delivered once: {seen:?}"
    );
    for (mut child, _) in proxies {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&root);
}
