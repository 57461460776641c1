//! Header hygiene: where the Till key is found, what never reaches the upstream, and what
//! never comes back from it.
//!
//! Requests: every client credential (`Authorization`, `x-api-key`, `x-goog-api-key`,
//! `Cookie`, `Proxy-*`), every hop-by-hop header and every header named in `Connection`,
//! `Host` (the upstream host comes only from config), `Content-Length` (re-computed),
//! `Expect`, `Forwarded`, `X-Forwarded-*`, `X-Real-IP` and `Till-*` are dropped; then only
//! the configured credential is injected. The `key` query parameter is dropped when it
//! carries a Till key or when the upstream authenticates by query.

use http::header::{self, HeaderName};
use http::HeaderMap;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// legacy ones proxies also drop.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client headers that may carry a credential or spoof where the request came from.
const CLIENT_ONLY: [&str; 9] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "cookie",
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-real-ip",
];

/// True for hop-by-hop headers.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Where a Till key was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlace {
    /// `Authorization: Bearer <key>`.
    Authorization,
    /// `x-api-key: <key>`.
    XApiKey,
    /// `x-goog-api-key: <key>`.
    XGoogApiKey,
    /// `?key=<key>`.
    Query,
}

/// Finds the presented key: the first of `Authorization: Bearer`, `x-api-key`,
/// `x-goog-api-key`, `?key=` that holds a `till_` key, else the first that holds anything
/// (it will then fail verification with a specific code), else `None`.
pub fn find_key(headers: &HeaderMap, query: Option<&str>) -> Option<(KeyPlace, String)> {
    let mut candidates: Vec<(KeyPlace, String)> = Vec::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        if let Ok(s) = v.to_str() {
            let s = s.trim();
            if let Some((scheme, rest)) = s.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    candidates.push((KeyPlace::Authorization, rest.trim().to_string()));
                }
            }
        }
    }
    for (name, place) in [
        ("x-api-key", KeyPlace::XApiKey),
        ("x-goog-api-key", KeyPlace::XGoogApiKey),
    ] {
        for v in headers.get_all(name) {
            if let Ok(s) = v.to_str() {
                candidates.push((place, s.trim().to_string()));
            }
        }
    }
    if let Some(q) = query {
        for (k, v) in query_pairs(q) {
            if k == "key" {
                candidates.push((KeyPlace::Query, v));
            }
        }
    }
    candidates.retain(|(_, k)| !k.is_empty());
    let pick = candidates
        .iter()
        .position(|(_, k)| k.starts_with(till_token::KEY_PREFIX))
        .unwrap_or(0);
    if candidates.is_empty() {
        None
    } else {
        Some(candidates.swap_remove(pick))
    }
}

/// Decoded `name=value` pairs of a query string or an `application/x-www-form-urlencoded`
/// body (`+` is a space). The one decoder for both: what a key's caveats read from a form
/// is what the method-override and key checks read from a query.
pub(crate) fn query_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (form_decode(k), form_decode(v))
    })
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string to forward: `key` parameters are dropped when they carry a Till key
/// or when named by `drop_param` (the upstream authenticates by `?key=`, which Till injects).
/// Other parameters are forwarded byte for byte.
pub fn forward_query(query: Option<&str>, drop_param: Option<&str>) -> Option<String> {
    let q = query?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = form_decode(k);
            let carries_till_key =
                k == "key" && form_decode(v).trim().starts_with(till_token::KEY_PREFIX);
            !(carries_till_key || drop_param == Some(k.as_str()))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The client's headers minus everything listed in the module docs and `also` (the header
/// the upstream's credential goes in).
pub fn request_headers(client: &HeaderMap, also: Option<&HeaderName>) -> HeaderMap {
    let named = connection_named(client);
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        let n = name.as_str();
        let drop = is_hop_by_hop(name)
            || CLIENT_ONLY.contains(&n)
            || n.starts_with("proxy-")
            || n.starts_with("x-forwarded-")
            || n.starts_with("till-")
            || named.contains(name)
            || also == Some(name);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The upstream's response headers minus hop-by-hop ones, those named in `Connection`,
/// and any `Till-*` header (only Till sets those).
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let named = connection_named(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len() + 3);
    for (name, value) in upstream {
        if !(is_hop_by_hop(name) || named.contains(name) || name.as_str().starts_with("till-")) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

/// Headers that ask an upstream to act as if another method had been sent (Google APIs,
/// Rails, Laravel, Spring's `HiddenHttpMethodFilter` and many gateways honour them).
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The method-override header or parameter the request carries, if any: one of
/// [`METHOD_OVERRIDE_HEADERS`], or a `_method` query parameter (any letter case, decoded).
pub fn method_override(headers: &HeaderMap, query: Option<&str>) -> Option<&'static str> {
    if let Some(h) = METHOD_OVERRIDE_HEADERS
        .iter()
        .find(|h| headers.contains_key(**h))
    {
        return Some(h);
    }
    query
        .is_some_and(has_method_param)
        .then_some("_method parameter")
}

/// True when a query string or `application/x-www-form-urlencoded` body has a `_method`
/// parameter (name decoded, any letter case).
pub fn has_method_param(form: &str) -> bool {
    query_pairs(form).any(|(k, _)| k.trim().eq_ignore_ascii_case("_method"))
}

/// Percent-encodes everything but RFC 3986 unreserved bytes (query values Till writes).
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Replaces every occurrence of `secret` in the response headers — raw, percent-encoded
/// (upper- or lower-case hex) or form-encoded — with `[redacted]`, so an upstream that
/// echoes the request (a redirect keeping a `?key=` query, a debug header) never hands
/// the real credential to the client. A header that cannot be rewritten is dropped.
pub fn scrub_secret(headers: &mut HeaderMap, secret: &str) {
    if secret.is_empty() {
        return;
    }
    let upper = form_encode(secret);
    let mut lower = String::with_capacity(upper.len());
    let mut hex_left = 0;
    for c in upper.chars() {
        if c == '%' {
            hex_left = 2;
            lower.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            lower.push(c.to_ascii_lowercase());
        } else {
            lower.push(c);
        }
    }
    let plus = upper.replace("%20", "+");
    let mut forms = vec![secret.to_string(), upper, lower, plus];
    forms.sort();
    forms.dedup();
    // Longest first, so a form containing another is replaced whole.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    let names: Vec<HeaderName> = headers.keys().cloned().collect();
    for name in names {
        let values: Vec<http::HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        if !values
            .iter()
            .any(|v| forms.iter().any(|f| contains(v.as_bytes(), f.as_bytes())))
        {
            continue;
        }
        headers.remove(&name);
        for v in values {
            let mut bytes = v.as_bytes().to_vec();
            for f in &forms {
                bytes = replace_all(&bytes, f.as_bytes(), b"[redacted]");
            }
            if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                headers.append(name.clone(), v);
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Validates an `Idempotency-Key`: 1-255 printable ASCII bytes (space to `~`).
pub fn valid_idempotency_key(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && bytes.iter().all(|b| (0x20..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn finds_the_key_wherever_sdks_put_it() {
        let h = headers(&[("authorization", "Bearer till_abc")]);
        assert_eq!(
            find_key(&h, None),
            Some((KeyPlace::Authorization, "till_abc".into()))
        );
        let h = headers(&[("x-api-key", "till_abc")]);
        assert_eq!(
            find_key(&h, None),
            Some((KeyPlace::XApiKey, "till_abc".into()))
        );
        let h = headers(&[("x-goog-api-key", "till_abc")]);
        assert_eq!(
            find_key(&h, None),
            Some((KeyPlace::XGoogApiKey, "till_abc".into()))
        );
        assert_eq!(
            find_key(&HeaderMap::new(), Some("a=1&key=till_abc")),
            Some((KeyPlace::Query, "till_abc".into()))
        );
        // A Till key wins over another credential, wherever it is.
        let h = headers(&[
            ("authorization", "Bearer sk-other"),
            ("x-api-key", "till_abc"),
        ]);
        assert_eq!(
            find_key(&h, None),
            Some((KeyPlace::XApiKey, "till_abc".into()))
        );
        // Something that is not a Till key is still returned (it fails verification).
        let h = headers(&[("authorization", "Bearer sk-other")]);
        assert_eq!(
            find_key(&h, None),
            Some((KeyPlace::Authorization, "sk-other".into()))
        );
        assert_eq!(
            find_key(&headers(&[("authorization", "Basic eA==")]), None),
            None
        );
        assert_eq!(find_key(&HeaderMap::new(), Some("key=")), None);
        assert_eq!(find_key(&HeaderMap::new(), None), None);
    }

    #[test]
    fn strips_credentials_hop_by_hop_and_connection_named_headers() {
        let h = headers(&[
            ("authorization", "Bearer till_x"),
            ("x-api-key", "a"),
            ("x-goog-api-key", "b"),
            ("cookie", "c=1"),
            ("proxy-authorization", "Basic x"),
            ("proxy-foo", "1"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("till-replayed", "true"),
            ("x-custom-auth", "zzz"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("idempotency-key", "k1"),
            ("openai-beta", "assistants=v2"),
        ]);
        let out = request_headers(&h, Some(&HeaderName::from_static("x-custom-auth")));
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["accept", "content-type", "idempotency-key", "openai-beta"]
        );
    }

    #[test]
    fn response_headers_drop_hop_by_hop_and_till_headers() {
        let h = headers(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("till-receipt", "forged"),
            ("content-type", "text/event-stream"),
            ("location", "https://elsewhere/"),
        ]);
        let out = response_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "location"]);
    }

    #[test]
    fn query_keeps_everything_but_till_keys_and_the_injected_parameter() {
        assert_eq!(
            forward_query(Some("a=1&key=till_x&b=2"), None).as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(
            forward_query(Some("key=other&b=%20"), None).as_deref(),
            Some("key=other&b=%20")
        );
        assert_eq!(
            forward_query(Some("key=other&alt=sse"), Some("key")).as_deref(),
            Some("alt=sse")
        );
        assert_eq!(forward_query(Some("k%65y=till_x"), None), None);
        assert_eq!(forward_query(Some("key=till_x"), None), None);
        assert_eq!(forward_query(None, None), None);
    }

    /// Issue 10 item 4.
    #[test]
    fn method_overrides_are_found_in_headers_and_parameters() {
        for h in METHOD_OVERRIDE_HEADERS {
            assert_eq!(
                method_override(&headers(&[(h, "DELETE")]), None),
                Some(h),
                "{h}"
            );
        }
        assert!(method_override(&HeaderMap::new(), Some("a=1&_method=DELETE")).is_some());
        assert!(method_override(&HeaderMap::new(), Some("_METHOD=put")).is_some());
        assert!(method_override(&HeaderMap::new(), Some("%5Fmethod=put")).is_some());
        assert!(method_override(&HeaderMap::new(), Some("_method")).is_some());
        assert_eq!(
            method_override(&HeaderMap::new(), Some("method=x&a_method=1")),
            None
        );
        assert_eq!(method_override(&headers(&[("x-method", "1")]), None), None);
        assert!(has_method_param("model=gpt-4o&_method=DELETE"));
    }

    /// Issue 10 item 6.
    #[test]
    fn the_real_credential_is_scrubbed_from_response_headers() {
        let secret = "sk real/secret+42";
        let mut h = headers(&[
            (
                "location",
                "https://up/next?page=2&key=sk%20real%2Fsecret%2B42",
            ),
            ("x-echo", "sk real/secret+42"),
            ("x-lower", "key=sk%20real%2fsecret%2b42"),
            ("x-form", "key=sk+real%2Fsecret%2B42"),
            ("content-type", "application/json"),
        ]);
        scrub_secret(&mut h, secret);
        assert_eq!(h["location"], "https://up/next?page=2&key=[redacted]");
        assert_eq!(h["x-echo"], "[redacted]");
        assert_eq!(h["x-lower"], "key=[redacted]");
        assert_eq!(h["x-form"], "key=[redacted]");
        assert_eq!(h["content-type"], "application/json");
    }

    #[test]
    fn idempotency_keys_are_printable_ascii() {
        assert!(valid_idempotency_key(b"req-1 ok"));
        assert!(valid_idempotency_key(&[b'a'; 255]));
        assert!(!valid_idempotency_key(&[b'a'; 256]));
        assert!(!valid_idempotency_key(b""));
        assert!(!valid_idempotency_key(b"a\r\nb"));
        assert!(!valid_idempotency_key(b"a\x00"));
        assert!(!valid_idempotency_key("é".as_bytes()));
    }
}
