//! Upstream presets: where each API lives, how its SDK sends the API key, and where the
//! model of a request is found.

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
