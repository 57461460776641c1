//! Property tests: encodings round-trip, and no single-byte change to a receipt survives
//! parse + verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use till_receipt::{
    Receipt, ReceiptBody, ReceiptKeySet, ReceiptPublicKey, ReceiptSigner, RequestDigest, SlotClaim,
};

fn signer() -> ReceiptSigner {
    ReceiptSigner::from_seed([5; 32])
}

fn keys() -> ReceiptKeySet {
    [signer().public_key()].into_iter().collect()
}

fn slot_claim() -> impl Strategy<Value = SlotClaim> {
    (
        any::<u32>(),
        "[0-9a-f]{0,128}",
        any::<u64>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(block, revocation_id, slot, cap)| SlotClaim {
            block,
            revocation_id,
            slot,
            cap,
        })
}

fn request() -> impl Strategy<Value = RequestDigest> {
    (
        any::<String>(),
        any::<String>(),
        any::<String>(),
        "[0-9a-f]{64}",
        any::<Option<String>>(),
        any::<Option<String>>(),
        any::<Option<String>>(),
    )
        .prop_map(
            |(method, upstream, path, body_sha256, model, query, content_type)| RequestDigest {
                method,
                upstream,
                path,
                body_sha256,
                model,
                query,
                content_type,
            },
        )
}

/// Arbitrary bodies signed by `signer()` (any Unicode in the strings, any integers).
fn body() -> impl Strategy<Value = ReceiptBody> {
    (
        any::<String>(),
        any::<u64>(),
        proptest::collection::vec(slot_claim(), 0..4),
        request(),
        any::<u64>(),
        any::<String>(),
        any::<String>(),
        any::<Option<String>>(),
        any::<Option<String>>(),
    )
        .prop_map(
            |(family, seq, slots, request, iat, proxy, idempotency_key, prev, ledger)| {
                ReceiptBody {
                    v: 2,
                    family,
                    seq,
                    slots,
                    request,
                    iat,
                    proxy,
                    kid: signer().key_id().to_owned(),
                    idempotency_key,
                    prev,
                    ledger,
                    ceilings: None,
                    void: None,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sign_parse_verify_round_trips(body in body()) {
        let receipt = signer().sign(&body).unwrap();
        let parsed = Receipt::parse(receipt.compact()).unwrap();
        prop_assert_eq!(&parsed, &receipt);
        prop_assert_eq!(parsed.body(), &body);
        prop_assert!(parsed.verify(&keys()).is_ok());
    }

    #[test]
    fn any_single_byte_tamper_is_rejected(
        body in body(),
        position in any::<prop::sample::Index>(),
        replacement in any::<u8>(),
    ) {
        let receipt = signer().sign(&body).unwrap();
        let mut bytes = receipt.compact().as_bytes().to_vec();
        let i = position.index(bytes.len());
        prop_assume!(bytes[i] != replacement);
        bytes[i] = replacement;
        // A byte that makes the string invalid UTF-8 is replaced by U+FFFD: still a change.
        let tampered = String::from_utf8_lossy(&bytes);
        let outcome = Receipt::parse(&tampered).and_then(|r| r.verify(&keys()));
        prop_assert!(outcome.is_err(), "accepted tamper at byte {} -> {:?}", i, replacement);
    }

    #[test]
    fn parse_never_panics_on_garbage(text in ".{0,300}") {
        let _ = Receipt::parse(&text);
    }

    #[test]
    fn parse_never_panics_on_three_base64_parts(
        a in "[A-Za-z0-9_-]{0,120}",
        b in "[A-Za-z0-9_-]{0,400}",
        c in "[A-Za-z0-9_-]{0,100}",
    ) {
        let _ = Receipt::parse(&format!("{a}.{b}.{c}"));
    }

    #[test]
    fn jwk_round_trips(seed in any::<[u8; 32]>()) {
        let signer = ReceiptSigner::from_seed(seed);
        let public = signer.public_key();
        prop_assert_eq!(&ReceiptPublicKey::from_jwk(&public.to_jwk()).unwrap(), &public);
        let back = ReceiptSigner::from_private_jwk(&signer.to_private_jwk()).unwrap();
        prop_assert_eq!(back.public_key(), public);
        prop_assert_eq!(back.to_private_jwk(), signer.to_private_jwk());
    }
}
