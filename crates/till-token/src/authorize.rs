//! Authorization of one request against a verified key.
//!
//! Two evaluations that must agree: a pure one over the declared caveats (which names the
//! refusing block and caveat), then the Biscuit Datalog checks themselves with explicit
//! run limits. Canonical blocks make them equivalent; the Datalog run is defence in depth.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::builder::{date, fact, int, string};
use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits};

use crate::caveat::{path_matches, rfc3339, Caveats};
use crate::token::{biscuit_err, Limits, VerifiedToken};
use crate::{CaveatKind, Refusal, TokenError};

/// The request being authorized, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// Upstream name from the route.
    pub upstream: &'a str,
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Normalised path (no query string, no `..`, decoded).
    pub path: &'a str,
    /// The JSON body's `model`, when the upstream is an LLM API.
    pub model: Option<&'a str>,
    /// Now, Unix seconds.
    pub now: i64,
}

/// What the proxy read from one request's body and path for the per-call caveats
/// (spec/token.md §5.1). Absent values are absent facts: a caveat that needs one refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFacts {
    /// The output-token ceiling the request asks for (the largest of the preset's fields).
    pub max_output_tokens: Option<u64>,
    /// A form body's `amount`.
    pub amount: Option<u64>,
    /// A form body's `currency`, lower-cased.
    pub currency: Option<String>,
    /// The repository of a `/repos/{owner}/{name}/...` path, lower-cased.
    pub repo: Option<String>,
    /// JSON body values by pointer, for the pointers the key's caveats name.
    pub json: BTreeMap<String, JsonFact>,
}

/// A JSON body value a `json_max` / `json_allow` caveat reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonFact {
    /// An integer (`till_json_int`).
    Int(i64),
    /// A string (`till_json_str`).
    Str(String),
}

impl RequestFacts<'_> {
    /// Unix seconds for `t` (clamped to 0 before the epoch).
    pub fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

impl VerifiedToken {
    /// Authorizes `req`. `counts[i]` is block `i`'s activation count *after* the claim (its
    /// slot number); `None` checks scope only, with every count set to 1 (the least any
    /// claim can produce, so a cap of 0 is still refused before any claim).
    pub fn authorize(
        &self,
        req: &RequestFacts<'_>,
        counts: Option<&[u64]>,
        limits: &Limits,
    ) -> Result<(), AuthorizeError> {
        self.authorize_call(req, &CallFacts::default(), counts, limits)
    }

    /// [`VerifiedToken::authorize`] with the per-call facts read from the request body and
    /// path (output-token ceiling, amount, currency, repository, JSON members). Windowed
    /// caps are decided by the ledger; here every window count is 1.
    pub fn authorize_call(
        &self,
        req: &RequestFacts<'_>,
        call: &CallFacts,
        counts: Option<&[u64]>,
        limits: &Limits,
    ) -> Result<(), AuthorizeError> {
        let ones;
        let counts = match counts {
            Some(c) if c.len() == self.blocks.len() => c,
            Some(c) => {
                return Err(AuthorizeError::Token(TokenError::Biscuit(format!(
                    "{} activation counts for {} blocks",
                    c.len(),
                    self.blocks.len()
                ))))
            }
            None => {
                ones = vec![1; self.blocks.len()];
                &ones[..]
            }
        };
        for b in &self.blocks {
            check_block_call(b.index, &b.caveats, req, call, counts[b.index])
                .map_err(AuthorizeError::Refused)?;
        }
        self.authorize_datalog(req, call, counts, limits)
    }

    /// Only the Biscuit Datalog evaluation, skipping the pure check. For tests and the spec
    /// vectors, which show that the Datalog layer enforces every caveat on its own; the
    /// proxy calls [`VerifiedToken::authorize`].
    #[doc(hidden)]
    pub fn authorize_datalog_only(
        &self,
        req: &RequestFacts<'_>,
        counts: &[u64],
        limits: &Limits,
    ) -> Result<(), AuthorizeError> {
        self.authorize_datalog_only_call(req, &CallFacts::default(), counts, limits)
    }

    /// [`VerifiedToken::authorize_datalog_only`] with per-call facts.
    #[doc(hidden)]
    pub fn authorize_datalog_only_call(
        &self,
        req: &RequestFacts<'_>,
        call: &CallFacts,
        counts: &[u64],
        limits: &Limits,
    ) -> Result<(), AuthorizeError> {
        if counts.len() != self.blocks.len() {
            return Err(AuthorizeError::Token(TokenError::Biscuit(format!(
                "{} activation counts for {} blocks",
                counts.len(),
                self.blocks.len()
            ))));
        }
        self.authorize_datalog(req, call, counts, limits)
    }

    fn authorize_datalog(
        &self,
        req: &RequestFacts<'_>,
        call: &CallFacts,
        counts: &[u64],
        limits: &Limits,
    ) -> Result<(), AuthorizeError> {
        let now = UNIX_EPOCH + Duration::from_secs(req.now.max(0) as u64);
        let mut builder = AuthorizerBuilder::new()
            .fact(fact("till_upstream", &[string(req.upstream)]))
            .and_then(|b| b.fact(fact("till_method", &[string(req.method)])))
            .and_then(|b| b.fact(fact("till_path", &[string(req.path)])))
            .and_then(|b| b.fact(fact("time", &[date(&now)])))
            .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?;
        if let Some(model) = req.model {
            builder = builder
                .fact(fact("till_model", &[string(model)]))
                .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?;
        }
        for (i, n) in counts.iter().enumerate() {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            builder = builder
                .fact(fact("till_activation", &[int(i as i64), int(n)]))
                .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?;
        }
        let clamp = |v: u64| int(i64::try_from(v).unwrap_or(i64::MAX));
        let mut facts = Vec::new();
        if let Some(t) = call.max_output_tokens {
            facts.push(fact("till_max_output_tokens", &[clamp(t)]));
        }
        if let Some(a) = call.amount {
            facts.push(fact("till_amount", &[clamp(a)]));
        }
        if let Some(c) = &call.currency {
            facts.push(fact("till_currency", &[string(c)]));
        }
        if let Some(r) = &call.repo {
            facts.push(fact("till_repo", &[string(r)]));
        }
        for (pointer, v) in &call.json {
            facts.push(match v {
                JsonFact::Int(i) => fact("till_json_int", &[string(pointer), int(*i)]),
                JsonFact::Str(s) => fact("till_json_str", &[string(pointer), string(s)]),
            });
        }
        // Windowed caps are the ledger's decision (spec/ledger.md); the Datalog sees the
        // least count any claim produces, like scope-only cap checks.
        for b in &self.blocks {
            for w in b.caveats.windows.iter().flatten() {
                facts.push(fact(
                    "till_window",
                    &[int(b.index as i64), clamp(w.secs), int(1)],
                ));
            }
        }
        for f in facts {
            builder = builder
                .fact(f)
                .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?;
        }
        let run_limits = AuthorizerLimits {
            max_facts: limits.max_facts,
            max_iterations: limits.max_iterations,
            max_time: limits.max_time,
        };
        let mut authorizer = builder
            .policy("allow if true")
            .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?
            .set_limits(run_limits.clone())
            .build(self.token.biscuit())
            .map_err(|e| AuthorizeError::Token(biscuit_err(e)))?;
        match authorizer.authorize_with_limits(run_limits) {
            Ok(_) => Ok(()),
            Err(biscuit_auth::error::Token::FailedLogic(logic)) => {
                let block = failed_block(&logic).unwrap_or(0);
                Err(AuthorizeError::Refused(Refusal {
                    block,
                    caveat: CaveatKind::Datalog,
                    code: "key_check_failed",
                    message: format!("block {block} of this key refused the request"),
                }))
            }
            Err(e) => Err(AuthorizeError::Refused(Refusal {
                block: 0,
                caveat: CaveatKind::Datalog,
                code: "key_evaluation_limit",
                message: format!("key evaluation stopped: {e}"),
            })),
        }
    }
}

/// Authorization outcome other than success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorizeError {
    /// A caveat refused the request.
    #[error(transparent)]
    Refused(Refusal),
    /// The key could not be evaluated.
    #[error(transparent)]
    Token(TokenError),
}

fn failed_block(logic: &biscuit_auth::error::Logic) -> Option<usize> {
    use biscuit_auth::error::{FailedCheck, Logic};
    let checks = match logic {
        Logic::Unauthorized { checks, .. } | Logic::NoMatchingPolicy { checks } => checks,
        _ => return None,
    };
    checks.iter().find_map(|c| match c {
        FailedCheck::Block(b) => Some(b.block_id as usize),
        FailedCheck::Authorizer(_) => None,
    })
}

/// The pure evaluation of one block's caveats. Order is fixed (and documented) so the code
/// a client sees is stable: upstream, expiry, method, path, model, cap, then the per-call
/// caveats (which refuse here, since no per-call facts are given: see [`check_block_call`]).
pub fn check_block(
    block: usize,
    c: &Caveats,
    req: &RequestFacts<'_>,
    count: u64,
) -> Result<(), Refusal> {
    check_block_call(block, c, req, &CallFacts::default(), count)
}

/// [`check_block`] with the per-call facts. Order: upstream, expiry, method, path, model,
/// cap, repos, max_output_tokens, amount, currencies, json_max, json_allow (windows are
/// the ledger's; a window cap is at least 1, so the least count never exceeds it).
pub fn check_block_call(
    block: usize,
    c: &Caveats,
    req: &RequestFacts<'_>,
    call: &CallFacts,
    count: u64,
) -> Result<(), Refusal> {
    let refuse = |caveat, code, message: String| {
        Err(Refusal {
            block,
            caveat,
            code,
            message,
        })
    };
    if let Some(u) = &c.upstream {
        if u != req.upstream {
            return refuse(
                CaveatKind::Upstream,
                "upstream_not_allowed",
                format!("this key is for upstream `{u}`, not `{}`", req.upstream),
            );
        }
    }
    if let Some(e) = c.expires {
        if req.now > e {
            let when = rfc3339(e).unwrap_or_else(|_| e.to_string());
            return refuse(
                CaveatKind::Expires,
                "key_expired",
                format!("this key expired at {when}"),
            );
        }
    }
    if let Some(ms) = &c.methods {
        if !ms.iter().any(|m| m == req.method) {
            return refuse(
                CaveatKind::Methods,
                "method_not_allowed",
                format!(
                    "method {} is not allowed by this key (allowed: {})",
                    req.method,
                    ms.join(", ")
                ),
            );
        }
    }
    if let Some(ps) = &c.paths {
        if !ps.iter().any(|p| path_matches(p, req.path)) {
            return refuse(
                CaveatKind::Paths,
                "path_not_allowed",
                format!(
                    "this path is outside the key's allowed paths ({})",
                    ps.join(", ")
                ),
            );
        }
    }
    if let Some(ms) = &c.models {
        match req.model {
            None => {
                return refuse(
                    CaveatKind::Models,
                    "model_required",
                    format!(
                        "this key is limited to models ({}); the request body must be JSON with a `model` field",
                        ms.join(", ")
                    ),
                )
            }
            Some(m) if !ms.iter().any(|x| x == m) => {
                return refuse(
                    CaveatKind::Models,
                    "model_not_allowed",
                    format!("model `{m}` is not allowed by this key (allowed: {})", ms.join(", ")),
                )
            }
            Some(_) => {}
        }
    }
    if let Some(cap) = c.cap {
        if count > cap {
            return refuse(
                CaveatKind::Cap,
                "activation_limit_reached",
                format!("this key has used all {cap} of its activations (block {block})"),
            );
        }
    }
    check_call(block, c, call)
}

fn check_call(block: usize, c: &Caveats, call: &CallFacts) -> Result<(), Refusal> {
    let refuse = |caveat, code, message: String| {
        Err(Refusal {
            block,
            caveat,
            code,
            message,
        })
    };
    if let Some(rs) = &c.repos {
        match &call.repo {
            Some(r) if rs.contains(r) => {}
            _ => {
                return refuse(
                    CaveatKind::Repos,
                    "repo_not_allowed",
                    format!(
                        "this key is limited to repositories ({}); the path must be /repos/{{owner}}/{{name}}/... of one of them",
                        rs.join(", ")
                    ),
                )
            }
        }
    }
    if let Some(max) = c.max_output_tokens {
        match call.max_output_tokens {
            None => {
                return refuse(
                    CaveatKind::MaxOutputTokens,
                    "max_output_tokens_required",
                    format!("this key allows at most {max} output tokens per call; set max_tokens (or your API's output-token limit) to {max} or less"),
                )
            }
            Some(t) if t > max => {
                return refuse(
                    CaveatKind::MaxOutputTokens,
                    "max_output_tokens_exceeded",
                    format!("this request asks for {t} output tokens; this key allows at most {max} per call"),
                )
            }
            Some(_) => {}
        }
    }
    if let Some(max) = c.amount_max {
        match call.amount {
            None => {
                return refuse(
                    CaveatKind::Amount,
                    "amount_required",
                    format!("this key allows an amount of at most {max} per call; the form body must state `amount`"),
                )
            }
            Some(a) if a > max => {
                return refuse(
                    CaveatKind::Amount,
                    "amount_exceeded",
                    format!("amount {a} is above this key's ceiling of {max} per call"),
                )
            }
            Some(_) => {}
        }
    }
    if let Some(cs) = &c.currencies {
        match &call.currency {
            None => {
                return refuse(
                    CaveatKind::Currencies,
                    "currency_required",
                    format!(
                    "this key is limited to currencies ({}); the form body must state `currency`",
                    cs.join(", ")
                ),
                )
            }
            Some(x) if !cs.contains(x) => {
                return refuse(
                    CaveatKind::Currencies,
                    "currency_not_allowed",
                    format!(
                        "currency `{x}` is not allowed by this key (allowed: {})",
                        cs.join(", ")
                    ),
                )
            }
            Some(_) => {}
        }
    }
    for (pointer, &max) in c.json_max.iter().flatten() {
        match call.json.get(pointer) {
            Some(JsonFact::Int(v)) if i128::from(*v) <= i128::from(max) => {}
            Some(JsonFact::Int(v)) => {
                return refuse(
                    CaveatKind::JsonMax,
                    "json_field_exceeded",
                    format!("{pointer} is {v}; this key allows at most {max}"),
                )
            }
            _ => {
                return refuse(
                    CaveatKind::JsonMax,
                    "json_field_required",
                    format!("this key requires the JSON body member {pointer} as an integer of at most {max}"),
                )
            }
        }
    }
    for (pointer, allowed) in c.json_allow.iter().flatten() {
        match call.json.get(pointer) {
            Some(JsonFact::Str(v)) if allowed.contains(v) => {}
            Some(JsonFact::Str(_)) => {
                return refuse(
                    CaveatKind::JsonAllow,
                    "json_field_not_allowed",
                    format!(
                        "{pointer} is not one of the values this key allows ({})",
                        allowed.join(", ")
                    ),
                )
            }
            _ => {
                return refuse(
                    CaveatKind::JsonAllow,
                    "json_field_required",
                    format!(
                        "this key requires the JSON body member {pointer} as one of ({})",
                        allowed.join(", ")
                    ),
                )
            }
        }
    }
    Ok(())
}
