//! `till keygen`, `mint`, `attenuate`, `inspect`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use till_token::{
    attenuate_str, inspect, mint, Caveats, EffectiveScope, Inspection, KeyRing, Limits, RootKey,
    SignatureStatus,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cli::Failure;
use crate::datadir::{load_root_public, DataDir, Init};
use crate::input::arg_or_stdin;

/// Caveat flags shared by `mint` and `attenuate`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CaveatArgs {
    /// Activation cap: at most N calls through this key and every key derived from it.
    #[arg(long, value_name = "N")]
    pub cap: Option<u64>,
    /// Allowed HTTP method (repeatable).
    #[arg(long = "method", value_name = "METHOD")]
    pub methods: Vec<String>,
    /// Allowed path prefix, matched on `/` boundaries (repeatable).
    #[arg(long = "path", value_name = "PREFIX")]
    pub paths: Vec<String>,
    /// Allowed model, read from the JSON body's `model` field (repeatable).
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Lifetime from now, e.g. `90m`, `24h`, `7d`.
    #[arg(long, value_name = "DURATION", conflicts_with = "expires")]
    pub ttl: Option<humantime::Duration>,
    /// Absolute expiry, RFC 3339 (e.g. `2026-12-31T23:59:59Z`).
    #[arg(long, value_name = "RFC3339")]
    pub expires: Option<String>,
    /// Issue the key even though `--expires` is already in the past.
    #[arg(long)]
    pub force: bool,
    /// Per-call ceiling on output tokens (OpenAI `max_tokens` / `max_completion_tokens` /
    /// `max_output_tokens`, Anthropic `max_tokens`, Gemini
    /// `generationConfig.maxOutputTokens`); a request that does not set it is refused.
    #[arg(long, value_name = "N")]
    pub max_output_tokens: Option<u64>,
    /// Per-call ceiling on a form body's `amount` (Stripe, minor units); a request
    /// without one is refused.
    #[arg(long, value_name = "N")]
    pub max_amount: Option<u64>,
    /// Allowed `currency` of a form body (repeatable), e.g. `usd`.
    #[arg(long = "currency", value_name = "CODE")]
    pub currencies: Vec<String>,
    /// Allowed repository `owner/name`, matched against `/repos/{owner}/{name}/...`
    /// (repeatable).
    #[arg(long = "repo", value_name = "OWNER/NAME")]
    pub repos: Vec<String>,
    /// Numeric ceiling on a JSON body member, `POINTER=N` (repeatable), e.g.
    /// `/max_tokens=512`; a request without the member is refused.
    #[arg(long = "json-max", value_name = "POINTER=N")]
    pub json_max: Vec<String>,
    /// Allowed string values of a JSON body member, `POINTER=a,b` (repeatable), e.g.
    /// `/model=gpt-4o-mini,gpt-4o`.
    #[arg(long = "json-allow", value_name = "POINTER=V1,V2")]
    pub json_allow: Vec<String>,
    /// Windowed cap `N/m`, `N/h` or `N/d`: at most N activations per minute, hour or day
    /// (fixed windows; repeatable). `--window` is the same flag.
    #[arg(long = "rate", alias = "window", value_name = "N/UNIT")]
    pub windows: Vec<String>,
}

/// Parses `60/m`, `1000/h`, `5/d` (also `/min`, `/hour`, `/day`).
pub fn parse_window(s: &str) -> Result<till_token::Window> {
    let (n, unit) = s.split_once('/').ok_or_else(|| {
        Failure::usage(format!("--rate `{s}` must be N/m, N/h or N/d (e.g. 60/m)"))
    })?;
    let secs = match unit {
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        _ => bail!(Failure::usage(format!(
            "--rate `{s}`: the window is m (minute), h (hour) or d (day)"
        ))),
    };
    let max = n
        .parse::<u64>()
        .map_err(|_| Failure::usage(format!("--rate `{s}`: `{n}` is not a number")))?;
    Ok(till_token::Window { secs, max })
}

impl CaveatArgs {
    fn to_caveats(&self, upstream: Option<String>) -> Result<Caveats> {
        let expires = match (&self.ttl, &self.expires) {
            (Some(ttl), _) => {
                let d: Duration = (*ttl).into();
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                Some(i64::try_from(now.saturating_add(d.as_secs())).context("--ttl is too long")?)
            }
            (None, Some(s)) => {
                let t = OffsetDateTime::parse(s, &Rfc3339)
                    .map_err(|e| Failure::usage(format!("--expires `{s}` is not RFC 3339: {e}")))?;
                Some(t.unix_timestamp())
            }
            (None, None) => None,
        };
        if let Some(e) = expires {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            if e < i64::try_from(now).unwrap_or(i64::MAX) {
                if !self.force {
                    bail!(Failure::usage(format!(
                        "--expires {} is in the past: the key would be dead on arrival \
                         (pass --force to issue it anyway)",
                        self.expires.as_deref().unwrap_or_default()
                    )));
                }
                eprintln!("till: warning: this key is already expired");
            }
        }
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        let pair = |flag: &str, s: &str| -> Result<(String, String)> {
            let (p, v) = s.split_once('=').ok_or_else(|| {
                Failure::usage(format!(
                    "--{flag} `{s}` must be POINTER=VALUE, e.g. /max_tokens=512"
                ))
            })?;
            Ok((p.to_string(), v.to_string()))
        };
        let mut json_max = std::collections::BTreeMap::new();
        for s in &self.json_max {
            let (p, v) = pair("json-max", s)?;
            let n = v
                .parse::<u64>()
                .map_err(|_| Failure::usage(format!("--json-max `{s}`: `{v}` is not a number")))?;
            if json_max.insert(p, n).is_some() {
                bail!(Failure::usage(format!(
                    "--json-max: `{s}` repeats a pointer"
                )));
            }
        }
        let mut json_allow = std::collections::BTreeMap::new();
        for s in &self.json_allow {
            let (p, v) = pair("json-allow", s)?;
            let values: Vec<String> = v.split(',').map(str::to_string).collect();
            if json_allow.insert(p, values).is_some() {
                bail!(Failure::usage(format!(
                    "--json-allow: `{s}` repeats a pointer"
                )));
            }
        }
        let windows = self
            .windows
            .iter()
            .map(|w| parse_window(w))
            .collect::<Result<Vec<_>>>()?;
        Ok(Caveats {
            upstream,
            methods: list(&self.methods),
            paths: list(&self.paths),
            models: list(&self.models),
            expires,
            cap: self.cap,
            label: None,
            max_output_tokens: self.max_output_tokens,
            amount_max: self.max_amount,
            currencies: list(&self.currencies),
            repos: list(&self.repos),
            json_max: (!json_max.is_empty()).then_some(json_max),
            json_allow: (!json_allow.is_empty()).then_some(json_allow),
            windows: (!windows.is_empty()).then_some(windows),
        })
    }
}

/// `till keygen`.
pub fn keygen(dir: &DataDir, as_json: bool) -> Result<ExitCode> {
    let init = dir.init()?;
    let root = dir.root_public()?;
    let receipt = dir.receipt_public()?;
    let admin = crate::admin::ensure_admin_key(dir)?;
    if init == Init::Existing {
        eprintln!(
            "till: keys already exist in {}; kept them (nothing overwritten)",
            dir.path().display()
        );
    }
    if as_json {
        let out = json!({
            "data_dir": dir.path(),
            "created": init == Init::Created,
            "root_key_id": root.id(),
            "root_public_key": root.to_hex(),
            "receipt_key_id": receipt.key_id(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("data dir:        {}", dir.path().display());
        println!("root key id:     {}", root.id());
        println!("root public key: {}  (root.pub.jwk)", root.to_hex());
        println!("receipt key id:  {}  (receipt.pub.jwk)", receipt.key_id());
        println!(
            "admin key:       {}  (for the admin API of till serve)",
            admin.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `till mint`.
pub fn mint_cmd(
    dir: &DataDir,
    key_file: Option<PathBuf>,
    upstream: String,
    label: Option<String>,
    caveats: &CaveatArgs,
) -> Result<ExitCode> {
    let root = match key_file {
        Some(path) => {
            crate::datadir::check_private_mode(&path)?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            RootKey::from_private_jwk(&text)
                .with_context(|| format!("reading {}", path.display()))?
        }
        None => dir.root_key()?,
    };
    let mut caveats = caveats.to_caveats(Some(upstream))?;
    caveats.label = label;
    let token = mint(&root, caveats).map_err(Failure::usage_from)?;
    println!("{}", token.to_key_string()?);
    Ok(ExitCode::SUCCESS)
}

/// `till attenuate`.
pub fn attenuate_cmd(
    key: &str,
    caveats: &CaveatArgs,
    upstream: Option<String>,
) -> Result<ExitCode> {
    let key = arg_or_stdin(key)?;
    let caveats = caveats.to_caveats(upstream)?;
    let (out, warnings) =
        attenuate_str(&key, caveats, &Limits::default()).map_err(|e| match e {
            till_token::TokenError::InvalidCaveat(_)
            | till_token::TokenError::UpstreamMismatch { .. } => Failure::usage_from(e),
            other => Failure::invalid(other),
        })?;
    for w in warnings {
        eprintln!("till: warning: {w}");
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `till inspect`.
pub fn inspect_cmd(
    dir: &DataDir,
    explicit_dir: bool,
    key: &str,
    public_key: Option<PathBuf>,
    as_json: bool,
    price_per_1k_output: Option<f64>,
) -> Result<ExitCode> {
    if price_per_1k_output.is_some_and(|p| !p.is_finite() || p < 0.0) {
        bail!(Failure::usage(
            "--price-per-1k-output must be a non-negative number"
        ));
    }
    let key = arg_or_stdin(key)?;
    let ring = match public_key {
        Some(path) => Some(KeyRing::with(load_root_public(&path)?)),
        None if explicit_dir || dir.path().join("root.pub.jwk").exists() => Some(dir.key_ring()?),
        None => None,
    };
    let report = inspect(&key, ring.as_ref(), &Limits::default()).map_err(Failure::invalid)?;
    let worst = report.effective.worst_case();
    let cost = price_per_1k_output.and_then(|p| worst.output_tokens.map(|t| t as f64 / 1000.0 * p));
    if as_json {
        let mut value = serde_json::to_value(&report)?;
        let mut w = serde_json::to_value(&worst)?;
        if let Some(p) = price_per_1k_output {
            w["price_per_1k_output"] = json!(p);
            w["output_cost"] = json!(cost);
        }
        value["worst_case"] = w;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_inspection(&report);
        print_worst_case(&worst, price_per_1k_output, cost);
    }
    match &report.signature {
        SignatureStatus::Invalid { message, .. } => {
            Err(Failure::invalid_msg(message.clone()).into())
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn print_inspection(r: &Inspection) {
    match r.root_key_id {
        Some(id) => println!("root key id: {id}"),
        None => println!("root key id: (none)"),
    }
    let sig = match &r.signature {
        SignatureStatus::Verified => "verified".to_string(),
        SignatureStatus::Invalid { message, .. } => format!("INVALID: {message}"),
        SignatureStatus::Unchecked => {
            "not checked (no root public key; pass --public-key or --dir)".into()
        }
        #[allow(unreachable_patterns)]
        _ => "unknown".into(),
    };
    println!("signature:   {sig}");
    for b in &r.blocks {
        println!();
        println!(
            "block {}{}",
            b.index,
            if b.index == 0 { " (authority)" } else { "" }
        );
        println!("  revocation id: {}", hex::encode(&b.revocation_id));
        print_caveats(&scope_of(&b.caveats));
    }
    println!();
    println!("effective scope");
    print_caveats(&r.effective);
}

fn scope_of(c: &Caveats) -> EffectiveScope {
    EffectiveScope::of([c])
}

fn print_caveats(s: &EffectiveScope) {
    let list = |v: &Option<Vec<String>>| match v {
        None => "any".to_string(),
        Some(v) if v.is_empty() => "(none: nothing is allowed)".to_string(),
        Some(v) => v.join(", "),
    };
    if let Some(u) = &s.upstream {
        println!("  upstream:      {u}");
    }
    println!(
        "  cap:           {}",
        s.cap.map_or("unlimited".into(), |c| c.to_string())
    );
    println!("  methods:       {}", list(&s.methods));
    println!("  paths:         {}", list(&s.paths));
    println!("  models:        {}", list(&s.models));
    let num = |label: &str, v: Option<u64>| {
        if let Some(v) = v {
            println!("  {label:<15}{v}");
        }
    };
    num("max output:", s.max_output_tokens);
    num("max amount:", s.amount_max);
    if let Some(c) = &s.currencies {
        println!("  currencies:    {}", c.join(", "));
    }
    if let Some(r) = &s.repos {
        println!("  repos:         {}", r.join(", "));
    }
    for (p, v) in s.json_max.iter().flatten() {
        println!("  json max:      {p} <= {v}");
    }
    for (p, v) in s.json_allow.iter().flatten() {
        println!("  json allow:    {p} in {}", v.join(", "));
    }
    for w in s.windows.iter().flatten() {
        println!("  window:        {} per {} s", w.max, w.secs);
    }
    let expires = s.expires.map_or("never".to_string(), |e| {
        OffsetDateTime::from_unix_timestamp(e)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| e.to_string())
    });
    println!("  expires:       {expires}");
}

/// The worst case, read off the key (spec/token.md §11.1): "unbounded" where a factor is
/// missing.
fn print_worst_case(w: &till_token::WorstCase, price: Option<f64>, cost: Option<f64>) {
    let n = |v: Option<u64>| v.map_or("unbounded".to_string(), |v| v.to_string());
    println!();
    println!(
        "worst case ({})",
        w.upstream.as_deref().unwrap_or("any upstream")
    );
    println!("  activations:   {}", n(w.activations));
    for win in &w.windows {
        let per = match win.secs {
            60 => "minute",
            3600 => "hour",
            86_400 => "day",
            _ => "window",
        };
        println!("                 at most {} per {per}", win.max);
    }
    if w.output_tokens_per_call.is_some() {
        println!(
            "  output tokens: {} ({} per call)",
            n(w.output_tokens),
            n(w.output_tokens_per_call)
        );
        if let Some(p) = price {
            match cost {
                Some(c) => println!("  output cost:   {c:.4} (at {p} per 1k output tokens)"),
                None => println!("  output cost:   unbounded (no activation cap)"),
            }
        }
    } else {
        println!("  output tokens: unbounded (no max_output_tokens ceiling)");
    }
    if w.amount_per_call.is_some() {
        let currencies = w
            .currencies
            .as_ref()
            .map_or("any currency".to_string(), |c| c.join(", "));
        println!(
            "  amount:        {} ({} per call; {currencies})",
            n(w.amount),
            n(w.amount_per_call)
        );
    }
}

/// Guards against an obviously wrong upstream before minting.
pub fn check_upstream(name: &str) -> Result<()> {
    if till_token::validate_upstream(name).is_err() {
        bail!(Failure::usage(format!(
            "--upstream `{name}` must be 1-64 of a-z 0-9 - _ starting with a letter"
        )));
    }
    Ok(())
}
