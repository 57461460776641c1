//! Receipt costs on the claim path (sign) and the audit path (parse + verify, whole chain).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use till_receipt::{
    audit_chain, Receipt, ReceiptBody, ReceiptKeySet, ReceiptSigner, RequestDigest, SlotClaim,
};

const CHAIN_LEN: u64 = 1000;

fn signer() -> ReceiptSigner {
    ReceiptSigner::from_seed([11; 32])
}

/// A realistic two-level receipt: 64-byte revocation ids, an LLM request.
fn body(signer: &ReceiptSigner, seq: u64, prev: Option<String>) -> ReceiptBody {
    let root = "ab".repeat(64);
    let child = "cd".repeat(64);
    ReceiptBody {
        v: 2,
        family: root.clone(),
        seq,
        slots: vec![
            SlotClaim {
                block: 0,
                revocation_id: root,
                slot: seq,
                cap: Some(1_000_000),
            },
            SlotClaim {
                block: 1,
                revocation_id: child,
                slot: seq,
                cap: Some(CHAIN_LEN),
            },
        ],
        request: RequestDigest {
            method: "POST".into(),
            upstream: "openai".into(),
            path: "/v1/chat/completions".into(),
            body_sha256: "ef".repeat(32),
            model: Some("gpt-4o-mini".into()),
            query: None,
            content_type: None,
        },
        iat: 1_767_225_600 + seq,
        proxy: "proxy-a".into(),
        kid: signer.key_id().into(),
        idempotency_key: format!("idem-{seq:08}"),
        prev,
        ledger: None,
        ceilings: None,
        void: None,
    }
}

fn chain(signer: &ReceiptSigner) -> Vec<Receipt> {
    let mut out: Vec<Receipt> = Vec::with_capacity(CHAIN_LEN as usize);
    for seq in 1..=CHAIN_LEN {
        let prev = out.last().map(Receipt::hash_hex);
        out.push(signer.sign(&body(signer, seq, prev)).unwrap());
    }
    out
}

fn bench(c: &mut Criterion) {
    let signer = signer();
    let keys: ReceiptKeySet = [signer.public_key()].into_iter().collect();
    let one = body(&signer, 2, Some("00".repeat(32)));
    let receipt = signer.sign(&one).unwrap();
    // Catches format drift that would silently change what is measured (and the header
    // budget the proxy spends on the receipt).
    assert_eq!(receipt.compact().len(), 1348, "receipt size changed");

    let mut group = c.benchmark_group("receipt");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| b.iter(|| signer.sign(black_box(&one)).unwrap()));
    group.bench_function("parse_verify", |b| {
        b.iter(|| {
            let r = Receipt::parse(black_box(receipt.compact())).unwrap();
            r.verify(&keys).unwrap();
            r
        })
    });
    group.finish();

    let receipts = chain(&signer);
    let mut group = c.benchmark_group("receipt_chain");
    group.throughput(Throughput::Elements(CHAIN_LEN));
    group.bench_function("audit_chain_1000", |b| {
        b.iter(|| audit_chain(black_box(&receipts), &keys).unwrap())
    });
    let compacts: Vec<String> = receipts.iter().map(|r| r.compact().to_owned()).collect();
    group.bench_function("parse_then_audit_1000", |b| {
        b.iter_batched(
            || compacts.clone(),
            |compacts| {
                let parsed: Vec<Receipt> = compacts
                    .iter()
                    .map(|c| Receipt::parse(c).unwrap())
                    .collect();
                audit_chain(&parsed, &keys).unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
