//! Mint and attenuate forms, and the one page that shows a full key: the result.

use maud::{html, Markup};
use serde::Deserialize;
use till_token::{Inspection, SignatureStatus};

use super::family::caveats;
use super::layout::{csrf_field, notice, page, short_id, time, Nav};
use super::Viewer;
use crate::api::{to_meta, AttenuateRequest, CaveatFields, MintRequest};
use crate::error::AdminError;

/// The mint form's fields (lists are comma- or space-separated).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MintForm {
    /// CSRF token.
    pub csrf: Option<String>,
    /// Upstream.
    #[serde(default)]
    pub upstream: String,
    /// Cap.
    #[serde(default)]
    pub cap: String,
    /// Methods.
    #[serde(default)]
    pub methods: String,
    /// Path prefixes.
    #[serde(default)]
    pub paths: String,
    /// Models.
    #[serde(default)]
    pub models: String,
    /// Lifetime (`24h`).
    #[serde(default)]
    pub ttl: String,
    /// Label.
    #[serde(default)]
    pub label: String,
}

/// The attenuate form's fields.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AttenuateForm {
    /// CSRF token.
    pub csrf: Option<String>,
    /// The key to narrow.
    #[serde(default)]
    pub key: String,
    /// Cap.
    #[serde(default)]
    pub cap: String,
    /// Methods.
    #[serde(default)]
    pub methods: String,
    /// Path prefixes.
    #[serde(default)]
    pub paths: String,
    /// Models.
    #[serde(default)]
    pub models: String,
    /// Lifetime.
    #[serde(default)]
    pub ttl: String,
}

fn text(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn list(s: &str) -> Option<Vec<String>> {
    let v: Vec<String> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    (!v.is_empty()).then_some(v)
}

fn cap(s: &str) -> Result<Option<u64>, AdminError> {
    match text(s) {
        None => Ok(None),
        Some(c) => c
            .parse::<u64>()
            .map(Some)
            .map_err(|_| AdminError::BadRequest(format!("cap `{c}` is not a whole number"))),
    }
}

impl MintForm {
    /// The API request it stands for.
    pub fn request(&self) -> Result<MintRequest, AdminError> {
        Ok(MintRequest {
            caveats: CaveatFields {
                upstream: text(&self.upstream),
                cap: cap(&self.cap)?,
                methods: list(&self.methods.to_ascii_uppercase()),
                paths: list(&self.paths),
                models: list(&self.models),
                ttl: text(&self.ttl),
                expires: None,
                ..CaveatFields::default()
            },
            label: text(&self.label),
        })
    }
}

impl AttenuateForm {
    /// The API request it stands for.
    pub fn request(&self) -> Result<AttenuateRequest, AdminError> {
        Ok(AttenuateRequest {
            key: self.key.trim().to_string(),
            caveats: CaveatFields {
                upstream: None,
                cap: cap(&self.cap)?,
                methods: list(&self.methods.to_ascii_uppercase()),
                paths: list(&self.paths),
                models: list(&self.models),
                ttl: text(&self.ttl),
                expires: None,
                ..CaveatFields::default()
            },
        })
    }
}

fn field(name: &str, label: &str, value: &str, hint: &str, kind: &str) -> Markup {
    let id = format!("f-{name}");
    let hint_id = format!("{id}-hint");
    html! {
        div.field {
            label for=(id) { (label) }
            input id=(id) name=(name) type=(kind) value=(value) aria-describedby=(hint_id) autocomplete="off";
            small id=(hint_id) { (hint) }
        }
    }
}

/// The mint and attenuate forms. `upstreams`: configured names, for suggestions.
pub fn render_forms(
    viewer: &Viewer,
    mint: &MintForm,
    attenuate: &AttenuateForm,
    error: Option<(&str, &str)>,
) -> Markup {
    let body = html! {
        h1 { "Mint & attenuate" }
        @if !viewer.can_mint && !viewer.can_write {
            (notice("info", "This admin key is read-only: it cannot mint or attenuate."))
        }
        section aria-labelledby="mint-h" {
            h2 #mint-h { "Mint a key" }
            @if let Some(("mint", e)) = error { (notice("error", e)) }
            @if viewer.can_mint {
                form.keyform method="post" action="/keys/mint" {
                    (csrf_field(viewer))
                    (field("upstream", "Upstream (required)", &mint.upstream, "a configured upstream, e.g. openai", "text"))
                    (field("cap", "Activation cap", &mint.cap, "at most this many calls; empty: uncapped", "number"))
                    (field("methods", "Methods", &mint.methods, "e.g. POST, GET; empty: any", "text"))
                    (field("paths", "Path prefixes", &mint.paths, "e.g. /v1/chat; empty: any", "text"))
                    (field("models", "Models", &mint.models, "e.g. gpt-4o-mini; empty: any", "text"))
                    (field("ttl", "Lifetime", &mint.ttl, "e.g. 90m, 24h, 7d; empty: no expiry", "text"))
                    (field("label", "Label", &mint.label, "shown on the overview, e.g. the agent's name", "text"))
                    button type="submit" { "Mint key" }
                }
            } @else {
                p.muted { "Minting needs an admin key that may POST /admin/v1/keys, on a server holding the root key." }
            }
        }
        section aria-labelledby="att-h" {
            h2 #att-h { "Attenuate a key" }
            p.muted { "Paste a key to get a narrower one (smaller cap, fewer methods, paths or models, shorter life). The result can do no more than the key you paste." }
            @if let Some(("attenuate", e)) = error { (notice("error", e)) }
            @if viewer.can_write {
                form.keyform method="post" action="/keys/attenuate" {
                    (csrf_field(viewer))
                    div.field {
                        label for="f-key" { "Key to narrow" }
                        textarea id="f-key" name="key" rows="3" autocomplete="off" spellcheck="false" required {}
                    }
                    (field("cap", "Activation cap", &attenuate.cap, "lower than the key's own", "number"))
                    (field("methods", "Methods", &attenuate.methods, "e.g. POST", "text"))
                    (field("paths", "Path prefixes", &attenuate.paths, "e.g. /v1/chat/completions", "text"))
                    (field("models", "Models", &attenuate.models, "e.g. gpt-4o-mini", "text"))
                    (field("ttl", "Lifetime", &attenuate.ttl, "e.g. 1h", "text"))
                    button type="submit" { "Attenuate" }
                }
            }
        }
    };
    page("Mint & attenuate", Nav::Keys, Some(viewer), body)
}

/// The inspect view of a key (what `till inspect` shows).
pub fn inspection(report: &Inspection, now: u64) -> Markup {
    let e = &report.effective;
    html! {
        section aria-labelledby="inspect-h" {
            h2 #inspect-h { "Inspect" }
            p {
                "Signature: "
                @match &report.signature {
                    SignatureStatus::Verified => span.badge.active { "verified" },
                    SignatureStatus::Invalid { message, .. } => span.badge.revoked { "invalid: " (message) },
                    SignatureStatus::Unchecked => span.badge { "unchecked" },
                }
            }
            ol.blocks start="0" {
                @for b in &report.blocks {
                    li {
                        strong { @if b.index == 0 { "Root key" } @else { "Block " (b.index) } }
                        " " (short_id(&hex::encode(&b.revocation_id)))
                        @if let Some(l) = &b.caveats.label { " — label " q { (l) } }
                        (caveats(&to_meta(&b.caveats), now))
                    }
                }
            }
            h3 { "Effective scope" }
            dl.caveats {
                dt { "upstream" } dd { (e.upstream.as_deref().unwrap_or("—")) }
                dt { "methods" } dd { (e.methods.as_ref().map_or("any".to_string(), |m| m.join(", "))) }
                dt { "paths" } dd { (e.paths.as_ref().map_or("any".to_string(), |m| m.join(", "))) }
                dt { "models" } dd { (e.models.as_ref().map_or("any".to_string(), |m| m.join(", "))) }
                dt { "cap" } dd { (e.cap.map_or("uncapped".to_string(), |c| c.to_string())) }
                dt { "expires" } dd { @match e.expires.and_then(|x| u64::try_from(x).ok()) { Some(x) => (time(x)), None => "never" } }
            }
        }
    }
}

/// The result page: the key, once.
pub fn render_minted(
    viewer: &Viewer,
    key: &str,
    family: &str,
    warnings: &[String],
    report: &Inspection,
    now: u64,
) -> Markup {
    let body = html! {
        h1 { "Your new key" }
        (notice("info", "This is the only time this key is shown. Copy it now; Till keeps no copy (revoke it from its family page if it leaks)."))
        @for w in warnings { (notice("warn", w)) }
        div.secret {
            label for="minted-key" { "Key" }
            textarea #minted-key readonly rows="4" spellcheck="false" autocomplete="off" { (key) }
            button type="button" #copy-key data-copy="minted-key" { "Copy" }
            span #copy-status role="status" aria-live="polite" {}
        }
        p { a href=(format!("/families/{family}")) { "Open its family" } " · " a href="/keys" { "Mint another" } }
        (inspection(report, now))
    };
    page("New key", Nav::Keys, Some(viewer), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_become_api_requests() {
        let f = MintForm {
            upstream: " openai ".into(),
            cap: "5".into(),
            methods: "post, get".into(),
            paths: "/v1/chat /v1/embeddings".into(),
            ttl: "24h".into(),
            ..MintForm::default()
        };
        let r = f.request().unwrap();
        assert_eq!(r.caveats.upstream.as_deref(), Some("openai"));
        assert_eq!(r.caveats.cap, Some(5));
        assert_eq!(
            r.caveats.methods,
            Some(vec!["POST".to_string(), "GET".to_string()])
        );
        assert_eq!(r.caveats.paths.as_ref().map(Vec::len), Some(2));
        assert_eq!(r.caveats.models, None);
        assert_eq!(r.label, None);
        let bad = MintForm {
            cap: "lots".into(),
            ..MintForm::default()
        };
        assert!(matches!(bad.request(), Err(AdminError::BadRequest(_))));
    }
}
