//! `/admin/v1/*`: the JSON API (normative: `spec/admin.md`, `spec/admin-openapi.yaml`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use till_ledger::{FamilyView, KeyBlocks, Level};
use till_proxy::events::Event;
use till_receipt::{audit_chain, Receipt};
use till_token::{attenuate_str, inspect, mint, Caveats, SignatureStatus, VerifiedToken};

use crate::auth::{self, Admin};
use crate::error::AdminError;
use crate::AdminState;

/// Largest request body the admin API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Receipts per page by default, and at most.
pub const DEFAULT_PAGE: usize = 100;
/// Most receipts per page.
pub const MAX_PAGE: usize = 1000;
/// Receipts shown with a family.
pub const RECENT_RECEIPTS: usize = 20;

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Authenticates and authorizes the request against its own method and path.
/// Returns the body for handlers that read one.
pub(crate) async fn admit(
    state: &AdminState,
    req: Request,
) -> Result<(Admin, axum::body::Body), AdminError> {
    let (parts, body) = req.into_parts();
    let admin = auth::authenticate(state, &parts.headers, &parts.method, parts.uri.path()).await?;
    Ok((admin, body))
}

/// Reads and parses a JSON body (`deny_unknown_fields` types), bounded.
pub(crate) async fn json_body<T: DeserializeOwned>(
    body: axum::body::Body,
) -> Result<T, AdminError> {
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| AdminError::TooLarge {
            max: MAX_BODY_BYTES,
        })?;
    parse_json(&body)
}

pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| AdminError::BadJson(e.to_string()))
}

/// Caveats as the API takes them (mint and attenuate).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaveatFields {
    /// Upstream (mint: required).
    pub upstream: Option<String>,
    /// Activation cap.
    pub cap: Option<u64>,
    /// Allowed methods.
    pub methods: Option<Vec<String>>,
    /// Allowed path prefixes.
    pub paths: Option<Vec<String>>,
    /// Allowed models.
    pub models: Option<Vec<String>>,
    /// Lifetime from now (`90m`, `24h`, `7d`).
    pub ttl: Option<String>,
    /// Expiry, RFC 3339.
    pub expires: Option<String>,
    /// Per-call ceiling on the output tokens a request asks for (spec/token.md).
    pub max_output_tokens: Option<u64>,
    /// Per-call ceiling on a form body's `amount` (Stripe, minor units).
    pub amount_max: Option<u64>,
    /// Allowed `currency` values of a form body (lower case ISO 4217).
    pub currencies: Option<Vec<String>>,
    /// Allowed repositories, `owner/name` (GitHub paths `/repos/{owner}/{name}/...`).
    pub repos: Option<Vec<String>>,
    /// Numeric ceilings on JSON body members, by JSON pointer.
    pub json_max: Option<std::collections::BTreeMap<String, u64>>,
    /// String allow-lists of JSON body members, by JSON pointer.
    pub json_allow: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// Windowed caps: at most `max` activations per fixed window of `secs` (60, 3600 or
    /// 86400) seconds.
    pub windows: Option<Vec<till_token::Window>>,
}

impl CaveatFields {
    fn caveats(&self, label: Option<String>) -> Result<Caveats, AdminError> {
        let expires = match (&self.ttl, &self.expires) {
            (Some(_), Some(_)) => {
                return Err(AdminError::BadRequest(
                    "give either ttl or expires, not both".into(),
                ))
            }
            (Some(ttl), None) => {
                let d: Duration = humantime::parse_duration(ttl)
                    .map_err(|e| AdminError::BadRequest(format!("ttl `{ttl}`: {e}")))?;
                let at = now()
                    .checked_add(d.as_secs())
                    .and_then(|t| i64::try_from(t).ok())
                    .ok_or_else(|| AdminError::BadRequest("ttl is too long".into()))?;
                Some(at)
            }
            (None, Some(s)) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| {
                            AdminError::BadRequest(format!("expires `{s}` is not RFC 3339: {e}"))
                        })?;
                Some(t.unix_timestamp())
            }
            (None, None) => None,
        };
        Ok(Caveats {
            upstream: self.upstream.clone(),
            methods: self.methods.clone(),
            paths: self.paths.clone(),
            models: self.models.clone(),
            expires,
            cap: self.cap,
            label,
            max_output_tokens: self.max_output_tokens,
            amount_max: self.amount_max,
            currencies: self.currencies.clone(),
            repos: self.repos.clone(),
            json_max: self.json_max.clone(),
            json_allow: self.json_allow.clone(),
            windows: self.windows.clone(),
        })
    }
}

/// `POST /admin/v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    /// The caveats.
    #[serde(flatten)]
    pub caveats: CaveatFields,
    /// Human label of the family.
    pub label: Option<String>,
}

/// `POST /admin/v1/keys/attenuate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttenuateRequest {
    /// The key to narrow.
    pub key: String,
    /// The narrowing caveats.
    #[serde(flatten)]
    pub caveats: CaveatFields,
}

/// `POST /admin/v1/keys/inspect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A Till key.
    pub key: String,
}

/// `POST /admin/v1/revoke`: by key (its last block, or `block`), or by revocation id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A Till key.
    pub key: Option<String>,
    /// A block's revocation id (hex).
    pub revocation_id: Option<String>,
    /// With `key`: which block (default: the last).
    pub block: Option<usize>,
}

/// `POST /admin/v1/usage`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRequest {
    /// Revocation ids (hex), any blocks.
    pub revocation_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
struct MintedKey {
    key: String,
    family: String,
    revocation_id: String,
    warnings: Vec<String>,
    inspect: serde_json::Value,
}

pub(crate) use till_proxy::block_meta as to_meta;

pub(crate) fn key_blocks(token: &VerifiedToken) -> KeyBlocks {
    KeyBlocks {
        blocks: token
            .blocks()
            .iter()
            .map(|b| (b.revocation_id.clone(), to_meta(&b.caveats)))
            .collect(),
    }
}

pub(crate) fn verify_key(state: &AdminState, key: &str) -> Result<VerifiedToken, AdminError> {
    till_token::verify(key, &state.keys, &state.limits).map_err(AdminError::BadKey)
}

/// The `201` answer for a key [`do_mint`] or [`do_attenuate`] verified and recorded.
fn minted_response(
    state: &AdminState,
    key: String,
    token: &VerifiedToken,
    warnings: Vec<String>,
) -> Result<Response, AdminError> {
    let report = inspect(&key, Some(&state.keys), &state.limits).map_err(AdminError::BadKey)?;
    let body = MintedKey {
        family: hex::encode(token.family_id()),
        revocation_id: token
            .blocks()
            .last()
            .map(|b| hex::encode(&b.revocation_id))
            .unwrap_or_default(),
        key,
        warnings,
        inspect: serde_json::to_value(&report).map_err(|_| AdminError::Internal)?,
    };
    let mut resp = (http::StatusCode::CREATED, Json(body)).into_response();
    // The only response that carries a full key: never cache it.
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

/// Mints a key and records its family. Shared by the API and the dashboard.
pub(crate) async fn do_mint(
    state: &AdminState,
    req: MintRequest,
) -> Result<(String, VerifiedToken), AdminError> {
    let root = state.root.load().ok_or(AdminError::MintUnavailable)?;
    let caveats = req.caveats.caveats(req.label)?;
    if caveats.upstream.as_deref() == Some(auth::ADMIN_UPSTREAM) {
        return Err(AdminError::BadRequest(
            "admin keys are minted with `till admin-key`, not through the API".into(),
        ));
    }
    if let Some(e) = caveats.expires {
        if u64::try_from(e).unwrap_or(0) < now() {
            return Err(AdminError::BadRequest(
                "the expiry is in the past: the key would be dead on arrival".into(),
            ));
        }
    }
    let key = mint(&root, caveats)
        .and_then(|t| t.to_key_string())
        .map_err(AdminError::BadKey)?;
    let token = verify_key(state, &key)?;
    state.ledger.record_key(key_blocks(&token), now()).await?;
    Ok((key, token))
}

pub(crate) async fn mint_key(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (_, body) = admit(&state, req).await?;
    let body: MintRequest = json_body(body).await?;
    let (key, token) = do_mint(&state, body).await?;
    minted_response(&state, key, &token, Vec::new())
}

/// Attenuates a key (it must verify against this server's root keys) and records the
/// new block, so it shows in its family's tree. Shared with the dashboard.
pub(crate) async fn do_attenuate(
    state: &AdminState,
    req: AttenuateRequest,
) -> Result<(String, VerifiedToken, Vec<String>), AdminError> {
    verify_key(state, req.key.trim())?;
    let caveats = req.caveats.caveats(None)?;
    let (key, warnings) =
        attenuate_str(req.key.trim(), caveats, &state.limits).map_err(AdminError::BadKey)?;
    let token = verify_key(state, &key)?;
    state.ledger.record_key(key_blocks(&token), now()).await?;
    Ok((
        key,
        token,
        warnings.into_iter().map(|w| w.message).collect(),
    ))
}

pub(crate) async fn attenuate_key(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (_, body) = admit(&state, req).await?;
    let body: AttenuateRequest = json_body(body).await?;
    let (key, token, warnings) = do_attenuate(&state, body).await?;
    minted_response(&state, key, &token, warnings)
}

pub(crate) async fn inspect_key(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (_, body) = admit(&state, req).await?;
    let body: KeyRequest = json_body(body).await?;
    let report =
        inspect(body.key.trim(), Some(&state.keys), &state.limits).map_err(AdminError::BadKey)?;
    Ok(Json(report).into_response())
}

/// Revokes a block and tells subscribers. Shared with the dashboard.
pub(crate) async fn do_revoke(
    state: &AdminState,
    req: RevokeRequest,
) -> Result<serde_json::Value, AdminError> {
    let id = match (&req.key, &req.revocation_id) {
        (Some(key), None) => {
            let report = inspect(key.trim(), Some(&state.keys), &state.limits)
                .map_err(AdminError::BadKey)?;
            if let SignatureStatus::Invalid { message, .. } = report.signature {
                return Err(AdminError::BadRequest(format!(
                    "the key does not verify against this server's root keys: {message}"
                )));
            }
            let index = req.block.unwrap_or(report.blocks.len().saturating_sub(1));
            report
                .blocks
                .get(index)
                .map(|b| b.revocation_id.clone())
                .ok_or_else(|| {
                    AdminError::BadRequest(format!(
                        "block {index}: this key has {} blocks",
                        report.blocks.len()
                    ))
                })?
        }
        (None, Some(hex_id)) => {
            if req.block.is_some() {
                return Err(AdminError::BadRequest(
                    "block only applies when revoking by key".into(),
                ));
            }
            let id = hex::decode(hex_id).map_err(|_| {
                AdminError::BadRequest("revocation_id must be hex (from `till inspect`)".into())
            })?;
            if id.len() != 64 {
                return Err(AdminError::BadRequest(format!(
                    "a revocation id is 64 bytes (128 hex digits), got {}",
                    id.len()
                )));
            }
            id
        }
        _ => {
            return Err(AdminError::BadRequest(
                "give exactly one of key or revocation_id".into(),
            ))
        }
    };
    let revoked = state.ledger.revoke(&id).await?;
    let at = now();
    if revoked.newly {
        tracing::info!(
            target: "till::admin",
            revocation_id = %hex::encode(&id),
            family = revoked.family.as_deref().unwrap_or("-"),
            "revoked"
        );
        state.events.publish(Event::Revocation {
            at,
            revocation_id: hex::encode(&id),
            family: revoked.family.clone(),
        });
    }
    if let Some(alert) = &revoked.alert {
        state.alert_fired(alert);
    }
    Ok(json!({
        "revocation_id": hex::encode(&id),
        "newly_revoked": revoked.newly,
        "family": revoked.family,
    }))
}

pub(crate) async fn revoke(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (_, body) = admit(&state, req).await?;
    let body: RevokeRequest = json_body(body).await?;
    Ok(Json(do_revoke(&state, body).await?).into_response())
}

pub(crate) async fn usage(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (_, body) = admit(&state, req).await?;
    let body: UsageRequest = json_body(body).await?;
    if body.revocation_ids.is_empty() || body.revocation_ids.len() > 64 {
        return Err(AdminError::BadRequest(
            "revocation_ids: between 1 and 64 ids".into(),
        ));
    }
    let levels = body
        .revocation_ids
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .filter(|id| !id.is_empty())
                .map(|revocation_id| Level {
                    revocation_id,
                    cap: None,
                })
                .ok_or_else(|| AdminError::BadRequest(format!("`{h}` is not a hex revocation id")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let usage = state.ledger.usage(&levels).await?;
    let blocks: Vec<_> = usage
        .iter()
        .map(|u| {
            json!({
                "revocation_id": hex::encode(&u.revocation_id),
                "used": u.used,
                "revoked": u.revoked,
            })
        })
        .collect();
    Ok(Json(json!({ "blocks": blocks })).into_response())
}

/// `GET /admin/v1/families` filters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyFilter {
    /// Only this label.
    pub label: Option<String>,
    /// Only this upstream.
    pub upstream: Option<String>,
    /// Only families at or above 80 % of their root cap.
    pub near_limit: Option<bool>,
}

impl FamilyFilter {
    /// Whether `f` passes.
    pub fn keeps(&self, f: &FamilyView) -> bool {
        self.label
            .as_ref()
            .is_none_or(|l| f.label.as_ref() == Some(l))
            && self
                .upstream
                .as_ref()
                .is_none_or(|u| f.upstream.as_ref() == Some(u))
            && (!self.near_limit.unwrap_or(false) || near_limit(f))
    }
}

/// At or above 80 % of the root cap.
pub fn near_limit(f: &FamilyView) -> bool {
    f.cap
        .is_some_and(|c| f.used.saturating_mul(5) >= c.saturating_mul(4))
}

pub(crate) async fn families(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<FamilyFilter>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let Query(filter) = query.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let all = state.ledger.families(now()).await?;
    let families: Vec<_> = all.into_iter().filter(|f| filter.keeps(f)).collect();
    Ok(Json(json!({ "families": families })).into_response())
}

pub(crate) fn family_id(text: &str) -> Result<Vec<u8>, AdminError> {
    hex::decode(text)
        .ok()
        .filter(|id| id.len() == 64)
        .ok_or_else(|| {
            AdminError::BadRequest(format!(
                "`{}` is not a family id (128 hex digits)",
                text.chars().take(16).collect::<String>()
            ))
        })
}

pub(crate) fn receipt_json(r: &Receipt) -> serde_json::Value {
    json!({ "seq": r.body().seq, "receipt": r.compact(), "hash": r.hash_hex(), "body": r.body() })
}

/// The latest `n` receipts of a family, newest last. `used` (the family's net count)
/// is where the chain head is when nothing was voided; each void puts the head two
/// receipts further (the void and the claim that retook the slot), so the read goes on
/// to the head: one more (empty) page when there are no voids.
pub(crate) async fn recent_receipts(
    state: &AdminState,
    family: &[u8],
    used: u64,
    n: usize,
) -> Result<Vec<Receipt>, AdminError> {
    let from = used.saturating_sub(n as u64).saturating_add(1);
    let mut out = state.ledger.receipts(family, from, n).await?;
    while out.len() >= n && n > 0 {
        let next = out.last().map_or(from, |r| r.body().seq + 1);
        let more = state.ledger.receipts(family, next, n).await?;
        if more.is_empty() {
            break;
        }
        out.extend(more);
        let excess = out.len().saturating_sub(n);
        out.drain(..excess);
    }
    Ok(out)
}

pub(crate) async fn family(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let fam = family_id(&id)?;
    let detail = state
        .ledger
        .family(&fam, now())
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(id.clone()))?;
    let recent = recent_receipts(&state, &fam, detail.family.used, RECENT_RECEIPTS).await?;
    let recent: Vec<_> = recent.iter().rev().map(receipt_json).collect();
    Ok(Json(json!({
        "family": detail.family,
        "blocks": detail.blocks,
        "recent_receipts": recent,
    }))
    .into_response())
}

/// `?after=SEQ&limit=N`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Receipts with `seq > after` (default 0).
    pub after: Option<u64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

pub(crate) async fn receipts(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let Query(page) = query.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let fam = family_id(&id)?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(AdminError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let after = page.after.unwrap_or(0);
    let list = state
        .ledger
        .receipts(&fam, after.saturating_add(1), limit)
        .await?;
    let next = (list.len() == limit)
        .then(|| list.last().map(|r| r.body().seq))
        .flatten();
    let receipts: Vec<_> = list.iter().map(receipt_json).collect();
    Ok(Json(json!({ "receipts": receipts, "next_after": next })).into_response())
}

/// Audits a family: every receipt's signature, no gap, no fork, no over-cap, and the
/// ledger's counters agree with the receipts. Shared with the dashboard.
pub(crate) async fn do_audit(
    state: &AdminState,
    fam: &[u8],
) -> Result<serde_json::Value, AdminError> {
    let detail = state
        .ledger
        .family(fam, now())
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(hex::encode(fam)))?;
    let mut all: Vec<till_ledger::Receipt> = Vec::new();
    loop {
        let from = all.last().map_or(1, |r| r.body().seq + 1);
        let page = state.ledger.receipts(fam, from, MAX_PAGE).await?;
        let n = page.len();
        all.extend(page);
        if n < MAX_PAGE {
            break;
        }
    }
    // Receipts exported and pruned (`[retention]`) are read back from the export
    // directory and checked against the signed checkpoints (spec/ledger.md §10).
    let checkpoints = state.ledger.checkpoints(fam).await?;
    let pruned = !checkpoints.is_empty() || all.first().is_some_and(|r| r.body().seq > 1);
    if pruned {
        let Some(dir) = state.export_dir.get() else {
            return Ok(json!({
                "clean": false, "report": null, "mismatches": [],
                "error": "older receipts of this family were exported and pruned, and this \
                          admin plane has no export directory: audit with \
                          `till audit KEY --exported DIR`",
            }));
        };
        let keys = state.receipt_keys.load();
        match till_ledger::retention::whole_chain(dir, &hex::encode(fam), all, checkpoints, &keys) {
            Ok((chain, _)) => all = chain,
            Err(e) => {
                return Ok(json!({
                    "clean": false, "report": null, "mismatches": [],
                    "error": format!("exported receipts and checkpoints: {e}"),
                }))
            }
        }
    }
    if all.is_empty() {
        return Ok(json!({
            "clean": detail.family.used == 0,
            "report": null,
            "error": null,
            "mismatches": if detail.family.used == 0 { vec![] } else {
                vec![format!("family counter {} but no receipts", detail.family.used)]
            },
        }));
    }
    match audit_chain(&all, &state.receipt_keys.load()) {
        Err(e) => Ok(json!({
            "clean": false, "report": null, "error": e.to_string(), "mismatches": []
        })),
        Ok(report) => {
            let mut mismatches = Vec::new();
            for b in &detail.blocks {
                let in_receipts = report
                    .levels
                    .iter()
                    .find(|l| l.revocation_id == b.record.revocation_id)
                    .map_or(0, |l| l.used);
                if in_receipts != b.used {
                    mismatches.push(format!(
                        "block {} ({}…): ledger counter {} but {} receipts",
                        b.record.index,
                        &b.record.revocation_id[..16.min(b.record.revocation_id.len())],
                        b.used,
                        in_receipts
                    ));
                }
            }
            Ok(json!({
                "clean": mismatches.is_empty(),
                "report": report,
                "error": null,
                "mismatches": mismatches,
            }))
        }
    }
}

pub(crate) async fn audit(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let fam = family_id(&id)?;
    Ok(Json(do_audit(&state, &fam).await?).into_response())
}

/// A family's signed checkpoints of exported and pruned receipt ranges
/// (spec/ledger.md §10), in `seq` order.
pub(crate) async fn checkpoints(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let fam = family_id(&id)?;
    let checkpoints = state.ledger.checkpoints(&fam).await?;
    Ok(Json(json!({ "checkpoints": checkpoints })).into_response())
}

/// `?limit=N`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

pub(crate) async fn alerts(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let Query(q) = query.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(AdminError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let alerts = state.ledger.alerts(limit).await?;
    Ok(Json(json!({ "alerts": alerts })).into_response())
}

pub(crate) async fn whoami(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let (admin, _) = admit(&state, req).await?;
    let write = admin.can(&state, &Method::POST, "/admin/v1/revoke");
    Ok(Json(json!({ "family": admin.family(), "write": write })).into_response())
}

pub(crate) async fn openapi() -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/yaml")],
        crate::OPENAPI,
    )
        .into_response()
}

pub(crate) async fn not_found(req: Request) -> Response {
    AdminError::NotFound(format!("{} {}", req.method(), req.uri().path())).into_response()
}

/// `POST /admin/v1/reload`: re-read the data dir's keys (root key rotation and
/// retirement, receipt key rotation) and the credential store, and swap them into the
/// running server without a restart (`spec/admin.md`, "Reload"). All or nothing: a
/// failure (e.g. a tampered credential store) changes nothing and says why.
pub(crate) async fn reload(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    match state.reload().await {
        Ok(report) => {
            tracing::info!("admin: reloaded keys and credentials");
            Ok(Json(report).into_response())
        }
        Err(message) => {
            tracing::warn!(error = %message, "admin: reload failed; nothing changed");
            let body = json!({
                "error": { "type": "api_error", "code": "reload_failed", "message": message }
            });
            Ok((http::StatusCode::CONFLICT, Json(body)).into_response())
        }
    }
}
