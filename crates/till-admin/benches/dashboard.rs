//! Server-side rendering cost of the dashboard's heaviest pages (issue 9: under a second
//! with 1,000 families and 10,000 receipts). The data is built in memory (no server, no
//! ledger): what is timed is the HTML (and the JSONL download) the handlers produce
//! from what the ledger returns.
//!
//! `cargo bench -p till-admin --bench dashboard`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use till_admin::dashboard::{
    render_family, render_overview, write_receipts_jsonl, AuditView, OverviewQuery, Viewer,
};
use till_ledger::family::{Activity, BlockRecord, BlockView};
use till_ledger::{BlockMeta, FamilyDetail, FamilyView, Receipt};
use till_receipt::{ReceiptBody, ReceiptSigner, RECEIPT_VERSION};

const NOW: u64 = 1_790_000_000;
const FAMILIES: usize = 1_000;
const RECEIPTS: u64 = 10_000;

fn hex_id(n: u64) -> String {
    format!("{n:016x}").repeat(8)
}

fn activity(seed: u64) -> Activity {
    let per_minute: Vec<u64> = (0..60).map(|m| (seed * 7 + m * 13) % 23).collect();
    Activity {
        last_minute: per_minute[59],
        last_hour: per_minute.iter().sum(),
        per_minute,
    }
}

fn family_view(i: u64, used: u64, cap: u64) -> FamilyView {
    FamilyView {
        family: hex_id(i),
        label: Some(format!("agent-{i:04} <research & summaries>")),
        upstream: Some(["openai", "anthropic", "gemini", "github"][(i % 4) as usize].into()),
        cap: Some(cap),
        used,
        remaining: Some(cap.saturating_sub(used)),
        revoked: i % 17 == 0,
        expires: Some(NOW + 86_400),
        recorded_at: NOW - 3_600,
        minted: i % 2 == 0,
        first_activation: Some(NOW - 3_000),
        last_activation: Some(NOW - i % 600),
        blocks: 3,
        activity: activity(i),
    }
}

fn families() -> Vec<FamilyView> {
    (0..FAMILIES as u64)
        .map(|i| family_view(i, (i * 37) % 1_000, 1_000))
        .collect()
}

/// A family with a root, 9 sub-keys, and a sub-sub-key under each.
fn detail() -> FamilyDetail {
    let root = hex_id(1);
    let mut blocks = vec![block(&root, 0, None, Some(RECEIPTS + 5_000), RECEIPTS)];
    for k in 0..9u64 {
        let child = hex_id(100 + k);
        blocks.push(block(&child, 1, Some(&root), Some(2_000), 1_000));
        blocks.push(block(&hex_id(200 + k), 2, Some(&child), Some(500), 100));
    }
    FamilyDetail {
        family: family_view(1, RECEIPTS, RECEIPTS + 5_000),
        blocks,
    }
}

fn block(id: &str, index: u32, parent: Option<&str>, cap: Option<u64>, used: u64) -> BlockView {
    BlockView {
        record: BlockRecord {
            family: hex_id(1),
            revocation_id: id.to_string(),
            index,
            parent: parent.map(str::to_string),
            caveats: BlockMeta {
                label: (index == 0).then(|| "agent".to_string()),
                upstream: (index == 0).then(|| "openai".to_string()),
                methods: vec!["POST".into()],
                paths: vec!["/v1/chat/completions".into()],
                models: vec!["gpt-4o-mini".into()],
                expires: Some(NOW + 86_400),
                cap,
            },
            recorded_at: NOW - 3_600,
            minted: true,
        },
        used,
        remaining: cap.map(|c| c.saturating_sub(used)),
        revoked: false,
        revoked_at: None,
    }
}

/// A real signed, hash-chained receipt chain (as the ledger stores it).
fn receipts() -> Vec<Receipt> {
    let signer = ReceiptSigner::from_seed([9; 32]);
    let family = hex_id(1);
    let mut out: Vec<Receipt> = Vec::with_capacity(RECEIPTS as usize);
    for seq in 1..=RECEIPTS {
        let prev = out.last().map(Receipt::hash_hex);
        // Through JSON, so the bench keeps building if the body gains optional fields.
        let body: ReceiptBody = serde_json::from_value(json!({
            "v": RECEIPT_VERSION, "family": family, "seq": seq,
            "slots": [
                { "block": 0, "revocation_id": family, "slot": seq, "cap": RECEIPTS + 5_000 },
                { "block": 1, "revocation_id": hex_id(100 + seq % 9), "slot": seq / 9 + 1, "cap": 2_000 }
            ],
            "request": { "method": "POST", "upstream": "openai", "path": "/v1/chat/completions",
                         "body_sha256": "00".repeat(32), "model": "gpt-4o-mini" },
            "iat": NOW - RECEIPTS + seq, "proxy": "till-1", "kid": signer.key_id(),
            "idempotency_key": format!("idem-{seq}"), "prev": prev,
        }))
        .unwrap();
        out.push(signer.sign(&body).unwrap());
    }
    out
}

fn viewer() -> Viewer {
    Viewer {
        can_write: true,
        can_mint: true,
        csrf: "00".repeat(32),
    }
}

fn bench(c: &mut Criterion) {
    let fams = families();
    let detail = detail();
    let chain = receipts();
    let audit = AuditView {
        at: NOW,
        result: json!({
            "clean": true, "error": null, "mismatches": [],
            "report": { "family": hex_id(1), "receipts": RECEIPTS,
                        "levels": [{ "revocation_id": hex_id(1), "used": RECEIPTS, "cap": RECEIPTS + 5_000 }] }
        }),
    };
    let v = viewer();
    let q = OverviewQuery::default();
    let size = render_overview(&fams, &q, &v, NOW).into_string().len();
    // Every family is on the page (no pagination): about 2.5 KB of HTML each.
    assert!(size > FAMILIES * 1_500, "overview is {size} bytes");

    let mut g = c.benchmark_group("dashboard");
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(FAMILIES as u64));
    g.bench_function("overview_1000_families", |b| {
        b.iter(|| render_overview(black_box(&fams), &q, &v, NOW).into_string())
    });
    let filtered = OverviewQuery {
        label: Some("agent-0".into()),
        near_limit: Some("on".into()),
        sort: Some("label".into()),
        ..OverviewQuery::default()
    };
    g.bench_function("overview_1000_families_filtered_sorted", |b| {
        b.iter(|| render_overview(black_box(&fams), &filtered, &v, NOW).into_string())
    });
    g.throughput(Throughput::Elements(RECEIPTS));
    g.bench_function("family_page_10000_receipts", |b| {
        b.iter(|| {
            render_family(black_box(&detail), &chain, Some(&audit), &v, NOW, None).into_string()
        })
    });
    g.bench_function("receipts_jsonl_10000", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(16 << 20);
            write_receipts_jsonl(black_box(&chain), &mut out);
            out
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
