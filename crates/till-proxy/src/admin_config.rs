//! `[admin]` and `[alerts]` of `till.toml`: where the admin plane listens and which usage
//! alerts fire and where they are delivered. Normative: `spec/config.md`, `spec/admin.md`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use till_ledger::AlertPolicy;

use crate::config::{Env, DEFAULT_ADMIN_LISTEN, ENV_ADMIN_LISTEN, ENV_ALERT_WEBHOOK_SECRET};
use crate::error::ConfigError;
use crate::secret::Secret;

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port`, or `none` to disable the admin plane.
    pub listen: Option<String>,
}

/// `[alerts]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Percentages of each capped block's cap (default `[80, 100]`; `[]` for none).
    pub thresholds: Option<Vec<u8>>,
    /// A family's activations per clock minute above this fire a rate alert.
    pub rate_per_minute: Option<u64>,
    /// Revocations fire an alert (default true).
    pub revocations: Option<bool>,
    /// Webhook receiver (`http://` or `https://`). Absent: alerts are recorded and logged.
    pub webhook_url: Option<String>,
    /// Environment variable holding the Standard Webhooks secret (`whsec_...`).
    pub webhook_secret_env: Option<String>,
    /// File holding the secret.
    pub webhook_secret_file: Option<PathBuf>,
}

/// The validated admin-plane settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where the admin plane listens; `None`: disabled.
    pub listen: Option<SocketAddr>,
}

/// Where alerts are delivered.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Receiver URL.
    pub url: String,
    /// The HMAC key (decoded from `whsec_<base64>`), never logged.
    pub secret: Secret,
}

/// The validated alert settings.
#[derive(Debug, Clone, Default)]
pub struct AlertSettings {
    /// What the ledger decides.
    pub policy: AlertPolicy,
    /// Where deliveries go; `None`: recorded and logged only.
    pub webhook: Option<Webhook>,
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Flag > `TILL_ADMIN_LISTEN` > file > `127.0.0.1:8081`; `none` disables.
pub fn validate_admin(
    raw: RawAdmin,
    flag: Option<String>,
    env: &dyn Env,
) -> Result<AdminSettings, ConfigError> {
    let text = flag
        .or_else(|| env.var(ENV_ADMIN_LISTEN))
        .or(raw.listen)
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    if text == "none" {
        return Ok(AdminSettings { listen: None });
    }
    let addr = text.parse::<SocketAddr>().map_err(|_| {
        invalid(
            "admin.listen",
            format!("`{text}` is not an address like 127.0.0.1:8081 (or `none`)"),
        )
    })?;
    Ok(AdminSettings { listen: Some(addr) })
}

/// Validates `[alerts]`; the secret comes from `webhook_secret_env`, else
/// `webhook_secret_file`, else `TILL_ALERT_WEBHOOK_SECRET`.
pub fn validate_alerts(raw: RawAlerts, env: &dyn Env) -> Result<AlertSettings, ConfigError> {
    let policy = AlertPolicy {
        thresholds: raw.thresholds.unwrap_or_else(|| vec![80, 100]),
        rate_per_minute: raw.rate_per_minute,
        revocations: raw.revocations.unwrap_or(true),
    }
    .normalized()
    .map_err(|e| invalid("alerts", e))?;
    let webhook = match raw.webhook_url {
        None => {
            if raw.webhook_secret_env.is_some() || raw.webhook_secret_file.is_some() {
                return Err(invalid(
                    "alerts.webhook_url",
                    "a webhook secret is set but no webhook_url",
                ));
            }
            None
        }
        Some(url) => {
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| invalid("alerts.webhook_url", format!("`{url}`: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(invalid(
                    "alerts.webhook_url",
                    format!("`{url}` must be an http:// or https:// URL"),
                ));
            }
            let text = if let Some(var) = &raw.webhook_secret_env {
                env.var(var).ok_or_else(|| {
                    invalid(
                        "alerts.webhook_secret_env",
                        format!("environment variable {var} is not set"),
                    )
                })?
            } else if let Some(path) = &raw.webhook_secret_file {
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        invalid(
                            "alerts.webhook_secret_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?
                    .trim()
                    .to_string()
            } else {
                env.var(ENV_ALERT_WEBHOOK_SECRET).ok_or_else(|| {
                    invalid(
                        "alerts.webhook_url",
                        format!(
                            "a webhook needs a signing secret: set webhook_secret_env, \
                             webhook_secret_file or {ENV_ALERT_WEBHOOK_SECRET}"
                        ),
                    )
                })?
            };
            let secret =
                decode_webhook_secret(&text).map_err(|e| invalid("alerts.webhook_secret", e))?;
            Some(Webhook { url, secret })
        }
    };
    Ok(AlertSettings { policy, webhook })
}

/// `whsec_<base64>` (Standard Webhooks), at least 24 bytes of key.
pub fn decode_webhook_secret(text: &str) -> Result<Secret, String> {
    use base64::Engine as _;
    let b64 = text
        .strip_prefix("whsec_")
        .ok_or("the webhook secret must look like whsec_<base64> (Standard Webhooks)")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the webhook secret after whsec_ is not valid base64".to_string())?;
    if bytes.len() < 24 {
        return Err("the webhook secret must carry at least 24 bytes of key".into());
    }
    // The key is held as the base64 text inside a `Secret`; callers decode it to sign.
    Ok(Secret::new(b64.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct E(HashMap<&'static str, &'static str>);
    impl Env for E {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    #[test]
    fn admin_listen_precedence_and_none() {
        let e = E(HashMap::from([(ENV_ADMIN_LISTEN, "127.0.0.1:9001")]));
        let raw = || RawAdmin {
            listen: Some("127.0.0.1:9002".into()),
        };
        assert_eq!(
            validate_admin(raw(), Some("none".into()), &e)
                .unwrap()
                .listen,
            None
        );
        assert_eq!(
            validate_admin(raw(), None, &e).unwrap().listen,
            Some("127.0.0.1:9001".parse().unwrap())
        );
        let none = E(HashMap::new());
        assert_eq!(
            validate_admin(RawAdmin::default(), None, &none)
                .unwrap()
                .listen,
            Some(DEFAULT_ADMIN_LISTEN.parse().unwrap())
        );
        assert!(validate_admin(RawAdmin::default(), Some("nowhere".into()), &none).is_err());
    }

    #[test]
    fn alerts_validate_and_never_show_the_secret() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let e = E(HashMap::from([("HOOK", secret)]));
        let s = validate_alerts(
            RawAlerts {
                thresholds: Some(vec![100, 50, 50]),
                rate_per_minute: Some(10),
                webhook_url: Some("http://127.0.0.1:9/hook".into()),
                webhook_secret_env: Some("HOOK".into()),
                ..RawAlerts::default()
            },
            &e,
        )
        .unwrap();
        assert_eq!(s.policy.thresholds, vec![50, 100]);
        assert_eq!(s.policy.rate_per_minute, Some(10));
        assert!(!format!("{s:?}").contains("MfKQ9r8"));
        for bad in [
            RawAlerts {
                thresholds: Some(vec![0]),
                ..RawAlerts::default()
            },
            RawAlerts {
                webhook_url: Some("ftp://x/".into()),
                webhook_secret_env: Some("HOOK".into()),
                ..RawAlerts::default()
            },
            RawAlerts {
                webhook_url: Some("http://127.0.0.1:9/".into()),
                ..RawAlerts::default()
            },
            RawAlerts {
                webhook_secret_env: Some("HOOK".into()),
                ..RawAlerts::default()
            },
        ] {
            assert!(validate_alerts(bad, &e).is_err());
        }
        assert!(decode_webhook_secret("whsec_c2hvcnQ=").is_err());
        assert!(decode_webhook_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
    }
}
