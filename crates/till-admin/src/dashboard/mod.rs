//! The dashboard: server-rendered HTML over the admin API, on the admin listener at `/`.
//!
//! # Design
//!
//! Every page is rendered on the server (maud) from the same ledger reads and the same
//! shared functions as the JSON API ([`crate::api`]), so it works without JavaScript; a
//! small hand-written script (`assets/dashboard.js`, embedded in the binary like the
//! stylesheet) adds live updates: it listens to `/admin/v1/events` and, on an event,
//! re-fetches the page and swaps its `data-live` regions.
//!
//! Sign-in takes an admin key once and keeps it in an HttpOnly, SameSite=Strict cookie
//! ([`crate::auth::SESSION_COOKIE`]), which [`crate::auth::presented_key`] accepts like a
//! bearer key. Each dashboard request is authorized as the equivalent API request (the
//! family page as `GET /admin/v1/families/{id}`, a revoke as `POST /admin/v1/revoke`), so
//! an attenuated admin key's caveats rule the dashboard exactly as they rule the API: a
//! read-only key sees no write button and is refused if it posts anyway. Every
//! state-changing form carries a CSRF token bound to the session ([`session`]).
//!
//! Only the mint/attenuate result page ever shows a full Till key; no page shows an
//! upstream credential (the admin plane never has one). Every response is
//! `Cache-Control: no-store` with a strict Content-Security-Policy (no inline script or
//! style).

mod alerts;
mod chart;
mod family;
mod keys;
mod layout;
mod overview;
mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use maud::{html, Markup};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::{
    do_attenuate, do_audit, do_mint, do_revoke, family_id, now, recent_receipts, RevokeRequest,
    MAX_BODY_BYTES, MAX_PAGE,
};
use crate::auth::{authenticate, presented_key};
use crate::error::AdminError;
use crate::AdminState;

pub use alerts::render_alerts;
pub use family::{
    doomed, render_family, render_revoke_confirm, write_receipts_jsonl, AuditView, PAGE_RECEIPTS,
};
pub use keys::{render_forms, render_minted, AttenuateForm, MintForm};
pub use overview::{render_overview, select, OverviewQuery, Sort};
pub use session::{check_csrf, csrf_token, CSRF_FIELD};

const CSS: &str = include_str!("../../assets/dashboard.css");
const JS: &str = include_str!("../../assets/dashboard.js");

/// Most audits the dashboard remembers (one per family; the oldest go first).
const AUDITS_KEPT: usize = 1000;

/// What the signed-in admin key may do, and the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// May revoke (and attenuate): `POST /admin/v1/revoke` is authorized.
    pub can_write: bool,
    /// May mint: `POST /admin/v1/keys` is authorized and this server holds the root key.
    pub can_mint: bool,
    /// The session's CSRF token.
    pub csrf: String,
}

#[derive(Clone)]
struct Dash {
    state: Arc<AdminState>,
    /// Latest audit per family (hex id): audits read every receipt, so pages show the
    /// last result and "re-run audit" refreshes it.
    audits: Arc<Mutex<HashMap<String, AuditView>>>,
}

/// The dashboard's routes (merged into the admin router).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(state: Arc<AdminState>) -> Router<S> {
    let dash = Dash {
        state,
        audits: Arc::new(Mutex::new(HashMap::new())),
    };
    Router::new()
        .route("/", get(overview_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/keys", get(keys_page))
        .route("/keys/mint", post(mint))
        .route("/keys/attenuate", post(attenuate))
        .route("/alerts", get(alerts_page))
        .route("/families/{id}", get(family_page))
        .route("/families/{id}/audit", get(run_audit))
        .route("/families/{id}/receipts.jsonl", get(receipts_download))
        .route("/families/{id}/revoke", get(revoke_page).post(revoke))
        .route("/assets/dashboard.css", get(css))
        .route("/assets/dashboard.js", get(js))
        .layer(axum::middleware::map_response(harden))
        .with_state(dash)
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Every dashboard response: never cached (pages carry usage and, once, a key), never
/// framed, no inline script.
async fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Why a dashboard request did not get its page.
enum DashError {
    /// No session: go sign in.
    SignIn,
    /// Refused or failed, as the API would.
    Admin(AdminError),
}

impl From<AdminError> for DashError {
    fn from(e: AdminError) -> Self {
        DashError::Admin(e)
    }
}

impl From<till_ledger::LedgerError> for DashError {
    fn from(e: till_ledger::LedgerError) -> Self {
        DashError::Admin(e.into())
    }
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

impl IntoResponse for DashError {
    fn into_response(self) -> Response {
        match self {
            DashError::SignIn => redirect("/login"),
            DashError::Admin(e) => {
                if let AdminError::Ledger(l) = &e {
                    tracing::warn!(error = %l, "dashboard: ledger error");
                }
                let status = e.status();
                if status == StatusCode::UNAUTHORIZED {
                    // Expired, revoked or bad session key: back to sign-in, session cleared.
                    let mut r = html_response(status, login_markup(Some(&e)));
                    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
                        r.headers_mut().insert(header::SET_COOKIE, v);
                    }
                    return r;
                }
                let body = html! {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                    (layout::notice("error", &e.to_string()))
                    p { "Code: " code { (e.code()) } }
                    p { a href="/" { "Back to the overview" } }
                };
                html_response(status, layout::page("Error", layout::Nav::None, None, body))
            }
        }
    }
}

/// A signed-in request.
struct Session {
    key: String,
    viewer: Viewer,
}

/// Authenticates the session and authorizes it as `method api_path` (the API request
/// this dashboard request stands for).
async fn session(
    state: &AdminState,
    headers: &HeaderMap,
    method: &Method,
    api_path: &str,
) -> Result<Session, DashError> {
    let key = presented_key(headers).ok_or(DashError::SignIn)?;
    let admin = authenticate(state, headers, method, api_path).await?;
    let can_write = admin.can(state, &Method::POST, "/admin/v1/revoke");
    let can_mint = state.root.is_some() && admin.can(state, &Method::POST, "/admin/v1/keys");
    let viewer = Viewer {
        can_write,
        can_mint,
        csrf: csrf_token(&key),
    };
    Ok(Session { key, viewer })
}

async fn form<T: DeserializeOwned>(body: Body) -> Result<T, AdminError> {
    let bytes: Bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| AdminError::TooLarge {
            max: MAX_BODY_BYTES,
        })?;
    serde_urlencoded::from_bytes(&bytes).map_err(|e| AdminError::BadRequest(e.to_string()))
}

fn page(markup: Markup) -> Response {
    html_response(StatusCode::OK, markup)
}

// ---- sign-in ---------------------------------------------------------------------------

fn login_markup(error: Option<&AdminError>) -> Markup {
    let body = html! {
        h1 { "Sign in" }
        p { "Paste an admin key. " code { "till serve" } " writes one to " code { "<data dir>/admin.key" } "; "
            code { "till admin-key --read-only" } " mints one that can only look." }
        @if let Some(e) = error { (layout::notice("error", &e.to_string())) }
        form.keyform method="post" action="/login" {
            div.field {
                label for="f-admin-key" { "Admin key" }
                input #f-admin-key type="password" name="key" required autocomplete="off" spellcheck="false";
            }
            button type="submit" { "Sign in" }
        }
        p.muted { "The key is kept in an HttpOnly cookie for this site until you sign out." }
    };
    layout::page("Sign in", layout::Nav::None, None, body)
}

async fn login_page() -> Response {
    page(login_markup(None))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    key: String,
}

async fn login(State(d): State<Dash>, req: Request) -> Response {
    let attempt = async {
        let f: LoginForm = form(req.into_body()).await?;
        let key = f.key.trim().to_string();
        if !session::cookie_safe(&key) {
            return Err(AdminError::BadRequest(
                "that is not a Till admin key (it starts with till_)".into(),
            ));
        }
        let mut headers = HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| AdminError::BadRequest("not a Till key".into()))?;
        headers.insert(header::AUTHORIZATION, bearer);
        authenticate(&d.state, &headers, &Method::GET, "/admin/v1/whoami").await?;
        Ok(key)
    };
    match attempt.await {
        Ok(key) => {
            let mut r = redirect("/");
            if let Ok(v) = HeaderValue::from_str(&session::session_cookie(&key)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => html_response(e.status(), login_markup(Some(&e))),
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: Option<String>,
}

async fn logout(req: Request) -> Result<Response, DashError> {
    let (parts, body) = req.into_parts();
    let key = presented_key(&parts.headers).ok_or(DashError::SignIn)?;
    let f: CsrfOnly = form(body).await?;
    check_csrf(&key, f.csrf.as_deref())?;
    let mut r = redirect("/login");
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

// ---- pages -----------------------------------------------------------------------------

async fn overview_page(
    State(d): State<Dash>,
    headers: HeaderMap,
    query: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, DashError> {
    let s = session(&d.state, &headers, &Method::GET, "/admin/v1/families").await?;
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let at = now();
    let families = d.state.ledger.families(at).await?;
    Ok(page(render_overview(&families, &q, &s.viewer, at)))
}

#[derive(Deserialize, Default)]
struct FamilyQuery {
    revoked: Option<String>,
}

async fn family_page(
    State(d): State<Dash>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<FamilyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, DashError> {
    let s = session(
        &d.state,
        &headers,
        &Method::GET,
        &format!("/admin/v1/families/{id}"),
    )
    .await?;
    let fam = family_id(&id)?;
    let at = now();
    let detail = d
        .state
        .ledger
        .family(&fam, at)
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(id.clone()))?;
    let recent = recent_receipts(&d.state, &fam, detail.family.used, PAGE_RECEIPTS).await?;
    let audit = d.audits.lock().ok().and_then(|a| a.get(&id).cloned());
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let message = q.revoked.map(|r| {
        let short: String = r.chars().filter(char::is_ascii_hexdigit).take(12).collect();
        layout::notice(
            "info",
            &format!("Revoked block {short}…: it and every key under it are refused from their next request."),
        )
    });
    Ok(page(render_family(
        &detail,
        &recent,
        audit.as_ref(),
        &s.viewer,
        at,
        message,
    )))
}

async fn run_audit(
    State(d): State<Dash>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, DashError> {
    session(
        &d.state,
        &headers,
        &Method::GET,
        &format!("/admin/v1/families/{id}/audit"),
    )
    .await?;
    let fam = family_id(&id)?;
    let result = do_audit(&d.state, &fam).await?;
    if let Ok(mut audits) = d.audits.lock() {
        if audits.len() >= AUDITS_KEPT && !audits.contains_key(&id) {
            if let Some(oldest) = audits
                .iter()
                .min_by_key(|(_, a)| a.at)
                .map(|(k, _)| k.clone())
            {
                audits.remove(&oldest);
            }
        }
        audits.insert(id.clone(), AuditView { at: now(), result });
    }
    Ok(redirect(&format!("/families/{id}#audit")))
}

async fn receipts_download(
    State(d): State<Dash>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, DashError> {
    session(
        &d.state,
        &headers,
        &Method::GET,
        &format!("/admin/v1/families/{id}/receipts"),
    )
    .await?;
    let fam = family_id(&id)?;
    d.state
        .ledger
        .family(&fam, now())
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(id.clone()))?;
    let state = Arc::clone(&d.state);
    // One page of receipts per chunk: memory stays bounded whatever the family's size.
    let pages = futures::stream::unfold(Some(1u64), move |from| {
        let state = Arc::clone(&state);
        let fam = fam.clone();
        async move {
            let from = from?;
            match state.ledger.receipts(&fam, from, MAX_PAGE).await {
                Ok(list) => {
                    let next = (list.len() == MAX_PAGE)
                        .then(|| list.last().map(|r| r.body().seq.saturating_add(1)))
                        .flatten();
                    let mut buf = Vec::with_capacity(list.len() * 1024);
                    write_receipts_jsonl(&list, &mut buf);
                    Some((Ok::<_, std::io::Error>(Bytes::from(buf)), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let name = format!(
        "attachment; filename=\"till-receipts-{}.jsonl\"",
        &id[..16.min(id.len())]
    );
    let mut r = Body::from_stream(pages).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jsonl"),
    );
    if let Ok(v) = HeaderValue::from_str(&name) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[derive(Deserialize)]
struct RevokeQuery {
    block: String,
}

async fn revoke_page(
    State(d): State<Dash>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<RevokeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, DashError> {
    // Only keys that may revoke get the confirmation (and its form).
    let s = session(&d.state, &headers, &Method::POST, "/admin/v1/revoke").await?;
    let Query(q) = query.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let fam = family_id(&id)?;
    let at = now();
    let detail = d
        .state
        .ledger
        .family(&fam, at)
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(id.clone()))?;
    Ok(page(render_revoke_confirm(
        &detail,
        &q.block.to_ascii_lowercase(),
        &s.viewer,
        at,
    )))
}

#[derive(Deserialize)]
struct RevokeForm {
    csrf: Option<String>,
    #[serde(default)]
    revocation_id: String,
}

async fn revoke(
    State(d): State<Dash>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, DashError> {
    let (parts, body) = req.into_parts();
    let s = session(&d.state, &parts.headers, &Method::POST, "/admin/v1/revoke").await?;
    let f: RevokeForm = form(body).await?;
    check_csrf(&s.key, f.csrf.as_deref())?;
    let fam = family_id(&id)?;
    let rid = f.revocation_id.trim().to_ascii_lowercase();
    let detail = d
        .state
        .ledger
        .family(&fam, now())
        .await?
        .ok_or_else(|| AdminError::FamilyNotFound(id.clone()))?;
    // The form names a block of this family; anything else is a forged or stale form.
    if !detail.blocks.iter().any(|b| b.record.revocation_id == rid) {
        return Err(AdminError::BadRequest("that block is not in this family".into()).into());
    }
    do_revoke(
        &d.state,
        RevokeRequest {
            key: None,
            revocation_id: Some(rid.clone()),
            block: None,
        },
    )
    .await?;
    Ok(redirect(&format!("/families/{id}?revoked={rid}")))
}

async fn keys_page(State(d): State<Dash>, headers: HeaderMap) -> Result<Response, DashError> {
    let s = session(&d.state, &headers, &Method::GET, "/admin/v1/whoami").await?;
    Ok(page(render_forms(
        &s.viewer,
        &MintForm::default(),
        &AttenuateForm::default(),
        None,
    )))
}

/// A form error the user can fix: the form again, with the message.
fn form_error(
    s: &Session,
    e: &AdminError,
    which: &str,
    m: &MintForm,
    a: &AttenuateForm,
) -> Response {
    html_response(
        e.status(),
        render_forms(&s.viewer, m, a, Some((which, &e.to_string()))),
    )
}

fn fixable(e: &AdminError) -> bool {
    matches!(
        e,
        AdminError::BadRequest(_) | AdminError::BadKey(_) | AdminError::MintUnavailable
    )
}

async fn mint(State(d): State<Dash>, req: Request) -> Result<Response, DashError> {
    let (parts, body) = req.into_parts();
    let s = session(&d.state, &parts.headers, &Method::POST, "/admin/v1/keys").await?;
    let f: MintForm = form(body).await?;
    check_csrf(&s.key, f.csrf.as_deref())?;
    let minted = match f.request() {
        Ok(r) => do_mint(&d.state, r).await,
        Err(e) => Err(e),
    };
    let (key, token) = match minted {
        Ok(m) => m,
        Err(e) if fixable(&e) => {
            return Ok(form_error(&s, &e, "mint", &f, &AttenuateForm::default()))
        }
        Err(e) => return Err(e.into()),
    };
    let report = till_token::inspect(&key, Some(&d.state.keys), &d.state.limits)
        .map_err(AdminError::BadKey)?;
    let family = hex::encode(token.family_id());
    Ok(page(render_minted(
        &s.viewer,
        &key,
        &family,
        &[],
        &report,
        now(),
    )))
}

async fn attenuate(State(d): State<Dash>, req: Request) -> Result<Response, DashError> {
    let (parts, body) = req.into_parts();
    let s = session(
        &d.state,
        &parts.headers,
        &Method::POST,
        "/admin/v1/keys/attenuate",
    )
    .await?;
    let mut f: AttenuateForm = form(body).await?;
    check_csrf(&s.key, f.csrf.as_deref())?;
    let narrowed = match f.request() {
        Ok(r) => do_attenuate(&d.state, r).await,
        Err(e) => Err(e),
    };
    // The pasted key is never echoed back into the form.
    f.key.clear();
    let (key, token, warnings) = match narrowed {
        Ok(k) => k,
        Err(e) if fixable(&e) => {
            return Ok(form_error(&s, &e, "attenuate", &MintForm::default(), &f))
        }
        Err(e) => return Err(e.into()),
    };
    let report = till_token::inspect(&key, Some(&d.state.keys), &d.state.limits)
        .map_err(AdminError::BadKey)?;
    let family = hex::encode(token.family_id());
    Ok(page(render_minted(
        &s.viewer,
        &key,
        &family,
        &warnings,
        &report,
        now(),
    )))
}

async fn alerts_page(State(d): State<Dash>, headers: HeaderMap) -> Result<Response, DashError> {
    let s = session(&d.state, &headers, &Method::GET, "/admin/v1/alerts").await?;
    let list = d.state.ledger.alerts(200).await?;
    Ok(page(render_alerts(
        &list,
        &d.state.alerts.policy,
        d.state.alerts.webhook.is_some(),
        &s.viewer,
        now(),
    )))
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
        .into_response()
}

#[cfg(test)]
mod tests;
