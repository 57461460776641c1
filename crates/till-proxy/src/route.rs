//! The request target: `/{upstream}/{path...}`, normalised once.
//!
//! Rules (normative in `spec/http.md`): the path must start with `/`; it is split on `/`
//! and every segment is percent-decoded. Refused (`bad_path`): empty segments (`//`)
//! except a trailing `/`, `.` and `..` segments (also when encoded), encoded `/` or `\`,
//! any `\`, control bytes (NUL, CR, LF, ...), invalid `%` escapes and decoded bytes that
//! are not UTF-8. Also refused, because some upstream server reads them as dot segments
//! or separators although Till does not: a `;` (raw or encoded; Tomcat and Spring cut a
//! segment at `;`, so `..;` climbs), an encoded `%` (`%25`: a second decoding would turn
//! `%252e` into `.`), and a segment whose NFKC form has only dots (and spaces), or a `/`,
//! `\`, `;` or `%` (fullwidth `．．`, `…`-style leaders, `..%20`, `...`). The decoded path is what caveats see; the forwarded path is the same
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
    /// A segment some upstream server reads as a dot segment or a separator: `;`, `%25`,
    /// only dots and spaces (`...`, `.. `), or NFKC look-alikes of those.
    LookAlike,
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
            PathProblem::LookAlike => {
                "path segments with `;`, an encoded `%`, only dots, or Unicode look-alikes of `.`, `/`, `\\`, `;` or `%` are not allowed"
            }
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
    if looks_like_a_dot_segment_or_separator(&s) {
        return Err(PathProblem::LookAlike);
    }
    Ok(s)
}

/// True when an upstream may read the decoded segment `s` differently from Till: it holds
/// `;` (path parameters) or `%` (a second decoding would change it), or its NFKC form
/// holds `/`, `\\`, `;`, `%`, or is made only of dots and spaces (Windows and some Java
/// servers trim trailing dots and spaces, so `...` and `.. ` can act as `..`).
fn looks_like_a_dot_segment_or_separator(s: &str) -> bool {
    let suspicious = |t: &str| {
        t.contains([';', '%', '/', '\\'])
            || (!t.is_empty() && t.contains('.') && t.chars().all(|c| c == '.' || c == ' '))
    };
    if suspicious(s) {
        return true;
    }
    if s.is_ascii() {
        return false; // NFKC leaves ASCII alone
    }
    let nfkc = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc().normalize(s);
    suspicious(&nfkc) || nfkc.chars().any(|c| c.is_control())
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
        // `%25` is refused (a second decoding would change the segment): see
        // `refuses_dot_segment_look_alikes`.
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

    /// Issue 10 item 5: segments that Tomcat/Spring, a second decoding, Unicode
    /// normalisation or Windows-style trimming turn into dot segments or separators.
    #[test]
    fn refuses_dot_segment_look_alikes() {
        let cases = [
            "/openai/v1/chat/..;/..;/v1/files",
            "/x/a;b",
            "/x/a%3Bb",
            "/x/..%20",
            "/x/...",
            "/x/%2e%2e%2e",
            "/x/.%20.",
            "/x/%252e%252e/admin",
            "/x/a%25b",
            "/x/%25",
            "/x/\u{ff0e}\u{ff0e}/admin",
            "/x/%EF%BC%8E%EF%BC%8E/admin",
            "/x/\u{2025}/admin",
            "/x/\u{2024}",
            "/x/\u{fe52}\u{fe52}",
            "/x/a\u{ff0f}b",
            "/x/a\u{ff3c}b",
            "/x/a\u{ff1b}b",
            "/x/a\u{ff05}2e",
        ];
        for raw in cases {
            assert_eq!(parse(raw), Err(PathProblem::LookAlike), "{raw}");
        }
        // Dots inside names stay fine.
        assert_eq!(ok("/x/v1/file.v2..txt").1, "/v1/file.v2..txt");
        assert_eq!(ok("/x/.well-known/a").1, "/.well-known/a");
        assert_eq!(ok("/x/caf%C3%A9").1, "/café");
    }

    /// RFC 3986 `remove_dot_segments` over `/`-separated segments.
    fn resolve(segments: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in segments {
            match s.as_str() {
                "." => {}
                ".." => {
                    out.pop();
                }
                _ => out.push(s.clone()),
            }
        }
        out
    }

    fn percent_decode_lossy(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex_value(b[i + 1]), hex_value(b[i + 2])) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The ways some upstream server reads one (already once-decoded) segment.
    fn readings(seg: &str) -> Vec<String> {
        let nfkc = |t: &str| {
            icu_normalizer::ComposingNormalizerBorrowed::new_nfkc()
                .normalize(t)
                .into_owned()
        };
        let cut = |t: &str| t.split(';').next().unwrap_or_default().to_string();
        let trim = |t: &str| {
            let r = t.trim_end_matches(['.', ' ']);
            if r.is_empty() && t.starts_with("..") {
                "..".to_string()
            } else if r.is_empty() && t.starts_with('.') {
                ".".to_string()
            } else {
                r.to_string()
            }
        };
        let twice = percent_decode_lossy(seg);
        vec![
            seg.to_string(),
            twice.clone(),
            nfkc(seg),
            nfkc(&twice),
            cut(seg),
            cut(&twice),
            trim(seg),
            trim(&nfkc(&twice)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// No accepted path, read by any of the rules above, leaves its prefix.
        #[test]
        fn no_accepted_path_leaves_its_prefix(
            segs in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::sample::select(vec![
                        ".", "..", "%2e", "%2E", "%252e", "%25", ";", "%3b", "%3B", "%20",
                        " ", "a", "b", "\u{ff0e}", "%EF%BC%8E", "\u{2025}", "\u{2024}",
                        "\u{fe52}", "%2f", "\u{ff0f}", "\u{ff1b}", "~", "-", "%", "2e",
                    ]),
                    1..5,
                ),
                1..5,
            )
        ) {
            let tail: Vec<String> = segs.iter().map(|s| s.concat()).collect();
            let raw = format!("/x/allowed/{}", tail.join("/"));
            if let Ok(t) = parse(&raw) {
                let encoded: Vec<&str> = t.encoded_path.split('/').skip(1).collect();
                // The upstream decodes the forwarded path once; each reading of each
                // segment, alone or all at once, must stay below `/allowed`.
                for pick in 0..8 {
                    let read: Vec<String> = encoded
                        .iter()
                        .map(|e| readings(&percent_decode_lossy(e))[pick].clone())
                        .collect();
                    let flat: Vec<String> = read
                        .iter()
                        .flat_map(|r| r.split(['/', '\\']).map(str::to_string).collect::<Vec<_>>())
                        .collect();
                    let resolved = resolve(&flat);
                    proptest::prop_assert!(
                        resolved.first().map(String::as_str) == Some("allowed"),
                        "{raw} read as {read:?} resolves to {resolved:?}"
                    );
                }
            }
        }
    }
}
