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

/// The top-level `model` string of a JSON body, if the body is a JSON object with one.
pub fn json_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(body)
        .ok()
        .and_then(|m| m.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_or_odd_model_bodies_yield_no_model() {
        // Duplicate keys: parsers disagree on which wins, so Till sees no model and a
        // model-limited key refuses (`model_required`) instead of guessing.
        assert_eq!(
            json_model(br#"{"model":"gpt-4o-mini","model":"gpt-4"}"#),
            None
        );
        assert_eq!(json_model(br#"{"model":5}"#), None);
        assert_eq!(json_model(b"not json"), None);
        assert_eq!(
            json_model(br#"{"model":"a","messages":[]}"#).as_deref(),
            Some("a")
        );
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
            json_model(br#"{"model":"gpt-4o","messages":[]}"#).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(json_model(br#"{"messages":[{"model":"x"}]}"#), None);
        assert_eq!(json_model(br#"{"model":7}"#), None);
        assert_eq!(json_model(b"not json"), None);
        assert_eq!(json_model(b""), None);
    }

    #[test]
    fn every_env_preset_has_defaults() {
        for p in ENV_PRESETS {
            assert!(p.base_url().is_some() && p.credential_env().is_some() && p.auth().is_some());
            assert_eq!(Preset::from_name(p.name()), Some(p));
        }
    }
}
