//! Shared fixtures: deterministic keys built through biscuit-auth directly (`mint` and
//! `attenuate` draw each block's next key pair from the OS RNG, so only a hand-driven
//! build with fixed next key pairs is byte-stable), and hand-built non-canonical keys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use biscuit_auth::builder::Scope;
use biscuit_auth::datalog::SymbolTable;
use biscuit_auth::format::schema;
use biscuit_auth::{Algorithm, Biscuit, BiscuitBuilder, BlockBuilder, KeyPair, PrivateKey};
use prost::Message as _;
use till_token::{Caveats, KeyRing, RootKey, KEY_PREFIX};

/// Seed of the root key every vector is minted with.
pub const ROOT_SEED: [u8; 32] = [0x11; 32];
/// Seed of a second, untrusted root key.
pub const OTHER_ROOT_SEED: [u8; 32] = [0x22; 32];

pub fn root() -> RootKey {
    RootKey::from_seed(&ROOT_SEED).unwrap()
}

pub fn other_root() -> RootKey {
    RootKey::from_seed(&OTHER_ROOT_SEED).unwrap()
}

pub fn ring() -> KeyRing {
    KeyRing::with(root().public())
}

/// An ed25519 key pair from a seed made of one repeated byte.
pub fn keypair(seed: [u8; 32]) -> KeyPair {
    KeyPair::from(&PrivateKey::from_bytes(&seed, Algorithm::Ed25519).unwrap())
}

/// The next-block key pair for block `index` of vector `vector`: fixed, so the bytes are.
pub fn next_keypair(vector: u8, index: u8) -> KeyPair {
    let mut seed = [0x5a; 32];
    seed[0] = vector;
    seed[1] = index;
    keypair(seed)
}

pub fn key_string(b: &Biscuit) -> String {
    format!(
        "{KEY_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(b.to_vec().unwrap())
    )
}

pub fn key_bytes(key: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(key.strip_prefix(KEY_PREFIX).unwrap())
        .unwrap()
}

pub fn key_from_bytes(bytes: &[u8]) -> String {
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What `mint` does, with a fixed next key pair.
pub fn det_mint(root_seed: [u8; 32], caveats: &Caveats, next: &KeyPair) -> Biscuit {
    let c = caveats.clone().normalize().unwrap();
    det_raw_mint(
        root_seed,
        &c.block_source(0).unwrap(),
        Some(c.context().unwrap()),
        next,
    )
}

/// What `attenuate` does, with a fixed next key pair.
pub fn det_attenuate(parent: &Biscuit, caveats: &Caveats, next: &KeyPair) -> Biscuit {
    let c = caveats.clone().normalize().unwrap();
    let index = parent.block_count();
    det_raw_append(
        parent,
        &c.block_source(index).unwrap(),
        Some(c.context().unwrap()),
        next,
    )
}

/// An authority block with arbitrary Datalog and context, root key id set.
pub fn det_raw_mint(
    root_seed: [u8; 32],
    source: &str,
    context: Option<String>,
    next: &KeyPair,
) -> Biscuit {
    let root = RootKey::from_seed(&root_seed).unwrap();
    raw_builder(source, context)
        .root_key_id(root.id())
        .build_with_key_pair(&keypair(root_seed), SymbolTable::new(), next)
        .unwrap()
}

fn raw_builder(source: &str, context: Option<String>) -> BiscuitBuilder {
    let mut b = BiscuitBuilder::new();
    if !source.is_empty() {
        b = b.code(source).unwrap();
    }
    if let Some(ctx) = context {
        b = b.context(ctx);
    }
    b
}

/// Appends a block with arbitrary Datalog and context.
pub fn det_raw_append(
    parent: &Biscuit,
    source: &str,
    context: Option<String>,
    next: &KeyPair,
) -> Biscuit {
    parent
        .append_with_keypair(next, raw_block(source, context))
        .unwrap()
}

pub fn raw_block(source: &str, context: Option<String>) -> BlockBuilder {
    let mut b = BlockBuilder::new();
    if !source.is_empty() {
        b = b.code(source).unwrap();
    }
    if let Some(ctx) = context {
        b = b.context(ctx);
    }
    b
}

/// A canonical block plus a block-level `trusting previous` scope (which Biscuit's printed
/// source does not show).
pub fn det_append_with_scope(parent: &Biscuit, caveats: &Caveats, next: &KeyPair) -> Biscuit {
    let c = caveats.clone().normalize().unwrap();
    let block = raw_block(
        &c.block_source(parent.block_count()).unwrap(),
        Some(c.context().unwrap()),
    )
    .scope(Scope::Previous);
    parent.append_with_keypair(next, block).unwrap()
}

/// A canonical block appended as a third-party block signed by `external`.
pub fn det_append_third_party(
    parent: &Biscuit,
    caveats: &Caveats,
    external: &KeyPair,
    next: KeyPair,
) -> Biscuit {
    let c = caveats.clone().normalize().unwrap();
    let request = parent.third_party_request().unwrap();
    let block = request
        .create_block(
            &external.private(),
            raw_block(
                &c.block_source(parent.block_count()).unwrap(),
                Some(c.context().unwrap()),
            ),
        )
        .unwrap();
    parent
        .append_third_party_with_keypair(external.public(), block, next)
        .unwrap()
}

/// The key's protobuf container.
pub fn container(key: &str) -> schema::Biscuit {
    schema::Biscuit::decode(key_bytes(key).as_slice()).unwrap()
}

pub fn encode_container(c: &schema::Biscuit) -> String {
    key_from_bytes(&c.encode_to_vec())
}

/// The serialized `Block` message of every block (what the block signature covers).
pub fn block_payloads(key: &str) -> Vec<Vec<u8>> {
    let c = container(key);
    std::iter::once(c.authority.block.clone())
        .chain(c.blocks.iter().map(|b| b.block.clone()))
        .collect()
}

pub fn upstream(u: &str) -> Caveats {
    Caveats {
        upstream: Some(u.into()),
        ..Caveats::default()
    }
}

pub fn strings(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}
