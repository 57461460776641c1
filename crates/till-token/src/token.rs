//! Mint, attenuate, parse and verify Till keys.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use biscuit_auth::{Biscuit, BiscuitBuilder, BlockBuilder, UnverifiedBiscuit};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::caveat::{path_matches, Caveats};
use crate::key::{KeyRing, RootKey};
use crate::scope::EffectiveScope;
use crate::TokenError;

/// Prefix of every Till key's string form, so humans and secret scanners recognise one.
pub const KEY_PREFIX: &str = "till_";

/// Limits checked before any expensive work (signature checks, Datalog).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted key, in decoded bytes.
    pub max_token_bytes: usize,
    /// Most blocks (authority included).
    pub max_blocks: usize,
    /// Datalog: most facts.
    pub max_facts: u64,
    /// Datalog: most rule iterations.
    pub max_iterations: u64,
    /// Datalog: longest evaluation. Biscuit's 1 ms default refuses valid keys on a busy
    /// machine, so Till sets its own.
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_token_bytes: 8 * 1024,
            max_blocks: 16,
            max_facts: 1_000,
            max_iterations: 100,
            max_time: Duration::from_millis(50),
        }
    }
}

/// A Till key: a Biscuit whose every block is a canonical Till caveat block.
///
/// `Debug` shows only the family id, never the key.
#[derive(Clone)]
pub struct Token {
    biscuit: Biscuit,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("family", &hex::encode(self.family_id()))
            .field("blocks", &self.biscuit.block_count())
            .finish_non_exhaustive()
    }
}

/// Something worth telling the person attenuating a key: the new block asks for more than
/// an earlier block allows, so that part of it has no effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Which caveat.
    pub caveat: &'static str,
    /// What happens.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Mints a key: the authority block carries `caveats`, which must name an upstream.
/// Stateless: a signature, no ledger write.
pub fn mint(root: &RootKey, caveats: Caveats) -> Result<Token, TokenError> {
    let caveats = caveats.normalize()?;
    if caveats.upstream.is_none() {
        return Err(TokenError::InvalidCaveat(
            "a minted key must name its upstream".into(),
        ));
    }
    let source = caveats.block_source(0)?;
    let builder = BiscuitBuilder::new()
        .code(&source)
        .map_err(biscuit_err)?
        .context(caveats.context()?)
        .root_key_id(root.id());
    let biscuit = builder.build(root.keypair()).map_err(biscuit_err)?;
    Ok(Token { biscuit })
}

impl Token {
    /// The string form: `till_` + unpadded base64url of the Biscuit bytes.
    pub fn to_key_string(&self) -> Result<String, TokenError> {
        let bytes = self.biscuit.to_vec().map_err(biscuit_err)?;
        Ok(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Family id: the authority block's revocation id.
    pub fn family_id(&self) -> Vec<u8> {
        self.biscuit
            .revocation_identifiers()
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// Appends a block with `caveats` (offline, no key needed). Returns warnings for parts
    /// of the request that earlier blocks already forbid.
    pub fn attenuate(&self, caveats: Caveats) -> Result<(Token, Vec<Warning>), TokenError> {
        let blocks = read_blocks(&self.biscuit)?;
        let existing: Vec<&Caveats> = blocks.iter().map(|b| &b.caveats).collect();
        let (block, warnings) = next_block(&existing, caveats)?;
        let biscuit = self.biscuit.append(block).map_err(biscuit_err)?;
        Ok((Token { biscuit }, warnings))
    }

    pub(crate) fn biscuit(&self) -> &Biscuit {
        &self.biscuit
    }
}

/// Validates a new block against the blocks before it and renders it: it must restrict
/// something and keep the family's upstream; widening requests become warnings.
fn next_block(
    existing: &[&Caveats],
    caveats: Caveats,
) -> Result<(BlockBuilder, Vec<Warning>), TokenError> {
    let caveats = caveats.normalize()?;
    if caveats.label.is_some() {
        return Err(TokenError::InvalidCaveat(
            "a label names a whole key family: only a minted key (the authority block) has one"
                .into(),
        ));
    }
    if caveats.is_empty() {
        return Err(TokenError::InvalidCaveat(
            "an attenuation must restrict something (cap, methods, paths, models, expiry, ceilings, repositories or windows)".into(),
        ));
    }
    let scope = EffectiveScope::of(existing.iter().copied());
    if let (Some(family), Some(requested)) = (&scope.upstream, &caveats.upstream) {
        if family != requested {
            return Err(TokenError::UpstreamMismatch {
                family: family.clone(),
                requested: requested.clone(),
            });
        }
    }
    let warnings = widening_warnings(&scope, &caveats);
    let source = caveats.block_source(existing.len())?;
    let block = BlockBuilder::new()
        .code(&source)
        .map_err(biscuit_err)?
        .context(caveats.context()?);
    Ok((block, warnings))
}

/// Appends a block to a key given as a string, without verifying its root signature
/// (the holder may not have the root public key). Every existing block must still be
/// canonical.
pub fn attenuate_str(
    key: &str,
    caveats: Caveats,
    limits: &Limits,
) -> Result<(String, Vec<Warning>), TokenError> {
    let bytes = decode_key(key, limits)?;
    let unverified = UnverifiedBiscuit::from(&bytes).map_err(malformed)?;
    check_block_count(unverified.block_count(), limits)?;
    // Validate canonical form of what we extend.
    let mut existing = Vec::new();
    for (i, ctx) in block_contexts(&bytes)?.into_iter().enumerate() {
        let caveats = canonical_caveats(i, ctx.as_deref(), unverified.print_block_source(i))?;
        existing.push(caveats);
    }
    check_family_upstream(existing.iter())?;
    // Refuse to write a key that `verify` would refuse.
    check_block_count(existing.len() + 1, limits)?;
    let (block, warnings) = next_block(&existing.iter().collect::<Vec<_>>(), caveats)?;
    let appended = unverified.append(block).map_err(biscuit_err)?;
    let out = appended.to_vec().map_err(biscuit_err)?;
    if out.len() > limits.max_token_bytes {
        return Err(TokenError::TooLarge {
            size: out.len(),
            max: limits.max_token_bytes,
        });
    }
    Ok((
        format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(out)),
        warnings,
    ))
}

/// One block of a verified (or inspected) key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockInfo {
    /// Position, 0 = authority.
    pub index: usize,
    /// Revocation id (hex). Unique per block; revoking it kills this block's key and its
    /// descendants.
    #[serde(with = "hex_bytes")]
    pub revocation_id: Vec<u8>,
    /// What the block declares (and enforces).
    pub caveats: Caveats,
}

/// A key whose signatures verified against a trusted root key and whose blocks are all
/// canonical. Cheap to clone (cache it by key hash).
#[derive(Clone)]
pub struct VerifiedToken {
    pub(crate) token: Token,
    pub(crate) root_key_id: u32,
    pub(crate) blocks: Vec<BlockInfo>,
    pub(crate) scope: EffectiveScope,
}

impl fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedToken")
            .field("root_key_id", &self.root_key_id)
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl VerifiedToken {
    /// The root key id it was minted with.
    pub fn root_key_id(&self) -> u32 {
        self.root_key_id
    }
    /// Every block, authority first.
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }
    /// Family id (authority block revocation id).
    pub fn family_id(&self) -> &[u8] {
        &self.blocks[0].revocation_id
    }
    /// The effective scope (the intersection of all blocks).
    pub fn scope(&self) -> &EffectiveScope {
        &self.scope
    }
    /// The underlying token.
    pub fn token(&self) -> &Token {
        &self.token
    }
}

/// Parses and verifies a key: size and block-count limits first, then the root key id
/// (unknown ids fail closed), then every signature, then canonical form of every block.
pub fn verify(key: &str, keys: &KeyRing, limits: &Limits) -> Result<VerifiedToken, TokenError> {
    let bytes = decode_key(key, limits)?;
    let unverified = UnverifiedBiscuit::from(&bytes).map_err(malformed)?;
    check_block_count(unverified.block_count(), limits)?;
    let root_key_id = match unverified.root_key_id() {
        Some(id) if keys.contains(id) => id,
        other => return Err(TokenError::UnknownRootKey(other)),
    };
    let biscuit = unverified
        .verify(keys)
        .map_err(|_| TokenError::BadSignature)?;
    // After the signatures, so a tampered key reports the tampering, not its symptoms.
    block_contexts(&bytes)?;
    let blocks = read_blocks(&biscuit)?;
    check_family_upstream(blocks.iter().map(|b| &b.caveats))?;
    let scope = EffectiveScope::of(blocks.iter().map(|b| &b.caveats));
    if scope.upstream.is_none() {
        return Err(TokenError::NotCanonical {
            block: 0,
            reason: "the authority block names no upstream".into(),
        });
    }
    Ok(VerifiedToken {
        token: Token { biscuit },
        root_key_id,
        blocks,
        scope,
    })
}

/// What `till inspect` shows. Built without a public key; `signature` says whether the
/// key verified against the keys given (if any).
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Root key id in the key.
    pub root_key_id: Option<u32>,
    /// Every block.
    pub blocks: Vec<BlockInfo>,
    /// The effective scope.
    pub effective: EffectiveScope,
    /// `verified`, `invalid` (with the reason) or `unchecked` (no public key given).
    pub signature: SignatureStatus,
}

/// Outcome of the signature check in [`inspect`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// Every signature verified against a trusted root key.
    Verified,
    /// Verification failed.
    Invalid {
        /// Stable code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// No root public key was available.
    Unchecked,
}

/// Decodes a key for display. Structural problems (bad encoding, non-canonical blocks) are
/// errors; a signature that does not verify is reported in [`Inspection::signature`].
pub fn inspect(
    key: &str,
    keys: Option<&KeyRing>,
    limits: &Limits,
) -> Result<Inspection, TokenError> {
    // With keys at hand, a signature failure explains a tampered key better than whatever
    // structural damage the tampering did.
    let signature = match keys {
        None => SignatureStatus::Unchecked,
        Some(keys) => match verify(key, keys, limits) {
            Ok(_) => SignatureStatus::Verified,
            Err(e @ (TokenError::BadSignature | TokenError::UnknownRootKey(_))) => {
                SignatureStatus::Invalid {
                    code: e.code(),
                    message: e.to_string(),
                }
            }
            Err(e) => return Err(e),
        },
    };
    let structure = inspect_structure(key, limits);
    match (structure, signature) {
        (Ok((root_key_id, blocks)), signature) => {
            let effective = EffectiveScope::of(blocks.iter().map(|b| &b.caveats));
            Ok(Inspection {
                root_key_id,
                blocks,
                effective,
                signature,
            })
        }
        (Err(_), SignatureStatus::Invalid { .. }) => Err(TokenError::BadSignature),
        (Err(e), _) => Err(e),
    }
}

fn inspect_structure(
    key: &str,
    limits: &Limits,
) -> Result<(Option<u32>, Vec<BlockInfo>), TokenError> {
    let bytes = decode_key(key, limits)?;
    let unverified = UnverifiedBiscuit::from(&bytes).map_err(malformed)?;
    check_block_count(unverified.block_count(), limits)?;
    let ids = unverified.revocation_identifiers();
    let mut blocks = Vec::new();
    for (i, ctx) in block_contexts(&bytes)?.into_iter().enumerate() {
        let caveats = canonical_caveats(i, ctx.as_deref(), unverified.print_block_source(i))?;
        blocks.push(BlockInfo {
            index: i,
            revocation_id: ids.get(i).cloned().unwrap_or_default(),
            caveats,
        });
    }
    check_family_upstream(blocks.iter().map(|b| &b.caveats))?;
    Ok((unverified.root_key_id(), blocks))
}

/// SHA-256 of the key string: the cache key and what logs may show instead of the key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn decode_key(key: &str, limits: &Limits) -> Result<Vec<u8>, TokenError> {
    let key = key.trim();
    let body = key
        .strip_prefix(KEY_PREFIX)
        .ok_or(TokenError::MissingPrefix)?;
    // base64 expands 3 bytes to 4 chars: check the size before decoding anything.
    let decoded_len = body.len() / 4 * 3 + (body.len() % 4).saturating_sub(1);
    if decoded_len > limits.max_token_bytes {
        return Err(TokenError::TooLarge {
            size: decoded_len,
            max: limits.max_token_bytes,
        });
    }
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::BadEncoding)
}

fn check_block_count(blocks: usize, limits: &Limits) -> Result<(), TokenError> {
    if blocks > limits.max_blocks {
        Err(TokenError::TooManyBlocks {
            blocks,
            max: limits.max_blocks,
        })
    } else {
        Ok(())
    }
}

fn read_blocks(biscuit: &Biscuit) -> Result<Vec<BlockInfo>, TokenError> {
    let ids = biscuit.revocation_identifiers();
    let contexts = biscuit.context();
    let mut blocks = Vec::with_capacity(contexts.len());
    for (i, ctx) in contexts.into_iter().enumerate() {
        if biscuit.block_external_key(i).ok().flatten().is_some() {
            return Err(TokenError::NotCanonical {
                block: i,
                reason: "third-party blocks are not part of Till's vocabulary".into(),
            });
        }
        let caveats = canonical_caveats(i, ctx.as_deref(), biscuit.print_block_source(i))?;
        blocks.push(BlockInfo {
            index: i,
            revocation_id: ids.get(i).cloned().unwrap_or_default(),
            caveats,
        });
    }
    Ok(blocks)
}

/// Every block's context (its declaration), after checking that each block carries
/// nothing but checks: no facts, rules, block-level scopes, public keys or third-party
/// signature. Biscuit's printed source omits block-level scopes and public keys, so the
/// text comparison in [`canonical_caveats`] alone cannot see them.
fn block_contexts(bytes: &[u8]) -> Result<Vec<Option<String>>, TokenError> {
    // UnverifiedBiscuit has no context accessor; decode the container's protobuf directly.
    use biscuit_auth::format::schema;
    use prost::Message as _;
    let container =
        schema::Biscuit::decode(bytes).map_err(|e| TokenError::Malformed(e.to_string()))?;
    std::iter::once(&container.authority)
        .chain(container.blocks.iter())
        .enumerate()
        .map(|(i, signed)| {
            let not_canonical = |reason: &str| TokenError::NotCanonical {
                block: i,
                reason: reason.into(),
            };
            if signed.external_signature.is_some() {
                return Err(not_canonical(
                    "third-party blocks are not part of Till's vocabulary",
                ));
            }
            let block = schema::Block::decode(signed.block.as_slice())
                .map_err(|e| TokenError::Malformed(e.to_string()))?;
            if !block.facts.is_empty() || !block.rules.is_empty() {
                return Err(not_canonical("a Till block carries checks only"));
            }
            if !block.scope.is_empty() || !block.public_keys.is_empty() {
                return Err(not_canonical(
                    "block-level scopes and public keys are not part of Till's vocabulary",
                ));
            }
            Ok(block.context)
        })
        .collect()
}

/// A later block may repeat the family's upstream but never name another one (attenuation
/// refuses to write such a block; one built by hand would make the key useless while its
/// effective scope still showed the first upstream).
fn check_family_upstream<'a>(
    blocks: impl IntoIterator<Item = &'a Caveats>,
) -> Result<(), TokenError> {
    let mut family: Option<&str> = None;
    for (i, c) in blocks.into_iter().enumerate() {
        match (family, c.upstream.as_deref()) {
            (None, u) => family = u,
            (Some(f), Some(u)) if f != u => {
                return Err(TokenError::NotCanonical {
                    block: i,
                    reason: format!("it names upstream `{u}` but the key is for `{f}`"),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that block `index` is exactly the canonical rendering of its declaration, or, for
/// an attenuation block without one, of the caveats read back from its Datalog.
fn canonical_caveats(
    index: usize,
    context: Option<&str>,
    source: Result<String, biscuit_auth::error::Token>,
) -> Result<Caveats, TokenError> {
    let not_canonical = |reason: String| TokenError::NotCanonical {
        block: index,
        reason,
    };
    let source = source.map_err(|e| not_canonical(e.to_string()))?;
    let caveats = match context {
        Some(context) => Caveats::from_context(context).map_err(not_canonical)?,
        // The authority block is minted by Till and always carries its declaration.
        None if index == 0 => {
            return Err(not_canonical("no Till caveat declaration".into()));
        }
        // An attenuation block written by a Biscuit library that cannot set a context: its
        // Datalog alone must be the canonical rendering of Till caveats (§13).
        None => {
            return Caveats::from_block_source(&source, index).map_err(|reason| {
                not_canonical(format!("no Till caveat declaration, and {reason}"))
            })
        }
    };
    if index == 0 && caveats.upstream.is_none() {
        return Err(not_canonical(
            "the authority block must name an upstream".into(),
        ));
    }
    if index > 0 && caveats.label.is_some() {
        return Err(not_canonical(
            "only the authority block may carry a label".into(),
        ));
    }
    let expected = caveats.block_source(index)?;
    if source != expected {
        return Err(not_canonical(
            "its Datalog does not match its declared caveats".into(),
        ));
    }
    Ok(caveats)
}

fn widening_warnings(scope: &EffectiveScope, new: &Caveats) -> Vec<Warning> {
    let mut warnings = Vec::new();
    if let (Some(have), Some(want)) = (scope.cap, new.cap) {
        if want > have {
            warnings.push(Warning {
                caveat: "cap",
                message: format!(
                    "cap {want} is above the cap {have} set by an earlier block; the effective cap stays {have}"
                ),
            });
        }
    }
    if let (Some(have), Some(want)) = (&scope.methods, &new.methods) {
        for m in want.iter().filter(|m| !have.contains(m)) {
            warnings.push(Warning {
                caveat: "methods",
                message: format!("method {m} is not allowed by an earlier block; it stays refused"),
            });
        }
    }
    if let (Some(have), Some(want)) = (&scope.models, &new.models) {
        for m in want.iter().filter(|m| !have.contains(m)) {
            warnings.push(Warning {
                caveat: "models",
                message: format!("model {m} is not allowed by an earlier block; it stays refused"),
            });
        }
    }
    if let (Some(have), Some(want)) = (&scope.paths, &new.paths) {
        for p in want
            .iter()
            .filter(|p| !have.iter().any(|h| path_matches(h, p)))
        {
            warnings.push(Warning {
                caveat: "paths",
                message: format!(
                    "path {p} is not fully inside the earlier blocks' paths; only the overlap is allowed"
                ),
            });
        }
    }
    for (caveat, have, want) in [
        (
            "max_output_tokens",
            scope.max_output_tokens,
            new.max_output_tokens,
        ),
        ("amount_max", scope.amount_max, new.amount_max),
    ] {
        if let (Some(have), Some(want)) = (have, want) {
            if want > have {
                warnings.push(Warning {
                    caveat,
                    message: format!(
                        "{caveat} {want} is above the {have} set by an earlier block; {have} still applies"
                    ),
                });
            }
        }
    }
    for (caveat, have, want) in [
        ("currencies", &scope.currencies, &new.currencies),
        ("repos", &scope.repos, &new.repos),
    ] {
        if let (Some(have), Some(want)) = (have, want) {
            for v in want.iter().filter(|v| !have.contains(v)) {
                warnings.push(Warning {
                    caveat,
                    message: format!("{v} is not allowed by an earlier block; it stays refused"),
                });
            }
        }
    }
    if let (Some(have), Some(want)) = (&scope.json_max, &new.json_max) {
        for (p, w) in want {
            if let Some(h) = have.get(p).filter(|h| w > h) {
                warnings.push(Warning {
                    caveat: "json_max",
                    message: format!("{p} ceiling {w} is above the {h} set by an earlier block; {h} still applies"),
                });
            }
        }
    }
    if let (Some(have), Some(want)) = (&scope.json_allow, &new.json_allow) {
        for (p, vs) in want {
            if let Some(h) = have.get(p) {
                for v in vs.iter().filter(|v| !h.contains(v)) {
                    warnings.push(Warning {
                        caveat: "json_allow",
                        message: format!(
                            "{p} value {v} is not allowed by an earlier block; it stays refused"
                        ),
                    });
                }
            }
        }
    }
    if let (Some(have), Some(want)) = (&scope.windows, &new.windows) {
        for w in want {
            if let Some(h) = have.iter().find(|h| h.secs == w.secs && w.max > h.max) {
                warnings.push(Warning {
                    caveat: "windows",
                    message: format!(
                        "{} per {} s is above the {} set by an earlier block; {} still applies",
                        w.max, w.secs, h.max, h.max
                    ),
                });
            }
        }
    }
    if let (Some(have), Some(want)) = (scope.expires, new.expires) {
        if want > have {
            warnings.push(Warning {
                caveat: "expires",
                message:
                    "expiry is later than an earlier block's; the earlier expiry still applies"
                        .into(),
            });
        }
    }
    warnings
}

pub(crate) fn biscuit_err(e: biscuit_auth::error::Token) -> TokenError {
    TokenError::Biscuit(e.to_string())
}

fn malformed(e: biscuit_auth::error::Token) -> TokenError {
    TokenError::Malformed(e.to_string())
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }
}
