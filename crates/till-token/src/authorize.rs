//! Authorization of one request against a verified key.
//!
//! Two evaluations that must agree: a pure one over the declared caveats (which names the
//! refusing block and caveat), then the Biscuit Datalog checks themselves with explicit
//! run limits. Canonical blocks make them equivalent; the Datalog run is defence in depth.

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
            check_block(b.index, &b.caveats, req, counts[b.index])
                .map_err(AuthorizeError::Refused)?;
        }
        self.authorize_datalog(req, counts, limits)
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
        if counts.len() != self.blocks.len() {
            return Err(AuthorizeError::Token(TokenError::Biscuit(format!(
                "{} activation counts for {} blocks",
                counts.len(),
                self.blocks.len()
            ))));
        }
        self.authorize_datalog(req, counts, limits)
    }

    fn authorize_datalog(
        &self,
        req: &RequestFacts<'_>,
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
/// a client sees is stable: upstream, expiry, method, path, model, cap.
pub fn check_block(
    block: usize,
    c: &Caveats,
    req: &RequestFacts<'_>,
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
    Ok(())
}
