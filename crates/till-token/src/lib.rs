//! Till keys: scoped, activation-limited API keys as Biscuit tokens.
//!
//! A Till key is a [Biscuit](https://www.biscuitsec.org/) whose every block is a
//! *canonical caveat block*: a JSON declaration of its caveats in the block context and
//! exactly the Datalog checks generated from it (an attenuation block written by a stock
//! Biscuit library that cannot set a context may omit the declaration when its Datalog
//! alone is canonical: [`Caveats::from_block_source`]). The owner [`mint`]s a key with the root
//! key (stateless: a signature); any holder [`Token::attenuate`]s it offline by appending
//! a block, which can only narrow. A verifier needs only root public keys ([`KeyRing`],
//! rotation by root key id) to [`verify`] a key and [`VerifiedToken::authorize`] a request.
//! Caps bind activation counts that the ledger supplies; this crate does no I/O.
//!
//! Non-features: arbitrary Datalog, third-party blocks and sealed-key workflows are refused;
//! keys are bearer credentials (no proof of possession).
//!
//! Nothing in this crate logs, and no `Debug` or error output contains a key or private key.
//!
//! ```
//! use till_token::{mint, verify, Caveats, KeyRing, Limits, RequestFacts, RootKey};
//!
//! let root = RootKey::generate();
//! let key = mint(&root, Caveats { upstream: Some("openai".into()), cap: Some(3), ..Default::default() })?;
//! let (child, warnings) = key.attenuate(Caveats { cap: Some(2), methods: Some(vec!["POST".into()]), ..Default::default() })?;
//! assert!(warnings.is_empty());
//! let s = child.to_key_string()?;
//! assert!(s.starts_with("till_"));
//!
//! let verified = verify(&s, &KeyRing::with(root.public()), &Limits::default())?;
//! assert_eq!(verified.scope().cap, Some(2));
//! let req = RequestFacts { upstream: "openai", method: "POST", path: "/v1/chat/completions", model: None, now: 0 };
//! assert!(verified.authorize(&req, Some(&[2, 2]), &Limits::default()).is_ok());
//! assert!(verified.authorize(&req, Some(&[3, 3]), &Limits::default()).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod authorize;
mod caveat;
mod error;
mod key;
mod scope;
mod token;

pub use authorize::{
    check_block, check_block_call, AuthorizeError, CallFacts, JsonFact, RequestFacts,
};
pub use caveat::{path_matches, validate_upstream, Caveats, Window, CONTEXT_PREFIX, WINDOW_SECS};
pub use error::{CaveatKind, Refusal, TokenError};
pub use key::{KeyRing, RootKey, RootPublicKey};
pub use scope::{EffectiveScope, WorstCase};
pub use token::{
    attenuate_str, inspect, key_digest, mint, verify, BlockInfo, Inspection, Limits,
    SignatureStatus, Token, VerifiedToken, Warning, KEY_PREFIX,
};
