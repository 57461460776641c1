//! Admin credentials are Till keys (`spec/admin.md`): a key minted from a trusted root key
//! whose authority block names the reserved upstream `till-admin`. The admin API
//! authorizes every request exactly like the proxy authorizes a proxied one, with the
//! request's method and path as facts: so the whole caveat vocabulary applies, and an
//! admin key attenuated offline with `--method GET` is read-only, one with `--path
//! /admin/v1/families` can only list, `--ttl 1h` expires. Revoking an admin key's block
//! kills it at the next admin request.

use http::{HeaderMap, Method};
use till_ledger::Level;
use till_token::{
    mint, verify, AuthorizeError, CaveatKind, Caveats, RequestFacts, RootKey, TokenError,
    VerifiedToken,
};

use crate::error::AdminError;
use crate::AdminState;

pub use till_proxy::config::ADMIN_UPSTREAM;

/// Name of the dashboard's session cookie (holds the admin key; HttpOnly, SameSite=Strict).
pub const SESSION_COOKIE: &str = "till_admin";

/// Mints a full admin key (read and write), valid until `expires` (Unix seconds) if given.
pub fn mint_admin_key(root: &RootKey, expires: Option<i64>) -> Result<String, TokenError> {
    mint(
        root,
        Caveats {
            upstream: Some(ADMIN_UPSTREAM.to_string()),
            label: Some("admin".to_string()),
            expires,
            ..Caveats::default()
        },
    )?
    .to_key_string()
}

/// Mints a read-only admin key (methods GET and HEAD only).
pub fn mint_read_only_admin_key(
    root: &RootKey,
    expires: Option<i64>,
) -> Result<String, TokenError> {
    let key = mint_admin_key(root, expires)?;
    let (narrow, _) = till_token::attenuate_str(
        &key,
        Caveats {
            methods: Some(vec!["GET".into(), "HEAD".into()]),
            ..Caveats::default()
        },
        &till_token::Limits::default(),
    )?;
    Ok(narrow)
}

/// The admin key of a request: `Authorization: Bearer`, else the dashboard cookie.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let text = v.to_str().ok()?;
        let (scheme, rest) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_string());
    }
    cookie(headers, SESSION_COOKIE)
}

/// One cookie's value.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A verified admin key.
#[derive(Debug, Clone)]
pub struct Admin {
    token: VerifiedToken,
}

impl Admin {
    /// Whether this key may make a state-changing request (`POST`) to `path`: used by
    /// the dashboard to hide write buttons. The API itself always authorizes per request.
    pub fn can(&self, state: &AdminState, method: &Method, path: &str) -> bool {
        authorize_request(state, &self.token, method, path).is_ok()
    }

    /// The key's family id (hex), for logs.
    pub fn family(&self) -> String {
        hex::encode(self.token.family_id())
    }
}

/// Verifies the request's admin key and authorizes `method path` with it.
pub async fn authenticate(
    state: &AdminState,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
) -> Result<Admin, AdminError> {
    let key = presented_key(headers).ok_or(AdminError::KeyMissing)?;
    let token = verify(&key, &state.keys, &state.limits).map_err(AdminError::Key)?;
    if token.scope().upstream.as_deref() != Some(ADMIN_UPSTREAM) {
        return Err(AdminError::NotAdminKey);
    }
    authorize_request(state, &token, method, path)?;
    let levels: Vec<Level> = token
        .blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: None,
        })
        .collect();
    let usage = state.ledger.usage(&levels).await?;
    if usage.iter().any(|u| u.revoked) {
        return Err(AdminError::KeyRevoked);
    }
    Ok(Admin { token })
}

fn authorize_request(
    state: &AdminState,
    token: &VerifiedToken,
    method: &Method,
    path: &str,
) -> Result<(), AdminError> {
    let facts = RequestFacts {
        upstream: ADMIN_UPSTREAM,
        method: method.as_str(),
        path,
        model: None,
        now: RequestFacts::unix(std::time::SystemTime::now()),
    };
    token
        .authorize(&facts, None, &state.limits)
        .map_err(|e| match e {
            AuthorizeError::Refused(r) if r.caveat == CaveatKind::Expires => AdminError::Expired,
            AuthorizeError::Refused(r) => AdminError::Forbidden {
                method: method.to_string(),
                path: path.to_string(),
                reason: r.to_string(),
            },
            AuthorizeError::Token(t) => AdminError::Key(t),
            _ => AdminError::Internal,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_then_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; till_admin=till_c".parse().unwrap(),
        );
        assert_eq!(presented_key(&h).as_deref(), Some("till_c"));
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer till_b".parse().unwrap(),
        );
        assert_eq!(presented_key(&h).as_deref(), Some("till_b"));
        h.insert(http::header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(presented_key(&h), None);
    }
}
