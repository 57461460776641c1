//! The dashboard session: the admin key in an HttpOnly, SameSite=Strict cookie, and a
//! CSRF token bound to it.
//!
//! The CSRF token is HMAC-SHA256 of the session's admin key under a random key drawn once
//! per process: a page can only carry it if it was rendered for that session by this
//! process, and it is checked in constant time. It is not the key and does not reveal it.
//! SameSite=Strict already keeps the cookie off cross-site requests; the token is the
//! second lock (same-site subdomains, browsers that ignore SameSite).

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::auth::SESSION_COOKIE;
use crate::error::AdminError;

/// Name of the hidden form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

fn process_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random::<[u8; 32]>)
}

/// The CSRF token of the session whose admin key is `key`.
pub fn csrf_token(key: &str) -> String {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(process_key()) else {
        return String::new();
    };
    mac.update(b"till-dashboard-csrf\0");
    mac.update(key.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a submitted token against the session's (constant time).
pub fn check_csrf(key: &str, submitted: Option<&str>) -> Result<(), AdminError> {
    let expected = csrf_token(key);
    let submitted = submitted.unwrap_or("");
    if !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(submitted.as_bytes())) {
        Ok(())
    } else {
        Err(AdminError::Csrf)
    }
}

/// Whether `key` can go in a cookie as is: a Till key is `till_` + base64url, nothing
/// that could end the cookie or add attributes.
pub fn cookie_safe(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 3800
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `Set-Cookie` that starts a session.
pub fn session_cookie(key: &str) -> String {
    format!("{SESSION_COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/")
}

/// `Set-Cookie` that ends it.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_binds_to_the_session() {
        let t = csrf_token("till_abc");
        assert_eq!(t.len(), 64);
        assert!(check_csrf("till_abc", Some(&t)).is_ok());
        assert!(matches!(
            check_csrf("till_other", Some(&t)),
            Err(AdminError::Csrf)
        ));
        assert!(check_csrf("till_abc", None).is_err());
        assert!(check_csrf("till_abc", Some("")).is_err());
        assert!(check_csrf("till_abc", Some(&t[..63])).is_err());
    }

    #[test]
    fn only_key_characters_go_in_the_cookie() {
        assert!(cookie_safe("till_AZaz09-_"));
        assert!(!cookie_safe("till_x; Domain=evil"));
        assert!(!cookie_safe("till_x\r\nSet-Cookie: a=b"));
        assert!(!cookie_safe(""));
    }
}
