//! `[retention]` of `till.toml`: automatic export and prune of old receipts while `till
//! serve` runs (a bounded ledger). Normative: `spec/config.md`, `spec/ledger.md` §10.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use till_ledger::retention::Retention;

use crate::config::Env;
use crate::error::ConfigError;

/// Env: `retention.keep`.
pub const ENV_RETENTION_KEEP: &str = "TILL_RETENTION_KEEP";
/// Env: `retention.max_age`.
pub const ENV_RETENTION_MAX_AGE: &str = "TILL_RETENTION_MAX_AGE";
/// Env: `retention.export_dir`.
pub const ENV_RETENTION_EXPORT_DIR: &str = "TILL_RETENTION_EXPORT_DIR";
/// Env: `retention.interval`.
pub const ENV_RETENTION_INTERVAL: &str = "TILL_RETENTION_INTERVAL";
/// Default time between two export-and-prune runs.
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Shortest accepted interval (a run reads every chain head).
pub const MIN_RETENTION_INTERVAL: Duration = Duration::from_secs(1);

/// `[retention]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    /// Receipts kept per family (at least 1).
    pub keep: Option<u64>,
    /// Receipts younger than this are kept (humantime, e.g. `"30d"`).
    pub max_age: Option<String>,
    /// Where exported receipts and checkpoints go (default: the data dir's `receipts/`;
    /// relative to the config file's directory).
    pub export_dir: Option<PathBuf>,
    /// Time between runs (humantime; default `"10m"`).
    pub interval: Option<String>,
}

/// The validated retention settings: present only when a retention is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// What stays in the ledger.
    pub retention: Retention,
    /// Export directory; `None`: the data dir's `receipts/` (what `till audit` reads by
    /// default).
    pub export_dir: Option<PathBuf>,
    /// Time between runs.
    pub interval: Duration,
    /// `export_dir` came from the config file as a relative path (resolved by `load`).
    pub(crate) export_dir_relative_to_file: bool,
}

impl RetentionSettings {
    /// Resolves a relative `export_dir` from the config file against its directory.
    pub(crate) fn resolve(&mut self, base: &Path) {
        if self.export_dir_relative_to_file {
            if let Some(dir) = &self.export_dir {
                self.export_dir = Some(base.join(dir));
            }
            self.export_dir_relative_to_file = false;
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn duration(key: &str, var: &str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim()).map_err(|_| {
        invalid(
            key,
            format!("`{text}` is not a duration like \"30d\", \"12h\" or \"10m\" (from {var} or till.toml)"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

/// `[retention]` with `TILL_RETENTION_*` on top. `None` when neither `keep` nor
/// `max_age` is set anywhere (no table, or only env keys that do not bound anything is
/// refused: a retention that never prunes is a mistake, not a choice).
pub fn validate_retention(
    raw: Option<RawRetention>,
    env: &dyn Env,
) -> Result<Option<RetentionSettings>, ConfigError> {
    let table = raw.is_some();
    let raw = raw.unwrap_or_default();
    let keep = match env.var(ENV_RETENTION_KEEP) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            invalid(
                "retention.keep",
                format!("${ENV_RETENTION_KEEP}=`{v}` is not a number"),
            )
        })?),
        None => raw.keep,
    };
    if keep == Some(0) {
        return Err(invalid(
            "retention.keep",
            "must be at least 1 (a family's newest receipt always stays)",
        ));
    }
    let max_age = match env.var(ENV_RETENTION_MAX_AGE).or(raw.max_age) {
        Some(text) => Some(duration("retention.max_age", ENV_RETENTION_MAX_AGE, &text)?),
        None => None,
    };
    let interval_text = env.var(ENV_RETENTION_INTERVAL).or(raw.interval);
    let (export_dir, relative) = match env.var(ENV_RETENTION_EXPORT_DIR) {
        Some(d) => (Some(PathBuf::from(d)), false),
        None => {
            let relative = raw.export_dir.as_ref().is_some_and(|d| d.is_relative());
            (raw.export_dir, relative)
        }
    };
    if export_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err(invalid("retention.export_dir", "must not be empty"));
    }
    if keep.is_none() && max_age.is_none() {
        if table || interval_text.is_some() || export_dir.is_some() {
            return Err(invalid(
                "retention",
                "set `keep` and/or `max_age` (or TILL_RETENTION_KEEP / TILL_RETENTION_MAX_AGE): \
                 without them nothing would ever be pruned",
            ));
        }
        return Ok(None);
    }
    let interval = match interval_text {
        Some(text) => duration("retention.interval", ENV_RETENTION_INTERVAL, &text)?,
        None => DEFAULT_RETENTION_INTERVAL,
    };
    if interval < MIN_RETENTION_INTERVAL {
        return Err(invalid(
            "retention.interval",
            format!(
                "must be at least {}",
                humantime::format_duration(MIN_RETENTION_INTERVAL)
            ),
        ));
    }
    Ok(Some(RetentionSettings {
        retention: Retention {
            keep,
            max_age_secs: max_age.map(|d| d.as_secs().max(1)),
        },
        export_dir,
        interval,
        export_dir_relative_to_file: relative,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn raw(toml: &str) -> Option<RawRetention> {
        Some(toml::from_str(toml).unwrap())
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn absent_means_no_retention() {
        assert_eq!(validate_retention(None, &env(&[])).unwrap(), None);
    }

    #[test]
    fn keys_defaults_and_env_override() {
        let s = validate_retention(raw("keep = 2\ninterval = \"1s\"\n"), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(s.retention.keep, Some(2));
        assert_eq!(s.retention.max_age_secs, None);
        assert_eq!(s.interval, Duration::from_secs(1));
        assert_eq!(s.export_dir, None);
        let s = validate_retention(
            raw("max_age = \"30d\"\nexport_dir = \"exports\"\n"),
            &env(&[(ENV_RETENTION_KEEP, "5")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.retention.keep, Some(5));
        assert_eq!(s.retention.max_age_secs, Some(30 * 86_400));
        assert_eq!(s.interval, DEFAULT_RETENTION_INTERVAL);
        assert!(s.export_dir_relative_to_file);
        // Env alone enables it.
        let s = validate_retention(None, &env(&[(ENV_RETENTION_MAX_AGE, "12h")]))
            .unwrap()
            .unwrap();
        assert_eq!(s.retention.max_age_secs, Some(12 * 3_600));
    }

    #[test]
    fn nonsense_is_refused_naming_the_key() {
        for (toml, vars, key) in [
            ("", vec![], "retention"),
            ("interval = \"1m\"\n", vec![], "retention"),
            ("keep = 0\n", vec![], "retention.keep"),
            (
                "keep = 1\nmax_age = \"soon\"\n",
                vec![],
                "retention.max_age",
            ),
            ("keep = 1\nmax_age = \"0s\"\n", vec![], "retention.max_age"),
            (
                "keep = 1\ninterval = \"0s\"\n",
                vec![],
                "retention.interval",
            ),
            (
                "keep = 1\ninterval = \"500ms\"\n",
                vec![],
                "retention.interval",
            ),
            (
                "keep = 1\nexport_dir = \"\"\n",
                vec![],
                "retention.export_dir",
            ),
            ("", vec![(ENV_RETENTION_KEEP, "two")], "retention.keep"),
        ] {
            let err = validate_retention(raw(toml), &env(&vars)).unwrap_err();
            match err {
                ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{toml}"),
                other => panic!("{toml}: {other}"),
            }
        }
        assert!(toml::from_str::<RawRetention>("keep = 1\nbogus = 2\n").is_err());
    }
}
