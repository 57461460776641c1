//! Runs every committed corpus file, plus deterministic single-byte mutations of each,
//! through the fuzz target bodies on a stable toolchain.
#![allow(clippy::unwrap_used)]

use std::path::Path;

fn run_corpus(name: &str, target: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        target(&data);
        // Bounded mutations: flip each of the first 512 bytes once.
        for i in 0..data.len().min(512) {
            let mut m = data.clone();
            m[i] ^= 0x01;
            target(&m);
        }
        target(&data[..data.len() / 2]);
    }
    assert!(files > 0, "empty corpus {}", dir.display());
}

#[test]
fn token_corpus() {
    let samples = till_fuzz::sample_tokens();
    assert_eq!(samples.len(), 3);
    if std::env::var_os("TILL_WRITE_CORPUS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/token");
        for (i, s) in samples.iter().enumerate() {
            std::fs::write(dir.join(format!("sample{i}")), s).unwrap();
        }
    }
    for s in &samples {
        till_fuzz::token(s.as_bytes());
    }
    run_corpus("token", till_fuzz::token);
}

#[test]
fn receipt_corpus() {
    run_corpus("receipt", till_fuzz::receipt);
}

#[test]
fn config_corpus() {
    run_corpus("config", till_fuzz::config);
}

#[test]
fn http_corpus() {
    run_corpus("http", till_fuzz::http);
}
