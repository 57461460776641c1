//! Admin API errors: one enum, mapped to HTTP in one place, with the JSON error shape of
//! `spec/http.md` (`{"error": {"type", "code", "message"}}`) and stable codes.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use till_ledger::LedgerError;
use till_token::TokenError;

/// Why an admin request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No `Authorization: Bearer <admin key>` (or dashboard cookie).
    #[error("an admin key is required: send `Authorization: Bearer <admin key>`")]
    KeyMissing,
    /// The key did not verify (bad signature, unknown root, malformed, expired...).
    #[error("{0}")]
    Key(TokenError),
    /// The admin key expired.
    #[error("this admin key has expired; mint a new one with `till admin-key`")]
    Expired,
    /// A valid Till key, but not an admin key.
    #[error("this is not an admin key (admin keys are minted by `till admin-key`)")]
    NotAdminKey,
    /// The admin key was revoked.
    #[error("this admin key has been revoked")]
    KeyRevoked,
    /// The admin key's caveats do not allow this request (e.g. a read-only key writing).
    #[error("this admin key does not allow {method} {path}: {reason}")]
    Forbidden {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Which caveat refused.
        reason: String,
    },
    /// The dashboard form's CSRF token is missing or wrong.
    #[error("the form's CSRF token is missing or does not match; reload the page")]
    Csrf,
    /// The JSON body is malformed or has unknown fields.
    #[error("invalid request body: {0}")]
    BadJson(String),
    /// The body exceeds the admin API's limit.
    #[error("request body larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// A parameter is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// A key given in the body is invalid (for mint/attenuate/inspect/revoke).
    #[error("the key is not valid: {0}")]
    BadKey(TokenError),
    /// No such family.
    #[error("no key family {0} in the ledger")]
    FamilyNotFound(String),
    /// No such route.
    #[error("no such admin endpoint: {0}")]
    NotFound(String),
    /// This server holds no private root key (verifier-only): it cannot mint.
    #[error("this server has no private root key; mint with `till mint` where the key is")]
    MintUnavailable,
    /// The ledger could not answer.
    #[error("the ledger is unavailable; try again")]
    Ledger(#[source] LedgerError),
    /// Something that should not happen.
    #[error("internal error")]
    Internal,
}

impl AdminError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::KeyMissing => "admin_key_missing",
            AdminError::Key(e) => e.code(),
            AdminError::Expired => "key_expired",
            AdminError::NotAdminKey => "not_an_admin_key",
            AdminError::KeyRevoked => "key_revoked",
            AdminError::Forbidden { .. } => "admin_forbidden",
            AdminError::Csrf => "csrf_token_invalid",
            AdminError::BadJson(_) => "invalid_json",
            AdminError::TooLarge { .. } => "body_too_large",
            AdminError::BadRequest(_) => "invalid_request",
            AdminError::BadKey(_) => "invalid_key",
            AdminError::FamilyNotFound(_) => "family_not_found",
            AdminError::NotFound(_) => "not_found",
            AdminError::MintUnavailable => "mint_unavailable",
            AdminError::Ledger(_) => "ledger_unavailable",
            AdminError::Internal => "internal_error",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::KeyMissing
            | AdminError::Key(_)
            | AdminError::Expired
            | AdminError::KeyRevoked => StatusCode::UNAUTHORIZED,
            AdminError::NotAdminKey | AdminError::Forbidden { .. } | AdminError::Csrf => {
                StatusCode::FORBIDDEN
            }
            AdminError::BadJson(_) | AdminError::BadRequest(_) | AdminError::BadKey(_) => {
                StatusCode::BAD_REQUEST
            }
            AdminError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::FamilyNotFound(_) | AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MintUnavailable => StatusCode::CONFLICT,
            AdminError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "api_error",
            _ => "invalid_request_error",
        }
    }
}

impl From<LedgerError> for AdminError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InvalidRequest(m) => AdminError::BadRequest(m),
            other => AdminError::Ledger(other),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if let AdminError::Ledger(e) = &self {
            tracing::warn!(error = %e, "admin: ledger error");
        }
        let status = self.status();
        let body = serde_json::json!({
            "error": { "type": self.kind(), "code": self.code(), "message": self.to_string() }
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"till-admin\""),
            );
        }
        resp
    }
}
