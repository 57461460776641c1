//! Test vectors for `spec/receipt.md`: generated deterministically (fixed seed, fixed
//! bodies; Ed25519 signing is deterministic) and checked byte for byte against the
//! committed files. Regenerate with `TILL_REGEN_VECTORS=1 cargo test -p till-receipt
//! --test vectors` after a deliberate format change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use till_receipt::{
    audit_chain, AuditReport, Receipt, ReceiptBody, ReceiptKeySet, ReceiptPublicKey, ReceiptSigner,
    RequestDigest, SlotClaim,
};

/// Test-only signing seed (published in the vector file; never use it for anything else).
const SEED: [u8; 32] = *b"till receipt test vector seed 01";
/// A second test-only key: signs the "wrong key" and "unknown kid" invalid vectors.
const OTHER_SEED: [u8; 32] = *b"till receipt test vector seed 02";

#[derive(Serialize, Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    kid: String,
    x: String,
}

#[derive(Serialize)]
struct ValidFile {
    description: &'static str,
    signer_seed_hex: String,
    public_jwk: Jwk,
    receipts: Vec<ValidVector>,
    audit: AuditReport,
}

#[derive(Serialize)]
struct ValidVector {
    compact: String,
    body: ReceiptBody,
    hash: String,
}

#[derive(Serialize)]
struct InvalidFile {
    description: &'static str,
    public_jwk: Jwk,
    cases: Vec<InvalidVector>,
}

#[derive(Serialize)]
struct InvalidVector {
    name: &'static str,
    compact: String,
    /// `ReceiptError::code()` that `Receipt::parse` then `Receipt::verify` must return.
    error: &'static str,
    /// True when the JWS signature itself is invalid under `public_jwk`, so any stock
    /// JOSE verifier must reject it too (the others break Till's own rules).
    jose_must_reject: bool,
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../spec/vectors")
}

/// A realistic 64-byte (Biscuit ed25519 signature) revocation id, in hex.
fn revocation_id(name: &str) -> String {
    let a = Sha256::digest(name.as_bytes());
    let b = Sha256::digest(format!("{name}#2").as_bytes());
    format!("{}{}", hex::encode(a), hex::encode(b))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn public_jwk(signer: &ReceiptSigner) -> Jwk {
    serde_json::from_str(&signer.public_key().to_jwk()).unwrap()
}

/// The 3-receipt chain: one activation through the minted token (cap 10), then two through
/// an attenuated token (cap 2), which exhausts the attenuated token.
fn chain(signer: &ReceiptSigner) -> Vec<Receipt> {
    let root = revocation_id("till vector root block");
    let child = revocation_id("till vector attenuated block");
    let chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let requests = [
        (
            vec![(root.as_str(), 1)],
            RequestDigest {
                method: "GET".into(),
                upstream: "openai".into(),
                path: "/v1/models".into(),
                body_sha256: sha256_hex(b""),
                model: None,
                query: None,
                content_type: None,
            },
        ),
        (
            vec![(root.as_str(), 2), (child.as_str(), 1)],
            RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: "/v1/chat/completions".into(),
                body_sha256: sha256_hex(chat),
                model: Some("gpt-4o-mini".into()),
                query: None,
                content_type: None,
            },
        ),
        (
            vec![(root.as_str(), 3), (child.as_str(), 2)],
            RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: "/v1/chat/completions".into(),
                body_sha256: sha256_hex(chat),
                model: Some("gpt-4o-mini".into()),
                query: None,
                content_type: None,
            },
        ),
    ];
    let mut out: Vec<Receipt> = Vec::new();
    for (i, (levels, request)) in requests.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let slots = levels
            .into_iter()
            .enumerate()
            .map(|(block, (rid, slot))| SlotClaim {
                block: block as u32,
                revocation_id: rid.to_owned(),
                slot,
                cap: Some(if block == 0 { 10 } else { 2 }),
            })
            .collect();
        let body = ReceiptBody {
            v: 2,
            family: root.clone(),
            seq,
            slots,
            request,
            iat: 1_767_225_600 + 60 * seq,
            proxy: "proxy-a".into(),
            kid: signer.key_id().into(),
            idempotency_key: format!("idem-{seq:04}"),
            prev: out.last().map(Receipt::hash_hex),
            ledger: Some(format!(
                "9f2c41d07a5be3186e0d4c2a7b91f35e@{}",
                signer.key_id()
            )),
            ceilings: None,
            void: None,
        };
        out.push(signer.sign(&body).unwrap());
    }
    out
}

/// The void chain (issue 10 item 12): a key with cap 1 claims (seq 1), the upstream is
/// unreachable so the slot is given back (seq 2, `void: 1`), and the retry claims slot 1
/// again (seq 3). Two claims, one void, one activation charged: the cap stays exact.
fn void_chain(signer: &ReceiptSigner) -> Vec<Receipt> {
    let root = revocation_id("till vector void root block");
    let chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let request = RequestDigest {
        method: "POST".into(),
        upstream: "openai".into(),
        path: "/v1/chat/completions".into(),
        body_sha256: sha256_hex(chat),
        model: Some("gpt-4o-mini".into()),
        query: None,
        content_type: Some("application/json".into()),
    };
    let ledger = format!("9f2c41d07a5be3186e0d4c2a7b91f35e@{}", signer.key_id());
    let claim_body = |seq: u64, prev: Option<String>, idem: &str| ReceiptBody {
        v: 2,
        family: root.clone(),
        seq,
        slots: vec![SlotClaim {
            block: 0,
            revocation_id: root.clone(),
            slot: 1,
            cap: Some(1),
        }],
        request: request.clone(),
        iat: 1_767_225_600 + seq,
        proxy: "proxy-a".into(),
        kid: signer.key_id().into(),
        idempotency_key: idem.into(),
        prev,
        ledger: Some(ledger.clone()),
        ceilings: None,
        void: None,
    };
    let first = signer.sign(&claim_body(1, None, "idem-void-1")).unwrap();
    let mut void = claim_body(2, Some(first.hash_hex()), "idem-void-1");
    void.void = Some(1);
    let void = signer.sign(&void).unwrap();
    // The SDK's retry with the same Idempotency-Key claims afresh after the void.
    let retry = signer
        .sign(&claim_body(3, Some(void.hash_hex()), "idem-void-1"))
        .unwrap();
    vec![first, void, retry]
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn parts(compact: &str) -> (String, String, Vec<u8>) {
    let p: Vec<&str> = compact.split('.').collect();
    (
        String::from_utf8(URL_SAFE_NO_PAD.decode(p[0]).unwrap()).unwrap(),
        String::from_utf8(URL_SAFE_NO_PAD.decode(p[1]).unwrap()).unwrap(),
        URL_SAFE_NO_PAD.decode(p[2]).unwrap(),
    )
}

/// Signs arbitrary header and payload text (what `ReceiptSigner::sign` refuses to make).
fn sign_raw(seed: &[u8; 32], header: &str, payload: &str) -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(seed);
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = key.sign(input.as_bytes()).to_bytes();
    format!("{input}.{}", b64(&sig))
}

/// The same base64url text with the unused low bits of its last character set (for a
/// 64-byte value: 86 characters, the last carrying 2 data bits and 4 unused ones).
fn set_unused_bits(b64url: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let (head, last) = b64url.split_at(b64url.len() - 1);
    let index = ALPHABET
        .iter()
        .position(|&c| c == last.as_bytes()[0])
        .unwrap();
    assert_eq!(index & 0x0f, 0);
    format!("{head}{}", char::from(ALPHABET[index | 0x0f]))
}

fn invalid_cases(signer: &ReceiptSigner, good: &Receipt) -> Vec<InvalidVector> {
    let kid = signer.key_id();
    let other = ReceiptSigner::from_seed(OTHER_SEED);
    let (header, payload, sig) = parts(good.compact());
    let p: Vec<&str> = good.compact().split('.').collect();
    let hdr = |alg: &str, kid: &str, typ: &str| -> String {
        format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"{typ}"}}"#)
    };
    let ours = |h: &str, b: &str| sign_raw(&SEED, h, b);
    let case = |name, compact, error, jose_must_reject| InvalidVector {
        name,
        compact,
        error,
        jose_must_reject,
    };
    let tampered = payload.replacen(r#""seq":1"#, r#""seq":4"#, 1);
    assert_ne!(tampered, payload);
    vec![
        case(
            "tampered_payload",
            format!("{}.{}.{}", p[0], b64(tampered.as_bytes()), p[2]),
            "bad_signature",
            true,
        ),
        case(
            "other_key_under_our_kid",
            sign_raw(&OTHER_SEED, &header, &payload),
            "bad_signature",
            true,
        ),
        case(
            "unknown_kid",
            sign_raw(
                &OTHER_SEED,
                &hdr("EdDSA", other.key_id(), "till-receipt+jwt"),
                &payload.replacen(kid, other.key_id(), 1),
            ),
            "unknown_key_id",
            true,
        ),
        case(
            "alg_none",
            format!(
                "{}.{}.",
                b64(hdr("none", kid, "till-receipt+jwt").as_bytes()),
                p[1]
            ),
            "unsupported_algorithm",
            true,
        ),
        case(
            "alg_hs256",
            format!(
                "{}.{}.{}",
                b64(hdr("HS256", kid, "till-receipt+jwt").as_bytes()),
                p[1],
                p[2]
            ),
            "unsupported_algorithm",
            true,
        ),
        case(
            "two_parts",
            format!("{}.{}", p[0], p[1]),
            "part_count",
            true,
        ),
        case(
            "truncated_signature",
            format!("{}.{}.{}", p[0], p[1], b64(&sig[..63])),
            "signature_length",
            true,
        ),
        case(
            "padded_signature",
            format!("{}==", good.compact()),
            "base64",
            false,
        ),
        case(
            "typ_jwt",
            ours(&hdr("EdDSA", kid, "JWT"), &payload),
            "wrong_type",
            false,
        ),
        case(
            "missing_kid",
            ours(r#"{"alg":"EdDSA","typ":"till-receipt+jwt"}"#, &payload),
            "missing_key_id",
            false,
        ),
        case(
            "header_reordered",
            ours(
                &format!(r#"{{"typ":"till-receipt+jwt","alg":"EdDSA","kid":"{kid}"}}"#),
                &payload,
            ),
            "non_canonical_header",
            false,
        ),
        case(
            "header_extra_member",
            ours(
                &format!(
                    r#"{{"alg":"EdDSA","kid":"{kid}","typ":"till-receipt+jwt","jku":"https://example.invalid/keys"}}"#
                ),
                &payload,
            ),
            "header_json",
            false,
        ),
        case(
            "unknown_body_field",
            ours(
                &header,
                &payload.replacen(r#""v":2"#, r#""v":2,"admin":true"#, 1),
            ),
            "malformed",
            false,
        ),
        case(
            "version_3",
            ours(&header, &payload.replacen(r#""v":2"#, r#""v":3"#, 1)),
            "unsupported_version",
            false,
        ),
        case(
            "version_1_with_a_version_2_member",
            ours(
                &header,
                &payload.replacen(r#""v":2"#, r#""v":1"#, 1).replacen(
                    r#""},"iat":"#,
                    r#"","query":"a=1"},"iat":"#,
                    1,
                ),
            ),
            "malformed",
            false,
        ),
        case(
            // The signature's last character with its 4 unused bits set: the same 64 bytes
            // to a lenient decoder (so lax JOSE libraries accept it), refused by Till.
            "signature_unused_bits_set",
            format!("{}.{}.{}", p[0], p[1], set_unused_bits(p[2])),
            "base64",
            false,
        ),
        case(
            "payload_whitespace",
            ours(&header, &payload.replacen(r#""seq":1"#, r#""seq": 1"#, 1)),
            "non_canonical_payload",
            false,
        ),
        case(
            "kid_mismatch",
            ours(&hdr("EdDSA", other.key_id(), "till-receipt+jwt"), &payload),
            "key_id_mismatch",
            false,
        ),
    ]
}

fn render<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    text
}

/// Writes the file under `TILL_REGEN_VECTORS=1`, else demands byte-for-byte equality.
fn check_or_write(name: &str, expected: &str) {
    let path = vectors_dir().join(name);
    if std::env::var("TILL_REGEN_VECTORS").as_deref() == Ok("1") {
        std::fs::create_dir_all(vectors_dir()).unwrap();
        std::fs::write(&path, expected).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with TILL_REGEN_VECTORS=1)",
            path.display()
        )
    });
    assert!(
        committed == expected,
        "{} differs from the generator's output: the receipt format changed. If deliberate, \
         regenerate with TILL_REGEN_VECTORS=1 and update spec/receipt.md.",
        path.display()
    );
}

fn keys(signer: &ReceiptSigner) -> ReceiptKeySet {
    [signer.public_key()].into_iter().collect()
}

#[test]
fn valid_vectors_match_committed_file() {
    let signer = ReceiptSigner::from_seed(SEED);
    let receipts = chain(&signer);
    let audit = audit_chain(&receipts, &keys(&signer)).unwrap();
    let file = ValidFile {
        description: "Till receipt test vectors (spec/receipt.md). A 3-receipt chain of one \
                      family: receipt 1 through the minted token (cap 10), receipts 2 and 3 \
                      through an attenuated token (cap 2). The seed is for tests only.",
        signer_seed_hex: hex::encode(SEED),
        public_jwk: public_jwk(&signer),
        receipts: receipts
            .iter()
            .map(|r| ValidVector {
                compact: r.compact().to_owned(),
                body: r.body().clone(),
                hash: r.hash_hex(),
            })
            .collect(),
        audit,
    };
    check_or_write("receipts.json", &render(&file));
}

#[test]
fn void_vectors_match_committed_file() {
    let signer = ReceiptSigner::from_seed(SEED);
    let receipts = void_chain(&signer);
    let audit = audit_chain(&receipts, &keys(&signer)).unwrap();
    assert_eq!((audit.claims, audit.voids, audit.charged), (2, 1, 1));
    let file = ValidFile {
        description:
            "Till void receipt test vectors (spec/receipt.md, void receipts). One family, \
                      cap 1: receipt 1 claims slot 1; the upstream was unreachable, so \
                      receipt 2 (`void: 1`) gives the slot back; receipt 3 (the retry, same \
                      idempotency key) claims slot 1 again. The seed is for tests only.",
        signer_seed_hex: hex::encode(SEED),
        public_jwk: public_jwk(&signer),
        receipts: receipts
            .iter()
            .map(|r| ValidVector {
                compact: r.compact().to_owned(),
                body: r.body().clone(),
                hash: r.hash_hex(),
            })
            .collect(),
        audit,
    };
    check_or_write("receipts-void.json", &render(&file));
}

#[test]
fn invalid_vectors_match_committed_file() {
    let signer = ReceiptSigner::from_seed(SEED);
    let receipts = chain(&signer);
    let file = InvalidFile {
        description: "Till receipts that must be rejected (spec/receipt.md). `error` is the \
                      ReceiptError code from parse-then-verify under public_jwk; \
                      `jose_must_reject` marks cases whose JWS signature is itself invalid.",
        public_jwk: public_jwk(&signer),
        cases: invalid_cases(&signer, &receipts[0]),
    };
    check_or_write("receipts-invalid.json", &render(&file));
}

/// Reads the committed files as an independent consumer would (JSON, not the generator).
#[test]
fn committed_vectors_verify_and_invalid_ones_fail_with_their_code() {
    if std::env::var("TILL_REGEN_VECTORS").as_deref() == Ok("1") {
        return; // the files are being rewritten by the other tests right now
    }
    let valid: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(vectors_dir().join("receipts.json")).unwrap(),
    )
    .unwrap();
    let key = ReceiptPublicKey::from_jwk(&valid["public_jwk"].to_string()).unwrap();
    let keys: ReceiptKeySet = [key].into_iter().collect();
    let mut receipts = Vec::new();
    for v in valid["receipts"].as_array().unwrap() {
        let receipt = Receipt::parse(v["compact"].as_str().unwrap()).unwrap();
        receipt.verify(&keys).unwrap();
        assert_eq!(receipt.hash_hex(), v["hash"].as_str().unwrap());
        let body: ReceiptBody = serde_json::from_value(v["body"].clone()).unwrap();
        assert_eq!(receipt.body(), &body);
        receipts.push(receipt);
    }
    assert_eq!(receipts.len(), 3);
    let report = audit_chain(&receipts, &keys).unwrap();
    assert_eq!(serde_json::to_value(&report).unwrap(), valid["audit"]);

    // The void chain, read back the same way.
    let voids: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(vectors_dir().join("receipts-void.json")).unwrap(),
    )
    .unwrap();
    let mut chain = Vec::new();
    for v in voids["receipts"].as_array().unwrap() {
        let receipt = Receipt::parse(v["compact"].as_str().unwrap()).unwrap();
        receipt.verify(&keys).unwrap();
        assert_eq!(receipt.hash_hex(), v["hash"].as_str().unwrap());
        chain.push(receipt);
    }
    assert_eq!(chain[1].body().void, Some(1));
    let report = audit_chain(&chain, &keys).unwrap();
    assert_eq!(serde_json::to_value(&report).unwrap(), voids["audit"]);
    assert_eq!(report.charged, 1);

    let invalid: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(vectors_dir().join("receipts-invalid.json")).unwrap(),
    )
    .unwrap();
    let cases = invalid["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let result =
            Receipt::parse(case["compact"].as_str().unwrap()).and_then(|r| r.verify(&keys));
        let err = result.expect_err(name);
        assert_eq!(err.code(), case["error"].as_str().unwrap(), "{name}: {err}");
    }
}
