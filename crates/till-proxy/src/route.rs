//! The request target: `/{upstream}/{path...}`, normalised once.
//!
//! Rules (normative in `spec/http.md`): the path must start with `/`; it is split on `/`
//! and every segment is percent-decoded. Refused (`bad_path`): empty segments (`//`)
//! except a trailing `/`, `.` and `..` segments (also when encoded), encoded `/` or `\`,
//! any `\`, control bytes (NUL, CR, LF, ...), invalid `%` escapes and decoded bytes that
//! are not UTF-8. The decoded path is what caveats see; the forwarded path is the same
//! segments re-encoded with one fixed rule, so the upstream receives exactly the path
//! that was authorized.

/// A normalised upstream request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Upstream name (first segment).
    pub upstream: String,
    /// Decoded path below the upstream, starting with `/` (what caveats match).
    pub path: String,
    /// The same path re-encoded for the upstream request.
    pub encoded_path: String,
}

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// No upstream segment.
    NoUpstream,
    /// A `.` or `..` segment.
    DotSegment,
    /// An empty segment (`//`).
    EmptySegment,
    /// `%2F`, `%5C` or a literal `\`.
    Slash,
    /// A control byte, raw or encoded.
    Control,
    /// A malformed `%` escape or non-UTF-8 bytes.
    Encoding,
}

impl PathProblem {
    /// Human-readable reason.
    pub fn describe(self) -> &'static str {
        match self {
            PathProblem::NoUpstream => {
                "the path must start with an upstream name: /{upstream}/{path}"
            }
            PathProblem::DotSegment => "`.` and `..` path segments are not allowed",
            PathProblem::EmptySegment => "empty path segments (`//`) are not allowed",
            PathProblem::Slash => "encoded slashes and backslashes are not allowed in the path",
            PathProblem::Control => "control characters are not allowed in the path",
            PathProblem::Encoding => "the path has an invalid percent-encoding",
        }
    }
}

/// Parses and normalises a request path (without the query string).
pub fn parse(raw: &str) -> Result<Target, PathProblem> {
    let rest = raw.strip_prefix('/').ok_or(PathProblem::NoUpstream)?;
    if raw.contains('\\') {
        return Err(PathProblem::Slash);
    }
    let mut segments = rest.split('/');
    let upstream_raw = segments.next().unwrap_or_default();
    let upstream = decode_segment(upstream_raw)?;
    if upstream.is_empty() {
        return Err(PathProblem::NoUpstream);
    }
    let segments: Vec<&str> = segments.collect();
    let mut path = String::with_capacity(raw.len());
    let mut encoded_path = String::with_capacity(raw.len());
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        let decoded = decode_segment(seg)?;
        if decoded.is_empty() && i != last {
            return Err(PathProblem::EmptySegment);
        }
        path.push('/');
        path.push_str(&decoded);
        encoded_path.push('/');
        encode_segment(&decoded, &mut encoded_path);
    }
    if path.is_empty() {
        path.push('/');
        encoded_path.push('/');
    }
    Ok(Target {
        upstream,
        path,
        encoded_path,
    })
}

fn decode_segment(seg: &str) -> Result<String, PathProblem> {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathProblem::Encoding)?;
            let hi = hex_value(hex[0]).ok_or(PathProblem::Encoding)?;
            let lo = hex_value(hex[1]).ok_or(PathProblem::Encoding)?;
            let v = hi << 4 | lo;
            if v == b'/' || v == b'\\' {
                return Err(PathProblem::Slash);
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if out.iter().any(|b| b.is_ascii_control()) {
        return Err(PathProblem::Control);
    }
    let s = String::from_utf8(out).map_err(|_| PathProblem::Encoding)?;
    if s == "." || s == ".." {
        return Err(PathProblem::DotSegment);
    }
    Ok(s)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 `pchar` without `%`: unreserved, sub-delims, `:` and `@` stay literal.
fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

fn encode_segment(decoded: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in decoded.as_bytes() {
        if is_literal(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (String, String, String) {
        let t = parse(raw).unwrap();
        (t.upstream, t.path, t.encoded_path)
    }

    #[test]
    fn splits_upstream_and_path() {
        assert_eq!(
            ok("/openai/v1/chat/completions"),
            (
                "openai".into(),
                "/v1/chat/completions".into(),
                "/v1/chat/completions".into()
            )
        );
        assert_eq!(ok("/openai"), ("openai".into(), "/".into(), "/".into()));
        assert_eq!(ok("/openai/"), ("openai".into(), "/".into(), "/".into()));
        assert_eq!(
            ok("/github/repos/a/b/"),
            ("github".into(), "/repos/a/b/".into(), "/repos/a/b/".into())
        );
        assert_eq!(
            ok("/gemini/v1beta/models/gemini-pro:generateContent"),
            (
                "gemini".into(),
                "/v1beta/models/gemini-pro:generateContent".into(),
                "/v1beta/models/gemini-pro:generateContent".into()
            )
        );
    }

    #[test]
    fn decodes_for_authorization_and_reencodes_consistently() {
        assert_eq!(
            ok("/x/v%31/a%20b"),
            ("x".into(), "/v1/a b".into(), "/v1/a%20b".into())
        );
        assert_eq!(
            ok("/x/caf%C3%A9"),
            ("x".into(), "/café".into(), "/caf%C3%A9".into())
        );
        assert_eq!(ok("/x/a%25b"), ("x".into(), "/a%b".into(), "/a%25b".into()));
        // A re-encoded path parses back to the same decoded path.
        let t = parse("/x/a%3Fb/%23c").unwrap();
        assert_eq!(t.path, "/a?b/#c");
        assert_eq!(
            parse(&format!("/x{}", t.encoded_path)).unwrap().path,
            t.path
        );
    }

    #[test]
    fn refuses_traversal_and_tricks() {
        let cases = [
            ("/x/../admin", PathProblem::DotSegment),
            ("/x/./a", PathProblem::DotSegment),
            ("/x/%2e%2e/admin", PathProblem::DotSegment),
            ("/x/.%2E", PathProblem::DotSegment),
            ("/x/a/..", PathProblem::DotSegment),
            ("/x/a%2Fb", PathProblem::Slash),
            ("/x/a%2fb", PathProblem::Slash),
            ("/x/a%5Cb", PathProblem::Slash),
            ("/x/a\\b", PathProblem::Slash),
            ("/x//a", PathProblem::EmptySegment),
            ("/x/a%00b", PathProblem::Control),
            ("/x/a%0D%0Ab", PathProblem::Control),
            ("/x/a%zz", PathProblem::Encoding),
            ("/x/a%4", PathProblem::Encoding),
            ("/x/%ff", PathProblem::Encoding),
            ("//x", PathProblem::NoUpstream),
            ("/", PathProblem::NoUpstream),
            ("x", PathProblem::NoUpstream),
            ("/%2e%2e/x", PathProblem::DotSegment),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw), Err(want), "{raw}");
        }
    }
}
