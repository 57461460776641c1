//! The signed content of a receipt: plain data, serialized with serde_json in struct
//! field order. That serialization is the JWS payload, and it is canonical: parsing
//! re-serializes the decoded body and rejects any payload that differs.

use serde::{Deserialize, Serialize};

/// The receipt format version this crate writes.
///
/// Version 2 chains over the JWS signing input: `prev` is SHA-256 of the previous
/// receipt's `BASE64URL(header) "." BASE64URL(payload)`, which the signature fixes, so
/// no verifier's leniency about the signature's encoding can give one receipt two links.
/// Version 1 (`prev` = SHA-256 of the previous compact string) is still parsed and
/// audited, so chains written before the change keep verifying.
pub const RECEIPT_VERSION: u32 = 2;

/// The oldest receipt format version this crate accepts.
pub const MIN_RECEIPT_VERSION: u32 = 1;

/// What was asked of the upstream, reduced to a digest that an auditor can recompute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestDigest {
    /// HTTP method, upper case.
    pub method: String,
    /// Upstream name from config (e.g. `openai`).
    pub upstream: String,
    /// Normalised request path (no query string; see `query`).
    pub path: String,
    /// Lower-case hex SHA-256 of the request body as received.
    pub body_sha256: String,
    /// The JSON body's `model` field when the upstream is an LLM API and one was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The query string as forwarded (without Till's key and without the upstream's
    /// credential parameter); absent when none is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The request's `Content-Type`, normalised (media type and parameter names in lower
    /// case, no optional whitespace); absent when the request has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// The slot taken at one level (block) of the presented token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotClaim {
    /// Block index in the token (0 = authority block).
    pub block: u32,
    /// Lower-case hex of that block's revocation id.
    pub revocation_id: String,
    /// The activation number this claim took at that level ("k" of "k of N"), 1-based.
    pub slot: u64,
    /// That block's declared cap ("N"), if it declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
}

/// The signed content of a receipt (the JWS payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    /// Format version: [`RECEIPT_VERSION`] for new receipts; [`MIN_RECEIPT_VERSION`]..
    /// are accepted.
    pub v: u32,
    /// Token family id: lower-case hex revocation id of the authority block.
    pub family: String,
    /// Position in the family's receipt chain, 1-based; equals the authority block's slot.
    pub seq: u64,
    /// One entry per block of the presented token, in block order.
    pub slots: Vec<SlotClaim>,
    /// What was forwarded.
    pub request: RequestDigest,
    /// Claim time, Unix seconds.
    pub iat: u64,
    /// Identifier of the proxy that took the claim.
    pub proxy: String,
    /// Key id of the receipt key that signed this receipt.
    pub kid: String,
    /// Client-supplied `Idempotency-Key`, or the id the ledger generated.
    pub idempotency_key: String,
    /// The link to the family's previous receipt: lower-case hex of its
    /// [`crate::Receipt::hash`] (SHA-256 of its JWS signing input) in version 2, of its
    /// [`crate::Receipt::compact_hash`] in version 1; `None` for `seq == 1`. Always
    /// serialized (as `null` when `None`).
    #[serde(default)]
    pub prev: Option<String>,
    /// Id of the ledger that took the claim (version 2; omitted when the ledger has
    /// none). A ledger id is written once when a ledger is created, so receipts of one
    /// family from two ledgers (e.g. after a ledger was emptied and started over at
    /// `seq` 1) carry different ids: an auditor sees the reset as a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<String>,
    /// The per-call ceilings and windowed caps that applied to this request (the
    /// effective values over the key's blocks), so an auditor can bound what one call
    /// could cost. Absent when the key has none (older receipts never carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceilings: Option<Ceilings>,
    /// Present only in a **void receipt**: the `seq` of the earlier claim receipt of the
    /// same family whose slot this receipt gives back (the upstream was unreachable and
    /// nothing of the request was sent). A void repeats that claim's `slots`, `request`
    /// and `idempotency_key`; its own `seq` and `prev` place it in the chain like any
    /// receipt. Absent in claim receipts (and in every version-1 receipt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub void: Option<u64>,
}

/// What bounded one call besides the activation caps (spec/receipt.md): each member is
/// the effective (tightest) value over the key's blocks; absent members did not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ceilings {
    /// Output tokens the request could ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Amount (minor units) the request could state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_max: Option<u64>,
    /// Currencies it could use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currencies: Option<Vec<String>>,
    /// Repositories it could reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<String>>,
    /// Ceilings on JSON body members, by JSON pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_max: Option<std::collections::BTreeMap<String, u64>>,
    /// Allowed values of JSON body members, by JSON pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_allow: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// Windowed caps `[seconds, max]`, tightest per window length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<[u64; 2]>>,
}

impl Ceilings {
    /// True when nothing applied (then a receipt omits the member).
    pub fn is_empty(&self) -> bool {
        self == &Ceilings::default()
    }
}

impl ReceiptBody {
    /// True for a void receipt (one that gives a claim's slot back).
    pub fn is_void(&self) -> bool {
        self.void.is_some()
    }

    /// The name of the first member this body carries that its version `v` does not
    /// have (`request.query`, `request.content_type` and `ledger` are new in version 2).
    pub(crate) fn member_newer_than_version(&self) -> Option<&'static str> {
        if self.v >= 2 {
            return None;
        }
        if self.request.query.is_some() {
            Some("request.query")
        } else if self.request.content_type.is_some() {
            Some("request.content_type")
        } else if self.ledger.is_some() {
            Some("ledger")
        } else if self.ceilings.is_some() {
            Some("ceilings")
        } else if self.void.is_some() {
            Some("void")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ReceiptBody {
        ReceiptBody {
            v: 2,
            family: "aa".into(),
            seq: 1,
            slots: vec![SlotClaim {
                block: 0,
                revocation_id: "aa".into(),
                slot: 1,
                cap: Some(3),
            }],
            request: RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: "/v1/chat/completions".into(),
                body_sha256: "00".into(),
                model: None,
                query: None,
                content_type: None,
            },
            iat: 1,
            proxy: "p".into(),
            kid: "r-00".into(),
            idempotency_key: "k".into(),
            prev: None,
            ledger: None,
            ceilings: None,
            void: None,
        }
    }

    #[test]
    fn serializes_in_struct_order_without_whitespace() {
        let json = serde_json::to_string(&body()).unwrap();
        assert_eq!(
            json,
            r#"{"v":2,"family":"aa","seq":1,"slots":[{"block":0,"revocation_id":"aa","slot":1,"cap":3}],"request":{"method":"POST","upstream":"openai","path":"/v1/chat/completions","body_sha256":"00"},"iat":1,"proxy":"p","kid":"r-00","idempotency_key":"k","prev":null}"#
        );
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let json = serde_json::to_string(&body()).unwrap();
        for (from, to) in [
            (r#"{"v":2"#, r#"{"x":0,"v":2"#),
            (r#""slot":1"#, r#""slot":1,"x":0"#),
            (r#""method":"POST""#, r#""method":"POST","x":0"#),
        ] {
            let bad = json.replacen(from, to, 1);
            assert_ne!(bad, json);
            assert!(serde_json::from_str::<ReceiptBody>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_fields_are_rejected() {
        let json = serde_json::to_string(&body()).unwrap();
        let bad = json.replacen(r#""iat":1"#, r#""iat":1,"iat":2"#, 1);
        assert!(serde_json::from_str::<ReceiptBody>(&bad).is_err());
    }
}
