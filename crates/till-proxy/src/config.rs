//! Configuration: raw `till.toml` (serde, `deny_unknown_fields`) → [`Config::load`]
//! validates → typed [`Config`].
//!
//! Precedence: command-line flags ([`Overrides`]) > `TILL_*` environment > file > defaults.
//! The environment is read through [`Env`] so tests inject their own. Keys and defaults
//! are documented in `spec/config.md`; the constants below are the source of truth.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::admin_config::{
    validate_admin, validate_alerts, AdminSettings, AlertSettings, RawAdmin, RawAlerts,
};
use crate::error::ConfigError;
use crate::preset::{Auth, ModelSource, Preset, ENV_PRESETS};
use crate::retention_config::{validate_retention, RawRetention, RetentionSettings};
use crate::secret::{Credential, Secret};

/// `listen` from the environment.
pub const ENV_LISTEN: &str = "TILL_LISTEN";
/// `proxy_id` from the environment.
pub const ENV_PROXY_ID: &str = "TILL_PROXY_ID";
/// Config file path from the environment (the `--config` flag wins).
pub const ENV_CONFIG: &str = "TILL_CONFIG";
/// Env: which ledger (`embedded` or `fdb[:CLUSTER_FILE]`).
pub const ENV_LEDGER: &str = "TILL_LEDGER";
/// Env: the FoundationDB key space (`[ledger] keyspace`).
pub const ENV_FDB_KEYSPACE: &str = "TILL_FDB_KEYSPACE";
/// Default FoundationDB key space.
pub const DEFAULT_FDB_KEYSPACE: &str = "till";
/// `limits.max_body_bytes` from the environment.
pub const ENV_MAX_BODY_BYTES: &str = "TILL_MAX_BODY_BYTES";
/// `limits.max_inflight_body_bytes` from the environment.
pub const ENV_MAX_INFLIGHT_BODY_BYTES: &str = "TILL_MAX_INFLIGHT_BODY_BYTES";
/// `limits.max_header_bytes` from the environment.
pub const ENV_MAX_HEADER_BYTES: &str = "TILL_MAX_HEADER_BYTES";
/// `limits.header_read_timeout` from the environment.
pub const ENV_HEADER_READ_TIMEOUT: &str = "TILL_HEADER_READ_TIMEOUT";
/// `limits.idle_timeout` from the environment.
pub const ENV_IDLE_TIMEOUT: &str = "TILL_IDLE_TIMEOUT";
/// `limits.upstream_connect_timeout` from the environment.
pub const ENV_UPSTREAM_CONNECT_TIMEOUT: &str = "TILL_UPSTREAM_CONNECT_TIMEOUT";
/// `limits.upstream_response_timeout` from the environment.
pub const ENV_UPSTREAM_RESPONSE_TIMEOUT: &str = "TILL_UPSTREAM_RESPONSE_TIMEOUT";
/// `limits.ledger_claim_timeout` from the environment.
pub const ENV_LEDGER_CLAIM_TIMEOUT: &str = "TILL_LEDGER_CLAIM_TIMEOUT";

/// Default listen address (loopback: exposing the proxy is a deliberate choice).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default proxy id (goes into receipts).
pub const DEFAULT_PROXY_ID: &str = "till-1";
/// Default largest request body (bodies are buffered up to this before the claim).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Default budget for all request bodies being buffered at once, across connections;
/// beyond it a request gets `503 body_budget_exceeded` (nothing charged).
pub const DEFAULT_MAX_INFLIGHT_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Streams one HTTP/2 connection may have open at once.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 streams a client may reset before Till accepted them (rapid reset,
/// CVE-2023-44487); beyond it the connection gets `GOAWAY ENHANCE_YOUR_CALM`.
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2 streams Till may reset because of client errors before it closes the connection.
pub const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Default largest request head (request line + headers). A Till key may be 8 KiB
/// decoded (about 11 KiB in a header).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Smallest accepted `max_header_bytes` (hyper's read buffer cannot be smaller).
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Default time a client has to send a complete request head (also bounds idle
/// keep-alive connections: the timer runs while waiting for the next head).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest pause while reading a request body or writing a response to a client.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default upstream TCP + TLS connect timeout.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time to the upstream's response head, and longest pause between response
/// body chunks (LLM SDKs wait up to 10 minutes).
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default longest wait for the ledger's answer to a claim before 503.
pub const DEFAULT_LEDGER_CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Environment: the admin plane's listen address (`none` disables it).
pub const ENV_ADMIN_LISTEN: &str = "TILL_ADMIN_LISTEN";
/// Default admin listen address (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Environment: the alert webhook's Standard Webhooks secret, when `[alerts]` names no
/// other source.
pub const ENV_ALERT_WEBHOOK_SECRET: &str = "TILL_ALERT_WEBHOOK_SECRET";
/// Upstream name reserved for admin keys (`spec/admin.md`): never a proxied upstream.
pub const ADMIN_UPSTREAM: &str = "till-admin";
/// Default number of verified keys kept in the verification cache.
pub const DEFAULT_VERIFY_CACHE_ENTRIES: usize = 10_000;

/// Where configuration values come from besides the file: the process environment in
/// production, a map in tests.
pub trait Env: Send + Sync {
    /// The variable's value, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemEnv;

impl Env for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Command-line flags: they win over everything.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--proxy-id`.
    pub proxy_id: Option<String>,
    /// `--ledger`.
    pub ledger: Option<String>,
    /// `--keyspace` (FoundationDB).
    pub keyspace: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
}

/// `till.toml` as written. Every table and key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listen address, `host:port`.
    pub listen: Option<String>,
    /// This proxy's id in receipts.
    pub proxy_id: Option<String>,
    /// `embedded` (default) or `fdb[:CLUSTER_FILE]`, or the `[ledger]` table.
    pub ledger: Option<RawLedger>,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: RawLimits,
    /// Upstreams by name. Absent: every preset whose credential variable is set.
    pub upstreams: Option<BTreeMap<String, RawUpstream>>,
    /// The admin plane.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Usage alerts.
    #[serde(default)]
    pub alerts: RawAlerts,
    /// Automatic export and prune of old receipts (`[retention]`).
    pub retention: Option<RawRetention>,
    /// Root public keys this proxy trusts besides its data dir's: each a public JWK file
    /// (`root.pub.jwk` from the owner) or the 64-hex public key `till keygen` prints.
    pub trusted_root_keys: Option<Vec<String>>,
}

/// `[limits]` as written. Durations are humantime strings (`"10s"`, `"2m"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request body in bytes.
    pub max_body_bytes: Option<u64>,
    /// Budget for all request bodies buffered at once, in bytes.
    pub max_inflight_body_bytes: Option<u64>,
    /// Largest request head in bytes.
    pub max_header_bytes: Option<usize>,
    /// Time to receive a request head.
    pub header_read_timeout: Option<String>,
    /// Longest pause reading a body from / writing a response to a client.
    pub idle_timeout: Option<String>,
    /// Upstream connect timeout.
    pub upstream_connect_timeout: Option<String>,
    /// Upstream response-head timeout and body idle timeout.
    pub upstream_response_timeout: Option<String>,
    /// Ledger claim timeout.
    pub ledger_claim_timeout: Option<String>,
    /// Verification cache size.
    pub verify_cache_entries: Option<usize>,
}

/// `[upstreams.<name>]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `openai`, `anthropic`, `gemini`, `github`, `stripe` or `generic`. Default: the
    /// upstream's name if it is a preset name, else `generic`.
    pub preset: Option<String>,
    /// Base URL (`https://host[:port][/prefix]`); the request path is appended.
    pub base_url: Option<String>,
    /// Environment variable holding the real credential.
    pub credential_env: Option<String>,
    /// File holding the real credential (trailing newline trimmed).
    pub credential_file: Option<PathBuf>,
    /// `store:NAME`: the record NAME of the data dir's encrypted credential store.
    pub credential: Option<String>,
    /// How to inject the credential.
    pub auth: Option<RawAuth>,
    /// Extra PEM CA certificate(s) trusted for this upstream (private upstreams).
    pub ca_file: Option<PathBuf>,
    /// `body` (JSON `model`), `gemini_path` or `none`.
    pub model: Option<String>,
}

/// `auth = { header = "authorization", scheme = "Bearer" }` or `auth = { query = "key" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Header name.
    pub header: Option<String>,
    /// Scheme before the secret in the header.
    pub scheme: Option<String>,
    /// Query parameter name.
    pub query: Option<String>,
}

/// Validated limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Budget for all request bodies buffered at once (at least `max_body_bytes`).
    pub max_inflight_body_bytes: u64,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Time to receive a request head.
    pub header_read_timeout: Duration,
    /// Longest pause reading a request body or writing a response.
    pub idle_timeout: Duration,
    /// Upstream connect timeout.
    pub upstream_connect_timeout: Duration,
    /// Upstream response-head timeout and body idle timeout.
    pub upstream_response_timeout: Duration,
    /// Ledger claim timeout.
    pub ledger_claim_timeout: Duration,
    /// Verification cache size.
    pub verify_cache_entries: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_inflight_body_bytes: DEFAULT_MAX_INFLIGHT_BODY_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            upstream_response_timeout: DEFAULT_UPSTREAM_RESPONSE_TIMEOUT,
            ledger_claim_timeout: DEFAULT_LEDGER_CLAIM_TIMEOUT,
            verify_cache_entries: DEFAULT_VERIFY_CACHE_ENTRIES,
        }
    }
}

/// One validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Name: the first path segment of proxied requests.
    pub name: String,
    /// The preset it is based on.
    pub preset: Preset,
    /// Base URL without a trailing `/`.
    pub base_url: String,
    /// `base_url`'s host and port (the port the scheme implies when none is given),
    /// parsed once at load: every forwarded URL must still name them.
    pub origin: (String, Option<u16>),
    /// How the credential is injected.
    pub auth: Auth,
    /// The real credential (swappable: `till credential rotate`, SIGHUP).
    pub credential: Credential,
    /// The credential store record it comes from (`credential = "store:NAME"`); the value
    /// is filled in by [`Config::resolve_store_credentials`].
    pub credential_store: Option<String>,
    /// Where the credential came from (`env OPENAI_API_KEY`, `file /run/key`), for humans.
    pub credential_source: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_pem: Option<Vec<u8>>,
    /// Where the model caveat's value comes from.
    pub model: ModelSource,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Proxy id in receipts.
    pub proxy_id: String,
    /// Which ledger backend.
    pub ledger: LedgerChoice,
    /// Limits and timeouts.
    pub limits: ProxyLimits,
    /// Enabled upstreams by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// The admin plane.
    pub admin: AdminSettings,
    /// Usage alerts.
    pub alerts: AlertSettings,
    /// Automatic export and prune of old receipts; `None`: receipts are kept.
    pub retention: Option<RetentionSettings>,
    /// Root public keys trusted besides the data dir's (`trusted_root_keys`).
    pub trusted_root_keys: Vec<till_token::RootPublicKey>,
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// `trusted_root_keys` entries that are relative file paths (read by `load`).
    trusted_root_key_files: Vec<Option<PathBuf>>,
}

impl Config {
    /// Reads `file` (if given), applies the environment and `flags`, and validates.
    pub fn load(
        file: Option<&Path>,
        flags: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { reason, .. } => ConfigError::Parse {
                        path: Some(path.to_path_buf()),
                        reason,
                    },
                    other => other,
                })?
            }
            None => RawConfig::default(),
        };
        let base = file.and_then(Path::parent).map(Path::to_path_buf);
        let mut config = Self::validate(raw, flags, env)?;
        config.file = file.map(Path::to_path_buf);
        if let (Some(base), Some(retention)) = (&base, config.retention.as_mut()) {
            retention.resolve(base);
        }
        // Relative key files are relative to the config file, like a distributed bundle.
        if let Some(base) = base {
            for (i, k) in config.trusted_root_key_files.iter().enumerate() {
                if let Some(rel) = k {
                    let key = read_trusted_root_key(&base.join(rel))
                        .map_err(|r| invalid(&format!("trusted_root_keys[{i}]"), r))?;
                    config.trusted_root_keys.push(key);
                }
            }
        }
        Ok(config)
    }

    /// The upstreams whose credential comes from the credential store:
    /// `(upstream, record)`.
    pub fn store_credentials(&self) -> Vec<(String, String)> {
        self.upstreams
            .values()
            .filter_map(|u| {
                u.credential_store
                    .as_ref()
                    .map(|r| (u.name.clone(), r.clone()))
            })
            .collect()
    }

    /// Fills in (or, on reload, swaps) every `credential = "store:NAME"` from `open`,
    /// all or nothing: every value is opened and checked first, then all are swapped.
    pub fn resolve_store_credentials(
        &self,
        open: &dyn Fn(&str) -> Result<Secret, String>,
    ) -> Result<(), ConfigError> {
        let mut opened = Vec::new();
        for u in self.upstreams.values() {
            let Some(record) = &u.credential_store else {
                continue;
            };
            let key = format!("upstreams.{}.credential", u.name);
            let secret = open(record).map_err(|r| invalid(&key, r))?;
            if !credential_fits(&u.auth, secret.expose()) {
                return Err(invalid(
                    &key,
                    format!("the credential from store record `{record}` is empty or contains spaces or control characters"),
                ));
            }
            opened.push((u, secret));
        }
        for (u, secret) in opened {
            u.credential.replace(secret);
        }
        Ok(())
    }

    /// Parses `till.toml` text (no validation).
    pub fn parse(text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            reason: e.to_string(),
        })
    }

    /// Validates a raw config with the environment and flags applied on top.
    pub fn validate(
        raw: RawConfig,
        flags: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let listen_text = flags
            .listen
            .clone()
            .or_else(|| env.var(ENV_LISTEN))
            .or(raw.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
            )
        })?;
        let proxy_id = flags
            .proxy_id
            .clone()
            .or_else(|| env.var(ENV_PROXY_ID))
            .or(raw.proxy_id)
            .unwrap_or_else(|| DEFAULT_PROXY_ID.to_string());
        if proxy_id.is_empty()
            || proxy_id.len() > 64
            || !proxy_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid("proxy_id", "1-64 of A-Z a-z 0-9 - _ .".to_string()));
        }
        let ledger = validate_ledger(raw.ledger, flags, env)?;
        let limits = validate_limits(raw.limits, env)?;
        let admin = validate_admin(raw.admin, flags.admin_listen.clone(), env)?;
        let alerts = validate_alerts(raw.alerts, env)?;
        let retention = validate_retention(raw.retention, env)?;
        // Hex keys now; key files once the config file's directory is known (`load`).
        let mut trusted_root_keys = Vec::new();
        let mut trusted_root_key_files = Vec::new();
        for (i, entry) in raw.trusted_root_keys.unwrap_or_default().iter().enumerate() {
            if entry.len() == 64 && entry.bytes().all(|b| b.is_ascii_hexdigit()) {
                let key = till_token::RootPublicKey::from_hex(entry)
                    .map_err(|e| invalid(&format!("trusted_root_keys[{i}]"), e.to_string()))?;
                trusted_root_keys.push(key);
                trusted_root_key_files.push(None);
            } else if Path::new(entry).is_absolute() {
                let key = read_trusted_root_key(Path::new(entry))
                    .map_err(|r| invalid(&format!("trusted_root_keys[{i}]"), r))?;
                trusted_root_keys.push(key);
                trusted_root_key_files.push(None);
            } else {
                trusted_root_key_files.push(Some(PathBuf::from(entry)));
            }
        }
        let upstreams = match raw.upstreams {
            Some(table) => {
                let mut out = BTreeMap::new();
                for (name, up) in table {
                    if name == ADMIN_UPSTREAM {
                        return Err(invalid(
                            "upstreams",
                            format!("`{ADMIN_UPSTREAM}` is reserved for admin keys"),
                        ));
                    }
                    let u = validate_upstream(&name, up, env)?;
                    out.insert(name, u);
                }
                out
            }
            None => env_upstreams(env)?,
        };
        Ok(Config {
            listen,
            proxy_id,
            ledger,
            limits,
            upstreams,
            admin,
            alerts,
            retention,
            trusted_root_keys,
            trusted_root_key_files,
            file: None,
        })
    }
}

/// `ledger` in till.toml: the short string form or the `[ledger]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawLedger {
    /// `ledger = "embedded" | "fdb" | "fdb:CLUSTER_FILE"`.
    Short(String),
    /// `[ledger] backend = "...", cluster_file = "...", keyspace = "..."`.
    Table(RawLedgerTable),
}

/// The `[ledger]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedgerTable {
    /// `embedded` (default) or `fdb`.
    pub backend: Option<String>,
    /// FoundationDB cluster file (`fdb` only).
    pub cluster_file: Option<PathBuf>,
    /// FoundationDB key space (`fdb` only).
    pub keyspace: Option<String>,
}

/// Which ledger backend a proxy claims against.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LedgerChoice {
    /// The data dir's embedded ledger (single node).
    Embedded,
    /// FoundationDB (fleet); `None` uses the client's default cluster file.
    Fdb {
        /// Cluster file path.
        cluster_file: Option<PathBuf>,
        /// Key space: every key under the tuple prefix `(keyspace,)`.
        keyspace: String,
    },
}

impl LedgerChoice {
    /// Parses `embedded`, `fdb` or `fdb:CLUSTER_FILE` (default key space).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "embedded" => Ok(LedgerChoice::Embedded),
            None if text == "fdb" => Ok(LedgerChoice::Fdb {
                cluster_file: None,
                keyspace: DEFAULT_FDB_KEYSPACE.to_string(),
            }),
            Some(("fdb", path)) if !path.is_empty() => Ok(LedgerChoice::Fdb {
                cluster_file: Some(PathBuf::from(path)),
                keyspace: DEFAULT_FDB_KEYSPACE.to_string(),
            }),
            _ => Err(format!(
                "`{text}`: expected `embedded`, `fdb` or `fdb:CLUSTER_FILE`"
            )),
        }
    }
}

/// Checks a FoundationDB key space name: 1-64 of A-Z a-z 0-9 - _ .
pub fn validate_keyspace(keyspace: &str) -> Result<(), String> {
    if keyspace.is_empty()
        || keyspace.len() > 64
        || !keyspace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "`{keyspace}`: a key space is 1-64 of A-Z a-z 0-9 - _ ."
        ));
    }
    Ok(())
}

/// The ledger: `--ledger` / `TILL_LEDGER` / the file's `ledger` (string or `[ledger]`
/// table) choose the backend and cluster file; `--keyspace` / `TILL_FDB_KEYSPACE` /
/// `[ledger] keyspace` the key space (FoundationDB only; ignored for `embedded`).
fn validate_ledger(
    raw: Option<RawLedger>,
    flags: &Overrides,
    env: &dyn Env,
) -> Result<LedgerChoice, ConfigError> {
    let (file_choice, file_keyspace) = match raw {
        None => (None, None),
        Some(RawLedger::Short(text)) => (Some(text), None),
        Some(RawLedger::Table(t)) => {
            let backend = t.backend.as_deref().unwrap_or("embedded");
            let choice = match (backend, &t.cluster_file) {
                ("embedded", None) => "embedded".to_string(),
                ("fdb", None) => "fdb".to_string(),
                ("fdb", Some(path)) if !path.as_os_str().is_empty() => {
                    format!("fdb:{}", path.display())
                }
                ("embedded", Some(_)) => {
                    return Err(invalid(
                        "ledger.cluster_file",
                        "only for backend = \"fdb\"".to_string(),
                    ))
                }
                _ => {
                    return Err(invalid(
                        "ledger.backend",
                        format!("`{backend}`: expected `embedded` or `fdb`"),
                    ))
                }
            };
            (Some(choice), t.keyspace)
        }
    };
    let text = flags
        .ledger
        .clone()
        .or_else(|| env.var(ENV_LEDGER))
        .or(file_choice)
        .unwrap_or_else(|| "embedded".to_string());
    let choice = LedgerChoice::parse(&text).map_err(|e| invalid("ledger", e))?;
    let keyspace = flags
        .keyspace
        .clone()
        .or_else(|| env.var(ENV_FDB_KEYSPACE))
        .or(file_keyspace);
    match choice {
        LedgerChoice::Fdb { cluster_file, .. } => {
            let keyspace = keyspace.unwrap_or_else(|| DEFAULT_FDB_KEYSPACE.to_string());
            validate_keyspace(&keyspace).map_err(|e| invalid("ledger.keyspace", e))?;
            Ok(LedgerChoice::Fdb {
                cluster_file,
                keyspace,
            })
        }
        other => Ok(other),
    }
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason,
    }
}

fn validate_limits(raw: RawLimits, env: &dyn Env) -> Result<ProxyLimits, ConfigError> {
    let d = ProxyLimits::default();
    let number =
        |key: &str, var: &str, file: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match env.var(var) {
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| invalid(key, format!("${var}=`{v}` is not a number"))),
                None => Ok(file.unwrap_or(default)),
            }
        };
    let duration = |key: &str,
                    var: &str,
                    file: Option<String>,
                    default: Duration|
     -> Result<Duration, ConfigError> {
        let text = match env.var(var).or(file) {
            Some(t) => t,
            None => return Ok(default),
        };
        let d = humantime::parse_duration(text.trim()).map_err(|_| {
            invalid(
                key,
                format!("`{text}` is not a duration like \"10s\" or \"2m\""),
            )
        })?;
        if d.is_zero() {
            return Err(invalid(key, "must be greater than zero".into()));
        }
        Ok(d)
    };
    let max_body_bytes = number(
        "limits.max_body_bytes",
        ENV_MAX_BODY_BYTES,
        raw.max_body_bytes,
        d.max_body_bytes,
    )?;
    let max_inflight_body_bytes = number(
        "limits.max_inflight_body_bytes",
        ENV_MAX_INFLIGHT_BODY_BYTES,
        raw.max_inflight_body_bytes,
        d.max_inflight_body_bytes.max(max_body_bytes),
    )?;
    if max_inflight_body_bytes < max_body_bytes {
        return Err(invalid(
            "limits.max_inflight_body_bytes",
            format!("must be at least limits.max_body_bytes ({max_body_bytes})"),
        ));
    }
    let max_header_bytes = number(
        "limits.max_header_bytes",
        ENV_MAX_HEADER_BYTES,
        raw.max_header_bytes.map(|v| v as u64),
        d.max_header_bytes as u64,
    )?;
    let max_header_bytes = usize::try_from(max_header_bytes).unwrap_or(usize::MAX);
    if max_header_bytes < MIN_MAX_HEADER_BYTES {
        return Err(invalid(
            "limits.max_header_bytes",
            format!("must be at least {MIN_MAX_HEADER_BYTES}"),
        ));
    }
    let verify_cache_entries = raw.verify_cache_entries.unwrap_or(d.verify_cache_entries);
    Ok(ProxyLimits {
        max_body_bytes,
        max_inflight_body_bytes,
        max_header_bytes,
        header_read_timeout: duration(
            "limits.header_read_timeout",
            ENV_HEADER_READ_TIMEOUT,
            raw.header_read_timeout,
            d.header_read_timeout,
        )?,
        idle_timeout: duration(
            "limits.idle_timeout",
            ENV_IDLE_TIMEOUT,
            raw.idle_timeout,
            d.idle_timeout,
        )?,
        upstream_connect_timeout: duration(
            "limits.upstream_connect_timeout",
            ENV_UPSTREAM_CONNECT_TIMEOUT,
            raw.upstream_connect_timeout,
            d.upstream_connect_timeout,
        )?,
        upstream_response_timeout: duration(
            "limits.upstream_response_timeout",
            ENV_UPSTREAM_RESPONSE_TIMEOUT,
            raw.upstream_response_timeout,
            d.upstream_response_timeout,
        )?,
        ledger_claim_timeout: duration(
            "limits.ledger_claim_timeout",
            ENV_LEDGER_CLAIM_TIMEOUT,
            raw.ledger_claim_timeout,
            d.ledger_claim_timeout,
        )?,
        verify_cache_entries,
    })
}

/// With no `[upstreams]` table: every preset whose credential variable is set and non-empty.
fn env_upstreams(env: &dyn Env) -> Result<BTreeMap<String, Upstream>, ConfigError> {
    let mut out = BTreeMap::new();
    for preset in ENV_PRESETS {
        let Some(var) = preset.credential_env() else {
            continue;
        };
        if env.var(var).is_some_and(|v| !v.trim().is_empty()) {
            let u = validate_upstream(preset.name(), RawUpstream::default(), env)?;
            out.insert(preset.name().to_string(), u);
        }
    }
    Ok(out)
}

fn validate_upstream(name: &str, raw: RawUpstream, env: &dyn Env) -> Result<Upstream, ConfigError> {
    let key = |k: &str| format!("upstreams.{name}.{k}");
    till_token::validate_upstream(name)
        .map_err(|e| invalid(&format!("upstreams.{name}"), e.to_string()))?;
    let preset = match raw.preset.as_deref() {
        Some(p) => Preset::from_name(p).ok_or_else(|| {
            invalid(
                &key("preset"),
                format!(
                    "unknown preset `{p}` (openai, anthropic, gemini, github, stripe, generic)"
                ),
            )
        })?,
        None => Preset::from_name(name).unwrap_or(Preset::Generic),
    };
    let base_url = raw
        .base_url
        .or_else(|| preset.base_url().map(str::to_string))
        .ok_or_else(|| invalid(&key("base_url"), "required for a generic upstream".into()))?;
    let base_url = validate_base_url(&base_url).map_err(|r| invalid(&key("base_url"), r))?;
    let auth = match raw.auth {
        Some(a) => validate_auth(a).map_err(|r| invalid(&key("auth"), r))?,
        None => preset
            .auth()
            .ok_or_else(|| invalid(&key("auth"), "required for a generic upstream, e.g. { header = \"authorization\", scheme = \"Bearer\" }".into()))?,
    };
    if let Some(spec) = raw.credential {
        let record = spec
            .strip_prefix(crate::credstore::STORE_PREFIX)
            .ok_or_else(|| {
                invalid(
                    &key("credential"),
                    format!(
                        "`{spec}`: expected store:NAME (a record of `till credential set NAME`)"
                    ),
                )
            })?;
        crate::credstore::validate_name(record)
            .map_err(|e| invalid(&key("credential"), e.to_string()))?;
        if raw.credential_env.is_some() || raw.credential_file.is_some() {
            return Err(invalid(
                &key("credential"),
                "set one of credential, credential_env and credential_file".into(),
            ));
        }
        return finish_upstream(
            name,
            preset,
            base_url,
            auth,
            raw.ca_file,
            raw.model.as_deref(),
            (
                Credential::new(Secret::new(String::new())),
                Some(record.to_owned()),
                format!("store {record}"),
            ),
        );
    }
    let (credential, credential_source) = match (raw.credential_file, raw.credential_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                &key("credential_env"),
                "set credential_env or credential_file, not both".into(),
            ))
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    &key("credential_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            (
                text.trim_end_matches(['\r', '\n']).to_string(),
                format!("file {}", path.display()),
            )
        }
        (None, var) => {
            let var = var
                .or_else(|| preset.credential_env().map(str::to_string))
                .ok_or_else(|| {
                    invalid(
                        &key("credential_env"),
                        "required for a generic upstream".into(),
                    )
                })?;
            let value = env.var(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    &key("credential_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            (value, format!("env {var}"))
        }
    };
    // The credential goes into a header or query: refuse bytes that could split it.
    if !credential_fits(&auth, &credential) {
        return Err(invalid(
            &key("credential"),
            format!("the credential from {credential_source} is empty or contains spaces or control characters"),
        ));
    }
    finish_upstream(
        name,
        preset,
        base_url,
        auth,
        raw.ca_file,
        raw.model.as_deref(),
        (
            Credential::new(Secret::new(credential)),
            None,
            credential_source,
        ),
    )
}

/// Whether `credential` can be injected with `auth` (no bytes that could split a header
/// or a query).
fn credential_fits(auth: &Auth, credential: &str) -> bool {
    let header_ok = match auth {
        Auth::Header { scheme, .. } => {
            let full = zeroize::Zeroizing::new(match scheme {
                Some(s) => format!("{s} {credential}"),
                None => credential.to_owned(),
            });
            HeaderValue::from_str(&full).is_ok()
        }
        Auth::Query { .. } => true,
    };
    !credential.is_empty()
        && header_ok
        && !credential
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ')
}

fn read_trusted_root_key(path: &Path) -> Result<till_token::RootPublicKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    till_token::RootPublicKey::from_jwk(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The rest of an upstream, once its credential is known (or known to come from the
/// store).
fn finish_upstream(
    name: &str,
    preset: Preset,
    base_url: String,
    auth: Auth,
    ca_file: Option<PathBuf>,
    model: Option<&str>,
    (credential, credential_store, credential_source): (Credential, Option<String>, String),
) -> Result<Upstream, ConfigError> {
    let key = |k: &str| format!("upstreams.{name}.{k}");
    let ca_pem = match ca_file {
        Some(path) => Some(std::fs::read(&path).map_err(|e| {
            invalid(
                &key("ca_file"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    if let Some(pem) = &ca_pem {
        reqwest::Certificate::from_pem_bundle(pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| invalid(&key("ca_file"), "no PEM certificate found".into()))?;
    }
    let model = match model {
        None => preset.model_source(),
        Some("body") => ModelSource::JsonBody,
        Some("gemini_path") => ModelSource::GeminiPath,
        Some("none") => ModelSource::None,
        Some(other) => {
            return Err(invalid(
                &key("model"),
                format!("`{other}`: expected body, gemini_path or none"),
            ))
        }
    };
    let origin = reqwest::Url::parse(&base_url)
        .ok()
        .and_then(|url| Some((url.host_str()?.to_owned(), url.port_or_known_default())))
        .ok_or_else(|| invalid(&key("base_url"), format!("`{base_url}`: no host")))?;
    Ok(Upstream {
        name: name.to_string(),
        preset,
        base_url,
        origin,
        auth,
        credential,
        credential_store,
        credential_source,
        ca_pem,
        model,
    })
}

fn validate_base_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{text}`: only http and https are supported"));
    }
    if url.host_str().is_none() {
        return Err(format!("`{text}`: no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{text}`: credentials in the URL are not allowed; use credential_env"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{text}`: no query or fragment allowed"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn validate_auth(raw: RawAuth) -> Result<Auth, String> {
    match (raw.header, raw.scheme, raw.query) {
        (Some(h), scheme, None) => {
            let name = HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("`{h}` is not a header name"))?;
            if crate::hygiene::is_hop_by_hop(&name) || name == http::header::HOST {
                return Err(format!("`{h}` cannot carry a credential"));
            }
            if let Some(s) = &scheme {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(format!("scheme `{s}` must be a single word like Bearer"));
                }
            }
            Ok(Auth::Header { name, scheme })
        }
        (None, None, Some(q)) => {
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(format!("query parameter `{q}` must be A-Z a-z 0-9 - _ ."));
            }
            Ok(Auth::Query { param: q })
        }
        _ => Err("give either header (with an optional scheme) or query".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn store_credentials_are_filled_in_all_or_nothing() {
        let toml = "[upstreams.openai]\ncredential = \"store:oa\"\n\n[upstreams.github]\ncredential = \"store:gh\"\n";
        let c = Config::validate(
            Config::parse(toml).unwrap(),
            &Overrides::default(),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.upstreams["openai"].credential_source, "store oa");
        let mut wanted = c.store_credentials();
        wanted.sort();
        assert_eq!(
            wanted,
            [
                ("github".into(), "gh".into()),
                ("openai".into(), "oa".into())
            ]
        );
        // One record fails to open: nothing is swapped in.
        let err = c
            .resolve_store_credentials(&|name| match name {
                "oa" => Ok(Secret::new("sk-1")),
                _ => Err("record `gh` does not decrypt".into()),
            })
            .unwrap_err();
        assert!(err.to_string().contains("gh"), "{err}");
        assert_eq!(c.upstreams["openai"].credential.current().expose(), "");
        // A value that could split a header is refused.
        assert!(c
            .resolve_store_credentials(&|_| Ok(Secret::new("sk 1")))
            .is_err());
        c.resolve_store_credentials(&|name| Ok(Secret::new(format!("sk-{name}"))))
            .unwrap();
        assert_eq!(c.upstreams["github"].credential.current().expose(), "sk-gh");
        for bad in [
            "credential = \"env:X\"",
            "credential = \"store:bad name\"",
            "credential = \"store:x\"\ncredential_env = \"X\"",
        ] {
            let toml = format!("[upstreams.openai]\n{bad}\n");
            let raw = Config::parse(&toml).unwrap();
            assert!(
                Config::validate(raw, &Overrides::default(), &env(&[("X", "v")])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn trusted_root_keys_take_hex_and_jwk_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = till_token::RootKey::from_seed(&[1; 32]).unwrap().public();
        let b = till_token::RootKey::from_seed(&[2; 32]).unwrap().public();
        std::fs::write(dir.path().join("b.pub.jwk"), b.to_jwk()).unwrap();
        let file = dir.path().join("till.toml");
        std::fs::write(
            &file,
            format!("trusted_root_keys = [\"{}\", \"b.pub.jwk\"]\n", a.to_hex()),
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            &Overrides::default(),
            &env(&[("OPENAI_API_KEY", "k")]),
        )
        .unwrap();
        assert_eq!(c.trusted_root_keys, [a, b]);
        std::fs::write(&file, "trusted_root_keys = [\"missing.jwk\"]\n").unwrap();
        let err = Config::load(Some(&file), &Overrides::default(), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("trusted_root_keys[0]"), "{err}");
    }

    #[test]
    fn no_config_enables_presets_from_the_environment() {
        let e = env(&[
            ("OPENAI_API_KEY", "sk-1"),
            ("GITHUB_TOKEN", "gh-1"),
            ("STRIPE_API_KEY", ""),
        ]);
        let c = Config::validate(RawConfig::default(), &Overrides::default(), &e).unwrap();
        assert_eq!(c.upstreams.keys().collect::<Vec<_>>(), ["github", "openai"]);
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstreams["openai"].base_url, "https://api.openai.com");
        assert_eq!(c.upstreams["openai"].model, ModelSource::JsonBody);
        assert_eq!(
            format!("{:?}", c.upstreams["openai"].credential),
            "[redacted]"
        );
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let raw =
            Config::parse("listen = \"127.0.0.1:1\"\nproxy_id = \"file\"\nupstreams = {}").unwrap();
        let e = env(&[(ENV_LISTEN, "127.0.0.1:2"), (ENV_PROXY_ID, "env")]);
        let c = Config::validate(raw, &Overrides::default(), &e).unwrap();
        assert_eq!((c.listen.port(), c.proxy_id.as_str()), (2, "env"));
        let raw = Config::parse("listen = \"127.0.0.1:1\"").unwrap();
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            proxy_id: Some("flag".into()),
            ledger: None,
            keyspace: None,
            admin_listen: None,
        };
        let c = Config::validate(raw, &flags, &e).unwrap();
        assert_eq!((c.listen.port(), c.proxy_id.as_str()), (3, "flag"));
        let raw = Config::parse("listen = \"127.0.0.1:1\"").unwrap();
        let c = Config::validate(raw, &Overrides::default(), &env(&[])).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.ledger, LedgerChoice::Embedded);
    }

    #[test]
    fn ledger_choice_precedence_and_syntax() {
        let raw = Config::parse("ledger = \"fdb:/etc/fdb.cluster\"\nupstreams = {}").unwrap();
        let c = Config::validate(raw, &Overrides::default(), &env(&[])).unwrap();
        assert_eq!(
            c.ledger,
            LedgerChoice::Fdb {
                cluster_file: Some("/etc/fdb.cluster".into()),
                keyspace: DEFAULT_FDB_KEYSPACE.into(),
            }
        );
        let raw = Config::parse("ledger = \"fdb\"\nupstreams = {}").unwrap();
        let e = env(&[(ENV_LEDGER, "embedded")]);
        let c = Config::validate(raw, &Overrides::default(), &e).unwrap();
        assert_eq!(c.ledger, LedgerChoice::Embedded);
        let raw = Config::parse("upstreams = {}").unwrap();
        let flags = Overrides {
            ledger: Some("fdb".into()),
            ..Overrides::default()
        };
        let c = Config::validate(raw, &flags, &e).unwrap();
        assert_eq!(
            c.ledger,
            LedgerChoice::Fdb {
                cluster_file: None,
                keyspace: DEFAULT_FDB_KEYSPACE.into(),
            }
        );
        for bad in ["postgres", "fdb:", "embedded:x"] {
            let raw = Config::parse("upstreams = {}").unwrap();
            let flags = Overrides {
                ledger: Some(bad.into()),
                ..Overrides::default()
            };
            assert!(Config::validate(raw, &flags, &e).is_err(), "{bad}");
        }
    }

    #[test]
    fn ledger_table_form_and_keyspace() {
        let fdb = |path: Option<&str>, ks: &str| LedgerChoice::Fdb {
            cluster_file: path.map(PathBuf::from),
            keyspace: ks.into(),
        };
        let table = "[ledger]\nbackend = \"fdb\"\ncluster_file = \"/etc/fdb.cluster\"\n\
                     keyspace = \"prod-eu\"\n[upstreams]\n";
        let c = Config::validate(
            Config::parse(table).unwrap(),
            &Overrides::default(),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.ledger, fdb(Some("/etc/fdb.cluster"), "prod-eu"));
        // The env beats the file's key space; the flag beats the env.
        let e = env(&[(ENV_FDB_KEYSPACE, "from-env")]);
        let c = Config::validate(Config::parse(table).unwrap(), &Overrides::default(), &e).unwrap();
        assert_eq!(c.ledger, fdb(Some("/etc/fdb.cluster"), "from-env"));
        let flags = Overrides {
            keyspace: Some("from-flag".into()),
            ..Overrides::default()
        };
        let c = Config::validate(Config::parse(table).unwrap(), &flags, &e).unwrap();
        assert_eq!(c.ledger, fdb(Some("/etc/fdb.cluster"), "from-flag"));
        // `--ledger` replaces the file's backend and cluster file, keeps its key space.
        let flags = Overrides {
            ledger: Some("fdb:/other.cluster".into()),
            ..Overrides::default()
        };
        let c = Config::validate(Config::parse(table).unwrap(), &flags, &env(&[])).unwrap();
        assert_eq!(c.ledger, fdb(Some("/other.cluster"), "prod-eu"));
        // The short form and a table without a key space get the default key space; the
        // short form takes the key space from the env or flag.
        let c = Config::validate(
            Config::parse("ledger = \"fdb:/x\"\nupstreams = {}").unwrap(),
            &Overrides::default(),
            &e,
        )
        .unwrap();
        assert_eq!(c.ledger, fdb(Some("/x"), "from-env"));
        let c = Config::validate(
            Config::parse("[ledger]\nbackend = \"fdb\"\n[upstreams]\n").unwrap(),
            &Overrides::default(),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.ledger, fdb(None, DEFAULT_FDB_KEYSPACE));
        // An empty table is the embedded ledger; a key space alone does not change that.
        let c = Config::validate(
            Config::parse("[ledger]\nkeyspace = \"k\"\n[upstreams]\n").unwrap(),
            &Overrides::default(),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.ledger, LedgerChoice::Embedded);
        // Refused: unknown keys, unknown backends, a cluster file for embedded, bad names.
        assert!(Config::parse("[ledger]\nbackend = \"fdb\"\nclusterfile = \"x\"").is_err());
        for bad in [
            "[ledger]\nbackend = \"postgres\"\n[upstreams]\n",
            "[ledger]\nbackend = \"embedded\"\ncluster_file = \"/x\"\n[upstreams]\n",
            "[ledger]\nbackend = \"fdb\"\nkeyspace = \"\"\n[upstreams]\n",
            "[ledger]\nbackend = \"fdb\"\nkeyspace = \"a b\"\n[upstreams]\n",
        ] {
            let raw = Config::parse(bad).unwrap();
            assert!(
                Config::validate(raw, &Overrides::default(), &env(&[])).is_err(),
                "{bad}"
            );
        }
        let flags = Overrides {
            ledger: Some("fdb".into()),
            keyspace: Some("x".repeat(65)),
            ..Overrides::default()
        };
        let raw = Config::parse("upstreams = {}").unwrap();
        assert!(Config::validate(raw, &flags, &env(&[])).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::parse("lisen = \"x\"").is_err());
        assert!(Config::parse("[limits]\nmax_body = 1").is_err());
        assert!(Config::parse("[upstreams.a]\nbase = \"x\"").is_err());
    }

    #[test]
    fn generic_upstream_needs_url_auth_and_credential() {
        let text = r#"
            [upstreams.internal]
            base_url = "http://127.0.0.1:9000/api/"
            credential_env = "INTERNAL_KEY"
            auth = { header = "X-Token" }
            [limits]
            max_body_bytes = 1000
            upstream_response_timeout = "3s"
        "#;
        let e = env(&[("INTERNAL_KEY", "s3cret"), (ENV_MAX_BODY_BYTES, "2000")]);
        let c = Config::validate(Config::parse(text).unwrap(), &Overrides::default(), &e).unwrap();
        let u = &c.upstreams["internal"];
        assert_eq!(u.preset, Preset::Generic);
        assert_eq!(u.base_url, "http://127.0.0.1:9000/api");
        assert_eq!(
            u.auth,
            Auth::Header {
                name: HeaderName::from_static("x-token"),
                scheme: None
            }
        );
        assert_eq!(u.model, ModelSource::None);
        assert_eq!(c.limits.max_body_bytes, 2000);
        assert_eq!(c.limits.upstream_response_timeout, Duration::from_secs(3));
        let err = Config::validate(
            Config::parse(text).unwrap(),
            &Overrides::default(),
            &env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("INTERNAL_KEY"), "{err}");
        let no_auth = "[upstreams.x]\nbase_url = \"http://a\"\ncredential_env = \"K\"";
        let err = Config::validate(
            Config::parse(no_auth).unwrap(),
            &Overrides::default(),
            &env(&[("K", "v")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("upstreams.x.auth"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let cases = [
            ("listen = \"nope\"", "listen"),
            ("[limits]\nidle_timeout = \"soon\"", "limits.idle_timeout"),
            ("[limits]\nidle_timeout = \"0s\"", "limits.idle_timeout"),
            (
                "[limits]\nmax_header_bytes = 100",
                "limits.max_header_bytes",
            ),
            ("[upstreams.Bad]\npreset = \"openai\"", "upstreams.Bad"),
            ("[upstreams.x]\npreset = \"nope\"", "upstreams.x.preset"),
            (
                "[upstreams.openai]\nbase_url = \"ftp://x\"",
                "upstreams.openai.base_url",
            ),
            (
                "[upstreams.openai]\nbase_url = \"https://u:p@x\"",
                "upstreams.openai.base_url",
            ),
            (
                "[upstreams.openai]\nauth = { header = \"connection\" }",
                "upstreams.openai.auth",
            ),
            (
                "[upstreams.openai]\nmodel = \"head\"",
                "upstreams.openai.model",
            ),
        ];
        let e = env(&[("OPENAI_API_KEY", "sk")]);
        for (text, key) in cases {
            let err = Config::validate(Config::parse(text).unwrap(), &Overrides::default(), &e)
                .unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn credentials_with_line_breaks_are_refused() {
        let e = env(&[("OPENAI_API_KEY", "sk\r\nX-Evil: 1")]);
        let text = "[upstreams.openai]";
        let err =
            Config::validate(Config::parse(text).unwrap(), &Overrides::default(), &e).unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
        assert!(
            !err.to_string().contains("sk"),
            "the secret must not be echoed: {err}"
        );
    }
}
