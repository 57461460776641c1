//! Upstream presets: where each API lives, how its SDK sends the API key, and where the
//! model of a request is found.

use crate::hygiene;
use http::HeaderName;

/// How the real credential is sent to an upstream (and where its SDK puts the key, so a
/// Till key is accepted in that place too).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// A request header, optionally with a scheme: `Authorization: Bearer <secret>`,
    /// `x-api-key: <secret>`.
    Header {
        /// Header name (lower case).
        name: HeaderName,
        /// Scheme written before the secret (`Bearer`), if any.
        scheme: Option<String>,
    },
    /// A query parameter (`?key=<secret>`).
    Query {
        /// Parameter name.
        param: String,
    },
}

/// Where the `model` caveat's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelSource {
    /// Not an LLM API: requests carry no model (a key with a `models` caveat is refused).
    None,
    /// The JSON request body's top-level `model` string (OpenAI, Anthropic).
    JsonBody,
    /// The path segment after `models/`, up to `:` (Gemini:
    /// `/v1beta/models/{model}:generateContent`).
    GeminiPath,
}

/// A known upstream API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preset {
    /// OpenAI.
    OpenAi,
    /// Anthropic.
    Anthropic,
    /// Google Gemini (Generative Language API).
    Gemini,
    /// GitHub REST API.
    GitHub,
    /// Stripe.
    Stripe,
    /// Any bearer/header API: `base_url`, `auth` and a credential are required.
    Generic,
}

/// Every preset that can be enabled from the environment alone, in display order.
pub const ENV_PRESETS: [Preset; 5] = [
    Preset::OpenAi,
    Preset::Anthropic,
    Preset::Gemini,
    Preset::GitHub,
    Preset::Stripe,
];

impl Preset {
    /// Parses a preset name as written in `till.toml`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "openai" => Preset::OpenAi,
            "anthropic" => Preset::Anthropic,
            "gemini" => Preset::Gemini,
            "github" => Preset::GitHub,
            "stripe" => Preset::Stripe,
            "generic" => Preset::Generic,
            _ => return None,
        })
    }

    /// The preset's name (also the default upstream name).
    pub fn name(self) -> &'static str {
        match self {
            Preset::OpenAi => "openai",
            Preset::Anthropic => "anthropic",
            Preset::Gemini => "gemini",
            Preset::GitHub => "github",
            Preset::Stripe => "stripe",
            Preset::Generic => "generic",
        }
    }

    /// Default base URL.
    pub fn base_url(self) -> Option<&'static str> {
        match self {
            Preset::OpenAi => Some("https://api.openai.com"),
            Preset::Anthropic => Some("https://api.anthropic.com"),
            Preset::Gemini => Some("https://generativelanguage.googleapis.com"),
            Preset::GitHub => Some("https://api.github.com"),
            Preset::Stripe => Some("https://api.stripe.com"),
            Preset::Generic => None,
        }
    }

    /// Environment variable holding the real credential by default.
    pub fn credential_env(self) -> Option<&'static str> {
        match self {
            Preset::OpenAi => Some("OPENAI_API_KEY"),
            Preset::Anthropic => Some("ANTHROPIC_API_KEY"),
            Preset::Gemini => Some("GEMINI_API_KEY"),
            Preset::GitHub => Some("GITHUB_TOKEN"),
            Preset::Stripe => Some("STRIPE_API_KEY"),
            Preset::Generic => None,
        }
    }

    /// How the credential is injected by default.
    pub fn auth(self) -> Option<Auth> {
        let bearer = || Auth::Header {
            name: http::header::AUTHORIZATION,
            scheme: Some("Bearer".into()),
        };
        match self {
            Preset::OpenAi | Preset::GitHub | Preset::Stripe => Some(bearer()),
            Preset::Anthropic => Some(Auth::Header {
                name: HeaderName::from_static("x-api-key"),
                scheme: None,
            }),
            Preset::Gemini => Some(Auth::Header {
                name: HeaderName::from_static("x-goog-api-key"),
                scheme: None,
            }),
            Preset::Generic => None,
        }
    }

    /// Where the model comes from.
    pub fn model_source(self) -> ModelSource {
        match self {
            Preset::OpenAi | Preset::Anthropic => ModelSource::JsonBody,
            Preset::Gemini => ModelSource::GeminiPath,
            Preset::GitHub | Preset::Stripe | Preset::Generic => ModelSource::None,
        }
    }
}

/// The model named by a Gemini path (`/v1beta/models/gemini-pro:generateContent` →
/// `gemini-pro`; `/v1beta/tunedModels/x:generateContent` → `x`).
pub fn gemini_model(path: &str) -> Option<&str> {
    let mut segments = path.split('/');
    while let Some(s) = segments.next() {
        if s == "models" || s == "tunedModels" {
            let m = segments.next()?;
            let m = m.split(':').next().unwrap_or(m);
            return (!m.is_empty()).then_some(m);
        }
    }
    None
}

/// A body whose fields cannot be read the same way by every JSON parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmbiguousField(pub &'static str);

/// The top-level `model` string of a JSON body, if the body is a JSON object with one.
///
/// Refused as ambiguous (parsers disagree on which one wins; Go's `encoding/json` takes
/// the last case-insensitive match): a top-level key equal to `model` in any letter case
/// more than once (`model` + `MODEL`, or `model` twice), or any other top-level key twice.
/// A body that is not a JSON object, or whose `model` is not a string, has no model.
pub fn json_model(body: &[u8]) -> Result<Option<String>, AmbiguousField> {
    match serde_json::from_slice::<ModelProbe>(body) {
        Ok(ModelProbe::Model(m)) => Ok(m),
        Ok(ModelProbe::Ambiguous(field)) => Err(AmbiguousField(field)),
        Err(_) => Ok(None),
    }
}

enum ModelProbe {
    Model(Option<String>),
    Ambiguous(&'static str),
}

impl<'de> serde::Deserialize<'de> for ModelProbe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ModelProbeVisitor)
    }
}

struct ModelProbeVisitor;

impl<'de> serde::de::Visitor<'de> for ModelProbeVisitor {
    type Value = ModelProbe;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ModelProbe, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut model_keys = 0usize;
        let mut duplicate = false;
        let mut model = None;
        // Keys come unescaped (`"mod\u0065l"` is `model`).
        while let Some(key) = map.next_key::<String>()? {
            if key.to_lowercase() == "model" {
                model_keys += 1;
            }
            if key == "model" {
                let v = map.next_value::<serde_json::Value>()?;
                model = v.as_str().map(str::to_string);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            if !seen.insert(key) {
                duplicate = true;
            }
        }
        Ok(if model_keys > 1 {
            ModelProbe::Ambiguous("model")
        } else if duplicate {
            ModelProbe::Ambiguous("top-level")
        } else {
            ModelProbe::Model(model)
        })
    }
}

/// Where a preset's requests state their output-token ceiling, as JSON pointers; a request
/// may set several (the largest counts). `None`: the upstream has no such field (a key with
/// a `max_output_tokens` caveat refuses every request there).
pub fn output_token_pointers(preset: Preset) -> Option<&'static [&'static [&'static str]]> {
    match preset {
        // OpenAI-compatible: Chat Completions (`max_tokens`, `max_completion_tokens`) and
        // Responses (`max_output_tokens`). Generic upstreams are read the same way.
        Preset::OpenAi | Preset::Generic => Some(&[
            &["max_tokens"],
            &["max_completion_tokens"],
            &["max_output_tokens"],
        ]),
        Preset::Anthropic => Some(&[&["max_tokens"]]),
        // Protobuf JSON accepts the lowerCamel and the original snake_case name of every
        // field, so all four spellings reach the same field.
        Preset::Gemini => Some(&[
            &["generationConfig", "maxOutputTokens"],
            &["generationConfig", "max_output_tokens"],
            &["generation_config", "maxOutputTokens"],
            &["generation_config", "max_output_tokens"],
        ]),
        Preset::GitHub | Preset::Stripe => None,
    }
}

/// Body fields that multiply the output of one call: several choices or candidates, each up
/// to the output-token limit (OpenAI `n`, legacy `best_of`; Gemini `candidateCount`). The
/// output-token fact is the limit times the largest of them (at least 1).
pub fn output_multiplier_pointers(preset: Preset) -> &'static [&'static [&'static str]] {
    match preset {
        Preset::OpenAi | Preset::Generic => &[&["n"], &["best_of"]],
        Preset::Gemini => &[
            &["generationConfig", "candidateCount"],
            &["generationConfig", "candidate_count"],
            &["generation_config", "candidateCount"],
            &["generation_config", "candidate_count"],
        ],
        Preset::Anthropic | Preset::GitHub | Preset::Stripe => &[],
    }
}

/// Why the per-call facts of a body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFactError {
    /// A member a caveat reads appears more than once (exactly, or in another letter case
    /// beside it), so parsers may disagree on its value.
    Ambiguous(&'static str),
    /// A member a caveat reads has a value of the wrong kind (e.g. `"max_tokens": 1.5`).
    Invalid(&'static str),
}

/// What the key's per-call caveats need to read (from its effective scope).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallNeeds {
    /// `max_output_tokens` is present.
    pub output_tokens: bool,
    /// `amount_max` or `currencies` is present (form body).
    pub form: bool,
    /// `repos` is present.
    pub repo: bool,
    /// JSON pointers named by `json_max` / `json_allow`.
    pub pointers: Vec<String>,
}

impl CallNeeds {
    /// From the key's effective scope.
    pub fn of(scope: &till_token::EffectiveScope) -> Self {
        let mut pointers: Vec<String> = scope
            .json_max
            .iter()
            .flat_map(|m| m.keys().cloned())
            .chain(scope.json_allow.iter().flat_map(|m| m.keys().cloned()))
            .collect();
        pointers.sort();
        pointers.dedup();
        CallNeeds {
            output_tokens: scope.max_output_tokens.is_some(),
            form: scope.amount_max.is_some() || scope.currencies.is_some(),
            repo: scope.repos.is_some(),
            pointers,
        }
    }

    /// True when a JSON body must be parsed for this preset.
    pub fn json_body(&self, preset: Preset) -> bool {
        (self.output_tokens && output_token_pointers(preset).is_some()) || !self.pointers.is_empty()
    }
}

/// Reads the per-call facts of one request: the repository from the path, the output-token
/// ceiling and JSON members from a JSON body (duplicate members refused at every depth),
/// `amount` and `currency` from a form body (and refuses them in the query string).
pub fn call_facts(
    preset: Preset,
    needs: &CallNeeds,
    path: &str,
    query: Option<&str>,
    form: bool,
    body: &[u8],
) -> Result<till_token::CallFacts, BodyFactError> {
    let mut facts = till_token::CallFacts::default();
    if needs.repo {
        facts.repo = github_repo(path);
    }
    if needs.json_body(preset) {
        if let Some(doc) = strict_json(body)? {
            if needs.output_tokens {
                let mut limit: Option<u64> = None;
                for pointer in output_token_pointers(preset).unwrap_or_default() {
                    if let Some(n) = read_count(&doc, pointer, "output-token limit")? {
                        limit = Some(limit.map_or(n, |m| m.max(n)));
                    }
                }
                let mut times = 1u64;
                for pointer in output_multiplier_pointers(preset) {
                    if let Some(n) = read_count(&doc, pointer, "choice count (n)")? {
                        times = times.max(n);
                    }
                }
                facts.max_output_tokens = limit.map(|l| l.saturating_mul(times));
            }
            for pointer in &needs.pointers {
                let tokens = pointer.split('/').skip(1);
                let fact = match lookup(&doc, tokens, "JSON caveat member")? {
                    Some(serde_json::Value::String(s)) => {
                        Some(till_token::JsonFact::Str(s.clone()))
                    }
                    Some(serde_json::Value::Number(n)) => n.as_i64().map(till_token::JsonFact::Int),
                    _ => None,
                };
                if let Some(fact) = fact {
                    facts.json.insert(pointer.clone(), fact);
                }
            }
        }
    }
    if needs.form {
        let in_query = query
            .into_iter()
            .flat_map(hygiene::query_pairs)
            .any(|(k, _)| is_form_fact_key(&k));
        if in_query {
            return Err(BodyFactError::Ambiguous(
                "amount/currency (also in the query string)",
            ));
        }
        if form {
            let text =
                std::str::from_utf8(body).map_err(|_| BodyFactError::Invalid("form body"))?;
            let mut amount = None;
            let mut currency = None;
            for (k, v) in hygiene::query_pairs(text) {
                if !is_form_fact_key(&k) {
                    continue;
                }
                let slot = if k == "amount" {
                    &mut amount
                } else if k == "currency" {
                    &mut currency
                } else {
                    // `Amount`, ` amount`: a case or spacing variant beside the real one.
                    return Err(BodyFactError::Ambiguous("amount/currency"));
                };
                if slot.replace(v).is_some() {
                    return Err(BodyFactError::Ambiguous("amount/currency"));
                }
            }
            if let Some(a) = amount {
                if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(BodyFactError::Invalid("amount"));
                }
                facts.amount = Some(a.parse().map_err(|_| BodyFactError::Invalid("amount"))?);
            }
            facts.currency = currency.map(|c| c.to_ascii_lowercase());
        }
    }
    Ok(facts)
}

/// A non-negative integer member (`null` or absent: `None`); any other value is invalid.
fn read_count(
    doc: &serde_json::Value,
    pointer: &[&str],
    what: &'static str,
) -> Result<Option<u64>, BodyFactError> {
    match lookup(doc, pointer.iter().copied(), what)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(BodyFactError::Invalid(what)),
    }
}

/// The repository of a GitHub path `/repos/{owner}/{name}[/...]`, lower-cased (GitHub
/// names are case-insensitive).
pub fn github_repo(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/repos/")?;
    let mut segs = rest.split('/');
    let owner = segs.next().filter(|s| !s.is_empty())?;
    let name = segs.next().filter(|s| !s.is_empty())?;
    Some(format!("{owner}/{name}").to_ascii_lowercase())
}

fn is_form_fact_key(k: &str) -> bool {
    let k = k.trim().to_ascii_lowercase();
    k == "amount" || k == "currency"
}

/// Follows `tokens` from `doc`. At every object on the way, a member whose name equals the
/// token in another letter case is ambiguous (Go's `encoding/json` matches names
/// case-insensitively). Arrays take decimal indices.
fn lookup<'a, 'b>(
    doc: &'a serde_json::Value,
    tokens: impl Iterator<Item = &'b str>,
    what: &'static str,
) -> Result<Option<&'a serde_json::Value>, BodyFactError> {
    let mut cur = doc;
    for tok in tokens {
        cur = match cur {
            serde_json::Value::Object(map) => {
                let variants = map.keys().filter(|k| k.eq_ignore_ascii_case(tok)).count();
                if variants > 1 {
                    return Err(BodyFactError::Ambiguous(what));
                }
                match map.get(tok) {
                    Some(v) => v,
                    None => return Ok(None),
                }
            }
            serde_json::Value::Array(items) => {
                match tok.parse::<usize>().ok().and_then(|i| items.get(i)) {
                    Some(v) if tok == "0" || !tok.starts_with('0') => v,
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
    }
    Ok(Some(cur))
}

const DUPLICATE: &str = "till: duplicate member";

/// Parses a JSON body, refusing a member name repeated in any object at any depth
/// (parsers disagree on which one wins). `Ok(None)`: not JSON.
pub fn strict_json(body: &[u8]) -> Result<Option<serde_json::Value>, BodyFactError> {
    match serde_json::from_slice::<StrictValue>(body) {
        Ok(v) => Ok(Some(v.0)),
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            Err(BodyFactError::Ambiguous("JSON member"))
        }
        Err(_) => Ok(None),
    }
}

struct StrictValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.insert(key, v).is_some() {
                return Err(serde::de::Error::custom(DUPLICATE));
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// True when the request's one `Content-Type` is JSON: `application/json` or
/// `application/<anything>+json`, parameters allowed. Upstreams that parse forms or
/// anything else could read another model than Till did.
pub fn is_json_content_type(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(v) = v.to_str() else {
        return false;
    };
    let media = v
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "application/json"
        || media
            .strip_prefix("application/")
            .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10 item 2: duplicate and case-variant `model` keys are refused, not guessed.
    #[test]
    fn case_variant_and_duplicate_model_keys_are_ambiguous() {
        let amb = Err(AmbiguousField("model"));
        assert_eq!(
            json_model(br#"{"model":"gpt-4o-mini","model":"gpt-4"}"#),
            amb
        );
        assert_eq!(
            json_model(br#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#),
            amb
        );
        assert_eq!(json_model(br#"{"Model":"a","mOdEl":"b"}"#), amb);
        assert_eq!(json_model(br#"{"model":"a","mod\u0065l":"b"}"#), amb);
        assert_eq!(json_model(br#"{"model":"a","MODEL":{"x":1}}"#), amb);
        assert_eq!(
            json_model(br#"{"model":"a","n":1,"n":2}"#),
            Err(AmbiguousField("top-level"))
        );
        // Nested objects are not read by any caveat.
        assert_eq!(
            json_model(br#"{"model":"a","m":{"model":"b","MODEL":"c"}}"#),
            Ok(Some("a".into()))
        );
        assert_eq!(json_model(br#"{"model":5}"#), Ok(None));
        assert_eq!(json_model(br#"{"MODEL":"x"}"#), Ok(None));
        assert_eq!(json_model(b"not json"), Ok(None));
        assert_eq!(
            json_model(br#"{"model":"a","messages":[]}"#),
            Ok(Some("a".into()))
        );
    }

    /// Issue 10 item 3.
    #[test]
    fn only_json_content_types_count_as_json() {
        let h = |vals: &[&str]| {
            let mut m = http::HeaderMap::new();
            for v in vals {
                m.append(http::header::CONTENT_TYPE, v.parse().unwrap());
            }
            is_json_content_type(&m)
        };
        assert!(h(&["application/json"]));
        assert!(h(&["Application/JSON; charset=utf-8"]));
        assert!(h(&["application/merge-patch+json"]));
        assert!(!h(&["application/x-www-form-urlencoded"]));
        assert!(!h(&["text/plain"]));
        assert!(!h(&["multipart/form-data; boundary=x"]));
        assert!(!h(&["application/+json"]));
        assert!(!h(&[]));
        assert!(!h(&["application/json", "application/json"]));
    }

    #[test]
    fn gemini_model_comes_from_the_path() {
        assert_eq!(
            gemini_model("/v1beta/models/gemini-1.5-pro:generateContent"),
            Some("gemini-1.5-pro")
        );
        assert_eq!(
            gemini_model("/v1/models/gemini-pro:streamGenerateContent"),
            Some("gemini-pro")
        );
        assert_eq!(
            gemini_model("/v1beta/models/gemini-pro"),
            Some("gemini-pro")
        );
        assert_eq!(gemini_model("/v1beta/models"), None);
        assert_eq!(gemini_model("/v1beta/files/x"), None);
    }

    #[test]
    fn json_model_reads_only_a_top_level_string() {
        assert_eq!(
            json_model(br#"{"model":"gpt-4o","messages":[]}"#),
            Ok(Some("gpt-4o".into()))
        );
        assert_eq!(json_model(br#"{"messages":[{"model":"x"}]}"#), Ok(None));
        assert_eq!(json_model(br#"{"model":7}"#), Ok(None));
        assert_eq!(json_model(b"not json"), Ok(None));
        assert_eq!(json_model(b""), Ok(None));
    }

    #[test]
    fn every_env_preset_has_defaults() {
        for p in ENV_PRESETS {
            assert!(p.base_url().is_some() && p.credential_env().is_some() && p.auth().is_some());
            assert_eq!(Preset::from_name(p.name()), Some(p));
        }
    }
}
