//! The caveat vocabulary: what one block of a Till key may say, and the canonical Datalog
//! each caveat becomes.
//!
//! A block is *canonical* when its Datalog is exactly what [`Caveats::block_source`]
//! generates from the JSON declaration in the block's context. Till refuses any other
//! block, so the readable declaration and the enforced checks can never disagree. An
//! attenuation block without a context is read back from its Datalog instead
//! ([`Caveats::from_block_source`]) and must render to exactly that Datalog.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::TokenError;

/// Prefix of a block's context string; the rest is the JSON declaration.
pub const CONTEXT_PREFIX: &str = "till:v1:";

/// Longest accepted upstream name, method, path prefix or model name.
const MAX_VALUE_LEN: usize = 256;
/// Most values in one list caveat.
const MAX_LIST_LEN: usize = 32;

/// What one block declares. Every field is optional; an absent field does not restrict.
///
/// Lists are sets: they are sorted and deduplicated before signing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caveats {
    /// Upstream name (required in the authority block, must match it in later blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Allowed HTTP methods (upper case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Allowed path prefixes, matched on `/` segment boundaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Allowed values of the JSON body's `model` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Expiry, Unix seconds (valid while `now <= expires`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// Activation cap for this block and everything derived from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    /// A human label for the key family (authority block only). Declared, signed, and
    /// shown by the admin plane; it restricts nothing, so it renders no Datalog check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Per-call ceiling on the output tokens a request may ask for (read from the body
    /// where the upstream's preset says; a request that does not state it is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Per-call ceiling on a form body's `amount` (Stripe; minor currency units). A
    /// request that does not state one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_max: Option<u64>,
    /// Allowed values of a form body's `currency` (lower case ISO 4217 codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currencies: Option<Vec<String>>,
    /// Allowed repositories (`owner/name`, lower case), matched against the path
    /// `/repos/{owner}/{name}/...` (GitHub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<String>>,
    /// Numeric ceilings on JSON body members, by JSON pointer (`/max_tokens` → 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_max: Option<BTreeMap<String, u64>>,
    /// String allow-lists for JSON body members, by JSON pointer (`/model` → [a, b]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_allow: Option<BTreeMap<String, Vec<String>>>,
    /// Windowed caps: at most `max` activations per fixed window of `secs` seconds
    /// (60, 3600 or 86400) through this block and its descendants. The ledger decides
    /// them in the claim transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Window>>,
}

/// One windowed cap: at most `max` activations per fixed window of `secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Window length in seconds: 60 (minute), 3600 (hour) or 86400 (day).
    pub secs: u64,
    /// Most activations per window (at least 1).
    pub max: u64,
}

/// The window lengths a [`Window`] may have.
pub const WINDOW_SECS: [u64; 3] = [60, 3600, 86_400];

/// Most JSON pointers per block in `json_max` / `json_allow`.
const MAX_POINTERS: usize = 8;

impl Caveats {
    /// Validates every value and puts lists in canonical (sorted, deduplicated) order.
    pub fn normalize(mut self) -> Result<Self, TokenError> {
        if let Some(u) = &self.upstream {
            validate_upstream(u)?;
        }
        normalize_list(&mut self.methods, "method", |m| {
            let m = m.to_ascii_uppercase();
            if m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "method `{}` must be letters only, e.g. POST",
                    printable(&m)
                ));
            }
            Ok(m)
        })?;
        normalize_list(&mut self.paths, "path", |p| {
            validate_path_prefix(p)?;
            Ok(p.to_string())
        })?;
        normalize_list(&mut self.models, "model", |m| {
            if m.is_empty() || !m.bytes().all(is_model_byte) {
                return Err(format!(
                    "model `{}` may contain only letters, digits and - . _ : / @ +",
                    printable(m)
                ));
            }
            Ok(m.to_string())
        })?;
        if let Some(e) = self.expires {
            if OffsetDateTime::from_unix_timestamp(e).is_err() || e < 0 {
                return Err(TokenError::InvalidCaveat(format!(
                    "expiry {e} is out of range"
                )));
            }
        }
        if let Some(label) = &self.label {
            validate_label(label)?;
        }
        if let Some(cap) = self.cap {
            // Datalog integers are i64.
            if cap > i64::MAX as u64 {
                return Err(TokenError::InvalidCaveat(format!("cap {cap} is too large")));
            }
        }
        for (what, v) in [
            ("max_output_tokens", self.max_output_tokens),
            ("amount_max", self.amount_max),
        ] {
            if v.is_some_and(|v| v > i64::MAX as u64) {
                return Err(TokenError::InvalidCaveat(format!("{what} is too large")));
            }
        }
        normalize_list(&mut self.currencies, "currency", |c| {
            let c = c.to_ascii_lowercase();
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(format!(
                    "currency `{}` must be a three-letter ISO 4217 code, e.g. usd",
                    printable(&c)
                ));
            }
            Ok(c)
        })?;
        normalize_list(&mut self.repos, "repository", |r| {
            let r = r.to_ascii_lowercase();
            validate_repo(&r)?;
            Ok(r)
        })?;
        if let Some(map) = &self.json_max {
            check_pointers(map.keys(), map.len())?;
            if map.values().any(|&v| v > i64::MAX as u64) {
                return Err(TokenError::InvalidCaveat(
                    "json_max ceiling is too large".into(),
                ));
            }
        }
        if let Some(mut map) = self.json_allow.take() {
            check_pointers(map.keys(), map.len())?;
            for (pointer, values) in map.iter_mut() {
                let mut list = Some(std::mem::take(values));
                normalize_list(&mut list, &format!("json_allow {pointer}"), |v| {
                    if v.is_empty() || !v.bytes().all(is_model_byte) {
                        return Err(format!(
                            "value `{}` may contain only letters, digits and - . _ : / @ +",
                            printable(v)
                        ));
                    }
                    Ok(v.to_string())
                })?;
                *values = list.unwrap_or_default();
            }
            self.json_allow = Some(map);
        }
        if let Some(windows) = self.windows.take() {
            if windows.is_empty() {
                return Err(TokenError::InvalidCaveat(
                    "an empty window list restricts nothing; omit it instead".into(),
                ));
            }
            let mut out: Vec<Window> = Vec::with_capacity(windows.len());
            for w in windows {
                if !WINDOW_SECS.contains(&w.secs) {
                    return Err(TokenError::InvalidCaveat(format!(
                        "window of {} seconds: windows are per minute (60), hour (3600) or day (86400)",
                        w.secs
                    )));
                }
                if w.max == 0 || w.max > i64::MAX as u64 {
                    return Err(TokenError::InvalidCaveat(format!(
                        "window cap {} must be between 1 and 2^63-1 (use cap 0 to allow nothing)",
                        w.max
                    )));
                }
                out.push(w);
            }
            // One window per length: the tightest one given.
            out.sort();
            out.dedup_by_key(|w| w.secs);
            self.windows = Some(out);
        }
        Ok(self)
    }

    /// True when the block declares nothing.
    pub fn is_empty(&self) -> bool {
        self == &Caveats::default()
    }

    /// The block context string: [`CONTEXT_PREFIX`] + compact JSON.
    pub fn context(&self) -> Result<String, TokenError> {
        let json = serde_json::to_string(self).map_err(|e| TokenError::Biscuit(e.to_string()))?;
        Ok(format!("{CONTEXT_PREFIX}{json}"))
    }

    /// Reads a context string back; it must be exactly what [`Caveats::context`] writes.
    pub fn from_context(context: &str) -> Result<Self, String> {
        let json = context
            .strip_prefix(CONTEXT_PREFIX)
            .ok_or_else(|| "missing Till caveat declaration".to_string())?;
        let declared: Caveats =
            serde_json::from_str(json).map_err(|e| format!("bad caveat declaration: {e}"))?;
        let normalized = declared.clone().normalize().map_err(|e| e.to_string())?;
        if normalized != declared || normalized.context().ok().as_deref() != Some(context) {
            return Err("caveat declaration is not in canonical form".to_string());
        }
        Ok(normalized)
    }

    /// Reads an attenuation block that carries **no** declaration back from its printed
    /// Datalog (spec/token.md §13): what a stock Biscuit library that cannot set a block's
    /// context writes. The source must be exactly `block_source(index)` of the caveats read
    /// from it, byte for byte: the parser only recognises the canonical vocabulary, and the
    /// comparison refuses everything else (whitespace, reordered alternatives or lines, a
    /// cap naming another block's index, a set instead of alternatives, ...).
    ///
    /// A block with no declaration and no check is refused: it would restrict nothing, and
    /// Till never writes one either.
    pub fn from_block_source(source: &str, index: usize) -> Result<Self, String> {
        if source.is_empty() {
            return Err("it has no checks: an attenuation must restrict something".into());
        }
        let mut c = Caveats::default();
        for line in source.split_inclusive('\n') {
            let body = line
                .strip_prefix("check if ")
                .and_then(|l| l.strip_suffix(";\n"))
                .ok_or_else(|| {
                    format!(
                        "`{}` is not a Till caveat check",
                        printable(line.trim_end())
                    )
                })?;
            read_check(body, index, &mut c)?;
        }
        let c = c.normalize().map_err(|e| e.to_string())?;
        if c.block_source(index).map_err(|e| e.to_string())? != source {
            return Err("its Datalog is not the canonical rendering of Till caveats".into());
        }
        Ok(c)
    }

    /// The Datalog checks this block carries, one per line, each ending in `;`. `index` is
    /// the block's position in the token (the cap check names it).
    pub fn block_source(&self, index: usize) -> Result<String, TokenError> {
        let mut out = String::new();
        if let Some(u) = &self.upstream {
            out.push_str(&format!("check if till_upstream(\"{u}\");\n"));
        }
        // Lists are rendered as alternatives, not as Datalog sets: Biscuit prints a set in
        // symbol-table order (which depends on earlier blocks and its default symbols), so
        // a set could not be compared with this rendering.
        if let Some(ms) = &self.methods {
            out.push_str(&format!("check if {};\n", alternatives("till_method", ms)));
        }
        if let Some(ps) = &self.paths {
            let bodies: Vec<String> = ps
                .iter()
                .map(|p| {
                    if p.ends_with('/') {
                        format!("till_path($p), $p.starts_with(\"{p}\")")
                    } else {
                        format!("till_path($p), $p == \"{p}\" || $p.starts_with(\"{p}/\")")
                    }
                })
                .collect();
            out.push_str(&format!("check if {};\n", bodies.join(" or ")));
        }
        if let Some(ms) = &self.models {
            out.push_str(&format!("check if {};\n", alternatives("till_model", ms)));
        }
        if let Some(e) = self.expires {
            out.push_str(&format!("check if time($t), $t <= {};\n", rfc3339(e)?));
        }
        if let Some(cap) = self.cap {
            out.push_str(&format!(
                "check if till_activation({index}, $n), $n <= {cap};\n"
            ));
        }
        if let Some(n) = self.max_output_tokens {
            out.push_str(&format!(
                "check if till_max_output_tokens($t), $t <= {n};\n"
            ));
        }
        if let Some(n) = self.amount_max {
            out.push_str(&format!("check if till_amount($a), $a <= {n};\n"));
        }
        if let Some(cs) = &self.currencies {
            out.push_str(&format!(
                "check if {};\n",
                alternatives("till_currency", cs)
            ));
        }
        if let Some(rs) = &self.repos {
            out.push_str(&format!("check if {};\n", alternatives("till_repo", rs)));
        }
        for (pointer, n) in self.json_max.iter().flatten() {
            out.push_str(&format!(
                "check if till_json_int(\"{pointer}\", $v), $v <= {n};\n"
            ));
        }
        for (pointer, values) in self.json_allow.iter().flatten() {
            let alts: Vec<String> = values
                .iter()
                .map(|v| format!("till_json_str(\"{pointer}\", \"{v}\")"))
                .collect();
            out.push_str(&format!("check if {};\n", alts.join(" or ")));
        }
        for w in self.windows.iter().flatten() {
            out.push_str(&format!(
                "check if till_window({index}, {}, $n), $n <= {};\n",
                w.secs, w.max
            ));
        }
        Ok(out)
    }

    /// True when a caveat of this block is read from the request body (the proxy must
    /// buffer and parse it): models aside, the per-call ceilings and JSON caveats.
    pub fn reads_body(&self) -> bool {
        self.max_output_tokens.is_some()
            || self.amount_max.is_some()
            || self.currencies.is_some()
            || self.json_max.is_some()
            || self.json_allow.is_some()
    }
}

/// `owner/name`: owner 1-39 of `a-z 0-9 -`, name 1-100 of `a-z 0-9 - . _` (not `.`/`..`).
fn validate_repo(r: &str) -> Result<(), String> {
    let ok = r.split_once('/').is_some_and(|(owner, name)| {
        !owner.is_empty()
            && owner.len() <= 39
            && owner
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.is_empty()
            && name.len() <= 100
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "repository `{}` must be owner/name (letters, digits, - . _)",
            printable(r)
        ))
    }
}

/// JSON pointers (RFC 6901) as the caveats accept them: 1-128 bytes, `/` then non-empty
/// tokens of `A-Z a-z 0-9 - _ .` (no `~` escapes), at most [`MAX_POINTERS`] per block.
fn check_pointers<'a>(
    pointers: impl Iterator<Item = &'a String>,
    len: usize,
) -> Result<(), TokenError> {
    if len == 0 || len > MAX_POINTERS {
        return Err(TokenError::InvalidCaveat(format!(
            "1 to {MAX_POINTERS} JSON pointers per block"
        )));
    }
    for p in pointers {
        let ok = p.len() <= 128
            && p.starts_with('/')
            && p[1..].split('/').all(|tok| {
                !tok.is_empty()
                    && tok
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        if !ok {
            return Err(TokenError::InvalidCaveat(format!(
                "JSON pointer `{}` must be /a/b with letters, digits, - _ . (e.g. /max_tokens)",
                printable(p)
            )));
        }
    }
    Ok(())
}

/// Reads one `check if` body of the canonical vocabulary into `c`. Loose on purpose where
/// the byte comparison in [`Caveats::from_block_source`] is strict: it only has to find the
/// values; each caveat may appear once.
fn read_check(body: &str, index: usize, c: &mut Caveats) -> Result<(), String> {
    fn once<T>(slot: &mut Option<T>, what: &str, value: T) -> Result<(), String> {
        if slot.is_some() {
            return Err(format!("two {what} checks in one block"));
        }
        *slot = Some(value);
        Ok(())
    }
    fn arg<'a>(alt: &'a str, predicate: &str) -> Result<&'a str, String> {
        alt.strip_prefix(predicate)
            .and_then(|a| a.strip_prefix("(\""))
            .and_then(|a| a.strip_suffix("\")"))
            .filter(|v| !v.contains('"'))
            .ok_or_else(|| format!("`{}` is not a {predicate} alternative", printable(alt)))
    }
    fn list(body: &str, predicate: &str) -> Result<Vec<String>, String> {
        body.split(" or ")
            .map(|alt| arg(alt, predicate).map(String::from))
            .collect()
    }
    let unknown = || format!("`{}` is not a Till caveat check", printable(body));
    if body.starts_with("till_upstream(") {
        once(
            &mut c.upstream,
            "upstream",
            arg(body, "till_upstream")?.to_string(),
        )
    } else if body.starts_with("till_method(") {
        once(&mut c.methods, "method", list(body, "till_method")?)
    } else if body.starts_with("till_model(") {
        once(&mut c.models, "model", list(body, "till_model")?)
    } else if body.starts_with("till_path(") {
        let prefixes = body
            .split(" or ")
            .map(|alt| {
                // `till_path($p), $p.starts_with("P")` or `till_path($p), $p == "P" || ...`:
                // the first quoted value is the prefix; the comparison checks the rest.
                alt.strip_prefix("till_path($p), $p")
                    .and_then(|a| a.split('"').nth(1))
                    .map(String::from)
                    .ok_or_else(unknown)
            })
            .collect::<Result<Vec<_>, _>>()?;
        once(&mut c.paths, "path", prefixes)
    } else if let Some(date) = body.strip_prefix("time($t), $t <= ") {
        let t = OffsetDateTime::parse(date, &Rfc3339)
            .map_err(|_| format!("`{}` is not an RFC 3339 date", printable(date)))?;
        once(&mut c.expires, "expiry", t.unix_timestamp())
    } else if let Some(rest) = body.strip_prefix("till_activation(") {
        let (block, cap) = rest.split_once(", $n), $n <= ").ok_or_else(unknown)?;
        if block != index.to_string() {
            return Err(format!(
                "its cap check names block {}, not its own index {index}",
                printable(block)
            ));
        }
        let cap = cap
            .parse::<u64>()
            .map_err(|_| format!("cap `{}` is not a number", printable(cap)))?;
        once(&mut c.cap, "cap", cap)
    } else if let Some(n) = body.strip_prefix("till_max_output_tokens($t), $t <= ") {
        once(&mut c.max_output_tokens, "max_output_tokens", number(n)?)
    } else if let Some(n) = body.strip_prefix("till_amount($a), $a <= ") {
        once(&mut c.amount_max, "amount", number(n)?)
    } else if body.starts_with("till_currency(") {
        once(&mut c.currencies, "currency", list(body, "till_currency")?)
    } else if body.starts_with("till_repo(") {
        once(&mut c.repos, "repository", list(body, "till_repo")?)
    } else if let Some(rest) = body.strip_prefix("till_json_int(\"") {
        let (pointer, n) = rest.split_once("\", $v), $v <= ").ok_or_else(unknown)?;
        let map = c.json_max.get_or_insert_with(BTreeMap::new);
        if map.insert(pointer.to_string(), number(n)?).is_some() {
            return Err(format!("two json_max checks for {}", printable(pointer)));
        }
        Ok(())
    } else if body.starts_with("till_json_str(\"") {
        let mut pointer = None;
        let mut values = Vec::new();
        for alt in body.split(" or ") {
            let (p, v) = alt
                .strip_prefix("till_json_str(\"")
                .and_then(|a| a.strip_suffix("\")"))
                .and_then(|a| a.split_once("\", \""))
                .filter(|(p, v)| !p.contains('"') && !v.contains('"'))
                .ok_or_else(unknown)?;
            if pointer.is_some_and(|q| q != p) {
                return Err(unknown());
            }
            pointer = Some(p);
            values.push(v.to_string());
        }
        let pointer = pointer.ok_or_else(unknown)?;
        let map = c.json_allow.get_or_insert_with(BTreeMap::new);
        if map.insert(pointer.to_string(), values).is_some() {
            return Err(format!("two json_allow checks for {}", printable(pointer)));
        }
        Ok(())
    } else if let Some(rest) = body.strip_prefix("till_window(") {
        let (block, rest) = rest.split_once(", ").ok_or_else(unknown)?;
        if block != index.to_string() {
            return Err(format!(
                "its window check names block {}, not its own index {index}",
                printable(block)
            ));
        }
        let (secs, max) = rest.split_once(", $n), $n <= ").ok_or_else(unknown)?;
        let w = Window {
            secs: number(secs)?,
            max: number(max)?,
        };
        let windows = c.windows.get_or_insert_with(Vec::new);
        if windows.iter().any(|x| x.secs == w.secs) {
            return Err(format!("two windows of {} seconds", w.secs));
        }
        windows.push(w);
        Ok(())
    } else {
        Err(unknown())
    }
}

fn number(n: &str) -> Result<u64, String> {
    n.parse::<u64>()
        .map_err(|_| format!("`{}` is not a number", printable(n)))
}

/// True when `path` is inside the prefix `prefix` (segment-aware: `/v1/chat` covers
/// `/v1/chat` and `/v1/chat/completions`, not `/v1/chatty`; a prefix ending in `/`
/// covers everything below it).
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
    }
}

/// Formats Unix seconds as the RFC 3339 UTC form Biscuit prints.
pub fn rfc3339(unix: i64) -> Result<String, TokenError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| TokenError::InvalidCaveat(format!("expiry {unix} is out of range")))
}

/// `pred("a") or pred("b")`: one alternative per value, in the (sorted) list order.
fn alternatives(predicate: &str, values: &[String]) -> String {
    let bodies: Vec<String> = values
        .iter()
        .map(|v| format!("{predicate}(\"{v}\")"))
        .collect();
    bodies.join(" or ")
}

fn normalize_list(
    list: &mut Option<Vec<String>>,
    what: &str,
    check: impl Fn(&str) -> Result<String, String>,
) -> Result<(), TokenError> {
    let Some(values) = list.take() else {
        return Ok(());
    };
    if values.is_empty() {
        return Err(TokenError::InvalidCaveat(format!(
            "an empty {what} list would allow nothing; omit it instead"
        )));
    }
    if values.len() > MAX_LIST_LEN {
        return Err(TokenError::InvalidCaveat(format!(
            "at most {MAX_LIST_LEN} {what} values per block"
        )));
    }
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        if v.len() > MAX_VALUE_LEN {
            return Err(TokenError::InvalidCaveat(format!(
                "{what} longer than {MAX_VALUE_LEN} bytes"
            )));
        }
        out.push(check(&v).map_err(TokenError::InvalidCaveat)?);
    }
    out.sort();
    out.dedup();
    *list = Some(out);
    Ok(())
}

/// Labels: 1-64 bytes of letters, digits, space and `- _ . : / @ +`, not starting or
/// ending with a space.
pub fn validate_label(label: &str) -> Result<(), TokenError> {
    let ok = !label.is_empty()
        && label.len() <= 64
        && !label.starts_with(' ')
        && !label.ends_with(' ')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" -_.:/@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidCaveat(format!(
            "label `{}` must be 1-64 of letters, digits, space and - _ . : / @ +",
            printable(label)
        )))
    }
}

/// Upstream names: lower-case letters, digits, `-` and `_`, starting with a letter.
pub fn validate_upstream(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidCaveat(format!(
            "upstream `{}` must be 1-64 of a-z 0-9 - _ starting with a letter",
            printable(name)
        )))
    }
}

fn validate_path_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path `{}` must start with /", printable(p)));
    }
    if !p.bytes().all(is_path_byte) {
        return Err(format!(
            "path `{}` may contain only URL path characters (no quotes, backslashes, spaces, ? or #)",
            printable(p)
        ));
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") || p.contains("//") {
        return Err(format!(
            "path `{}` must be normalised (no //, . or ..)",
            printable(p)
        ));
    }
    if p.contains('%') {
        return Err(format!(
            "path `{}` must be given decoded (no percent-escapes)",
            printable(p)
        ));
    }
    Ok(())
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@%".contains(&b)
}

fn is_model_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._:/@+".contains(&b)
}

/// A value made safe to show in an error message (control characters escaped, truncated).
fn printable(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_aware_prefixes() {
        assert!(path_matches("/v1/chat", "/v1/chat"));
        assert!(path_matches("/v1/chat", "/v1/chat/completions"));
        assert!(!path_matches("/v1/chat", "/v1/chatty"));
        assert!(!path_matches("/v1/chat", "/v1"));
        assert!(path_matches("/v1/", "/v1/x"));
        assert!(!path_matches("/v1/", "/v1"));
        assert!(path_matches("/", "/anything"));
    }

    #[test]
    fn normalize_sorts_dedups_and_uppercases() {
        let c = Caveats {
            methods: Some(vec!["post".into(), "GET".into(), "POST".into()]),
            ..Caveats::default()
        }
        .normalize()
        .unwrap();
        assert_eq!(c.methods, Some(vec!["GET".to_string(), "POST".to_string()]));
    }

    #[test]
    fn rejects_injection_attempts() {
        for p in [
            "/a\"b", "/a\\b", "a", "/a/../b", "/a b", "/a%2fb", "/a//b", "/a?x",
        ] {
            let c = Caveats {
                paths: Some(vec![p.into()]),
                ..Caveats::default()
            };
            assert!(c.normalize().is_err(), "{p} accepted");
        }
        for m in ["gpt\"4", "a b", ""] {
            let c = Caveats {
                models: Some(vec![m.into()]),
                ..Caveats::default()
            };
            assert!(c.normalize().is_err(), "{m} accepted");
        }
        for u in ["OpenAI", "", "1abc", "a\"b"] {
            let c = Caveats {
                upstream: Some(u.into()),
                ..Caveats::default()
            };
            assert!(c.normalize().is_err(), "{u} accepted");
        }
        let c = Caveats {
            methods: Some(vec![]),
            ..Caveats::default()
        };
        assert!(c.normalize().is_err());
    }

    fn full() -> Caveats {
        Caveats {
            upstream: Some("openai".into()),
            methods: Some(vec!["GET".into(), "POST".into()]),
            paths: Some(vec!["/v1/chat".into(), "/v1/embeddings/".into()]),
            models: Some(vec!["gpt-4o".into(), "gpt-4o-mini".into()]),
            expires: Some(2_000_000_000),
            cap: Some(10),
            label: None,
            ..Caveats::default()
        }
    }

    #[test]
    fn block_source_reads_back() {
        let c = full();
        for index in [1, 2, 15] {
            let src = c.block_source(index).unwrap();
            assert_eq!(Caveats::from_block_source(&src, index).unwrap(), c);
        }
        let cap = Caveats {
            cap: Some(0),
            ..Caveats::default()
        };
        let src = "check if till_activation(3, $n), $n <= 0;\n";
        assert_eq!(Caveats::from_block_source(src, 3).unwrap(), cap);
        // The highest cap and the latest expiry the grammar allows.
        let max = Caveats {
            expires: Some(253_402_300_799),
            cap: Some(i64::MAX as u64),
            ..Caveats::default()
        };
        let src = max.block_source(1).unwrap();
        assert_eq!(Caveats::from_block_source(&src, 1).unwrap(), max);
    }

    #[test]
    fn block_source_near_misses_are_refused() {
        let src = full().block_source(1).unwrap();
        let swap = |a: &str, b: &str| src.replace(a, "\u{0}").replace(b, a).replace('\u{0}', b);
        let refused = [
            // Whitespace.
            src.replace("check if till_method", "check if  till_method"),
            src.replace(";\n", " ;\n"),
            src.replace(";\n", ";\r\n"),
            src.trim_end().to_string(),
            format!("{src}\n"),
            format!(" {src}"),
            src.replace(" or ", "  or "),
            src.replace("$n <= 10", "$n<=10"),
            // Reordered alternatives, reordered lines, repeated lines.
            swap("till_method(\"GET\")", "till_method(\"POST\")"),
            swap("till_model(\"gpt-4o\")", "till_model(\"gpt-4o-mini\")"),
            {
                let mut lines: Vec<&str> = src.split_inclusive('\n').collect();
                lines.swap(0, 1);
                lines.concat()
            },
            format!("{src}check if till_activation(1, $n), $n <= 10;\n"),
            // A cap naming another block's index (its own is 1).
            src.replace("till_activation(1,", "till_activation(0,"),
            src.replace("till_activation(1,", "till_activation(2,"),
            src.replace("till_activation(1,", "till_activation(01,"),
            // Unknown predicates, other checks, facts and rules.
            format!("{src}check if till_rate(\"x\");\n"),
            format!("{src}check if true;\n"),
            src.replace("till_method", "till_methods"),
            format!("{src}user(\"alice\");\n"),
            format!("{src}till_activation(1, 1) <- till_upstream($u);\n"),
            src.replace("check if till_upstream", "check all till_upstream"),
            src.replace("check if till_upstream", "reject if till_upstream"),
            src.replace(
                "check if till_upstream(\"openai\")",
                "check if till_upstream(\"openai\") trusting previous",
            ),
            // Other renderings of the same meaning.
            src.replace(
                "till_method(\"GET\") or till_method(\"POST\")",
                "till_method($m), {\"GET\", \"POST\"}.contains($m)",
            ),
            src.replace(
                "$p == \"/v1/chat\" || $p.starts_with(\"/v1/chat/\")",
                "$p.starts_with(\"/v1/chat\")",
            ),
            src.replace("$p == \"/v1/chat\"", "\"/v1/chat\" == $p"),
            src.replace("$n <= 10", "$n < 11"),
            src.replace(
                "$t <= 2033-05-18T03:33:20Z",
                "$t <= 2033-05-18T05:33:20+02:00",
            ),
            // Values outside the grammar or normalisation.
            src.replace("\"POST\"", "\"post\""),
            src.replace(
                "till_method(\"GET\") or ",
                "till_method(\"GET\") or till_method(\"GET\") or ",
            ),
            src.replace("\"openai\"", "\"OpenAI\""),
            src.replace("$n <= 10", "$n <= -1"),
            src.replace("$n <= 10", "$n <= 9223372036854775808"),
            src.replace("/v1/embeddings/", "/v1/../x/"),
            // No checks at all.
            String::new(),
        ];
        for bad in refused {
            assert_ne!(bad, src);
            assert!(
                Caveats::from_block_source(&bad, 1).is_err(),
                "accepted:\n{bad}"
            );
        }
        // The same source is not canonical at another index.
        assert!(Caveats::from_block_source(&src, 2).is_err());
    }

    #[test]
    fn context_round_trip_is_exact() {
        let c = Caveats {
            upstream: Some("openai".into()),
            cap: Some(3),
            paths: Some(vec!["/v1/chat".into()]),
            ..Caveats::default()
        }
        .normalize()
        .unwrap();
        let ctx = c.context().unwrap();
        assert_eq!(Caveats::from_context(&ctx).unwrap(), c);
        // Whitespace or reordering is not canonical.
        let spaced = ctx.replace(":3", ": 3");
        assert!(Caveats::from_context(&spaced).is_err());
        assert!(Caveats::from_context("till:v1:{\"cap\":1,\"evil\":2}").is_err());
        assert!(Caveats::from_context("{\"cap\":1}").is_err());
        // Unsorted lists are not canonical.
        assert!(Caveats::from_context("till:v1:{\"methods\":[\"POST\",\"GET\"]}").is_err());
    }
}
