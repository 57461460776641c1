//! A client of a running server's admin API: [`RemoteLedger`] implements the
//! [`Ledger`] read and revoke operations over HTTP, so `till revoke`, `usage`, `audit` and
//! `receipt list` work unchanged while `till serve` holds the embedded ledger; [`watch`]
//! follows the live event stream.
//!
//! Claims never go through the admin API (they are the proxy's job), and alert leasing is
//! the server's own deliverer's: those operations answer [`LedgerError::Unavailable`].

use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use till_ledger::{
    AlertOutcome, AlertRecord, BoxFuture, Claim, ClaimRequest, FamilyDetail, FamilyView, KeyBlocks,
    Ledger, LedgerError, Level, LevelUsage, Receipt, Refusal, Revoked,
};

/// File in the data dir where `till serve` announces its admin API.
pub const DISCOVERY_FILE: &str = "admin.json";

/// What `till serve` writes to `<data dir>/admin.json` while it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Discovery {
    /// Base URL of the admin API, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// The server's process id.
    pub pid: u32,
}

/// The admin API of a running server, as a [`Ledger`].
pub struct RemoteLedger {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for RemoteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLedger")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl RemoteLedger {
    /// A client of the admin API at `base` (e.g. `http://127.0.0.1:8081`), authenticating
    /// with the admin key `key`.
    pub fn new(base: &str, key: &str) -> Result<Self, LedgerError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| LedgerError::Unavailable(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            key: key.trim().to_string(),
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<serde_json::Value>, LedgerError> {
        let resp = req
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| {
                LedgerError::Unavailable(format!(
                    "the admin API at {} did not answer ({})",
                    self.base,
                    if e.is_connect() {
                        "connection refused"
                    } else {
                        "request failed"
                    }
                ))
            })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| LedgerError::Unavailable(format!("admin API answer cut short: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map(Some).map_err(|e| {
                LedgerError::Unavailable(format!("admin API answer is not JSON: {e}"))
            });
        }
        let detail = serde_json::from_slice::<ErrorBody>(&body).ok();
        if status == reqwest::StatusCode::NOT_FOUND
            && detail
                .as_ref()
                .is_some_and(|d| d.error.code == "family_not_found")
        {
            return Ok(None);
        }
        let what = detail
            .map(|d| format!("{}: {}", d.error.code, d.error.message))
            .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        Err(match status.as_u16() {
            400 => LedgerError::InvalidRequest(what),
            _ => {
                LedgerError::Unavailable(format!("the admin API at {} refused: {what}", self.base))
            }
        })
    }

    async fn get(&self, path: &str) -> Result<Option<serde_json::Value>, LedgerError> {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<Option<serde_json::Value>, LedgerError> {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.call(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(bytes),
        )
        .await
    }
}

fn field<T: serde::de::DeserializeOwned>(
    v: Option<serde_json::Value>,
    name: &str,
) -> Result<T, LedgerError> {
    let v =
        v.ok_or_else(|| LedgerError::Unavailable("unexpected 404 from the admin API".into()))?;
    serde_json::from_value(v.get(name).cloned().unwrap_or_default())
        .map_err(|e| LedgerError::Unavailable(format!("admin API answer: `{name}`: {e}")))
}

fn unsupported<T>(what: &str) -> Result<T, LedgerError> {
    Err(LedgerError::Unavailable(format!(
        "{what} is not available through the admin API"
    )))
}

impl Ledger for RemoteLedger {
    fn claim(
        &self,
        _req: ClaimRequest,
    ) -> BoxFuture<'_, Result<Result<Claim, Refusal>, LedgerError>> {
        Box::pin(async { unsupported("claiming") })
    }

    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        let id = hex::encode(revocation_id);
        Box::pin(async move {
            let v = self
                .post("/admin/v1/revoke", json!({ "revocation_id": id }))
                .await?;
            Ok(Revoked {
                newly: field(v.clone(), "newly_revoked")?,
                family: field(v, "family")?,
                alert: None,
            })
        })
    }

    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        let ids: Vec<String> = levels
            .iter()
            .map(|l| hex::encode(&l.revocation_id))
            .collect();
        Box::pin(async move {
            #[derive(Deserialize)]
            struct Row {
                revocation_id: String,
                used: u64,
                revoked: bool,
            }
            let v = self
                .post("/admin/v1/usage", json!({ "revocation_ids": ids }))
                .await?;
            let rows: Vec<Row> = field(v, "blocks")?;
            rows.into_iter()
                .map(|r| {
                    Ok(LevelUsage {
                        revocation_id: hex::decode(&r.revocation_id).map_err(|_| {
                            LedgerError::Unavailable("admin API answered a bad id".into())
                        })?,
                        used: r.used,
                        revoked: r.revoked,
                    })
                })
                .collect()
        })
    }

    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        let fam = hex::encode(family);
        Box::pin(async move {
            #[derive(Deserialize)]
            struct Row {
                receipt: String,
            }
            let mut out = Vec::new();
            let mut after = from_seq.saturating_sub(1);
            while out.len() < limit {
                let page = (limit - out.len()).min(crate::api::MAX_PAGE);
                let v = self
                    .get(&format!(
                        "/admin/v1/families/{fam}/receipts?after={after}&limit={page}"
                    ))
                    .await?;
                if v.is_none() {
                    break;
                }
                let rows: Vec<Row> = field(v, "receipts")?;
                let n = rows.len();
                for r in rows {
                    let receipt = Receipt::parse(&r.receipt).map_err(|e| {
                        LedgerError::Corrupt(format!("admin API sent an unreadable receipt: {e}"))
                    })?;
                    after = receipt.body().seq;
                    out.push(receipt);
                }
                if n < page {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn checkpoints(
        &self,
        family: &[u8],
    ) -> BoxFuture<'_, Result<Vec<till_ledger::retention::Checkpoint>, LedgerError>> {
        let fam = hex::encode(family);
        Box::pin(async move {
            let v = self
                .get(&format!("/admin/v1/families/{fam}/checkpoints"))
                .await?;
            // A family the server does not know has no checkpoints.
            if v.is_none() {
                return Ok(Vec::new());
            }
            field(v, "checkpoints")
        })
    }

    fn record_key(&self, _key: KeyBlocks, _at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(async { unsupported("recording keys") })
    }

    fn families(&self, _now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        Box::pin(async move { field(self.get("/admin/v1/families").await?, "families") })
    }

    fn family(
        &self,
        family: &[u8],
        _now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        let fam = hex::encode(family);
        Box::pin(async move {
            let Some(v) = self.get(&format!("/admin/v1/families/{fam}")).await? else {
                return Ok(None);
            };
            Ok(Some(FamilyDetail {
                family: field(Some(v.clone()), "family")?,
                blocks: field(Some(v), "blocks")?,
            }))
        })
    }

    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(async move {
            field(
                self.get(&format!("/admin/v1/alerts?limit={}", limit.clamp(1, 1000)))
                    .await?,
                "alerts",
            )
        })
    }

    fn lease_alerts(
        &self,
        _now: u64,
        _lease_secs: u64,
        _limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(async { unsupported("leasing alerts") })
    }

    fn settle_alert(
        &self,
        _id: &str,
        _outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(async { unsupported("settling alerts") })
    }
}

/// One SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// `event:` (claim, refusal, revocation, alert, lagged).
    pub kind: String,
    /// `data:` (JSON).
    pub data: String,
}

/// Follows `/admin/v1/events` (optionally one family), calling `on_event` for each event
/// until the stream ends or `on_event` returns false.
pub async fn watch(
    base: &str,
    key: &str,
    family: Option<&str>,
    mut on_event: impl FnMut(StreamEvent) -> bool,
) -> Result<(), LedgerError> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
    let mut url = format!("{}/admin/v1/events", base.trim_end_matches('/'));
    if let Some(f) = family {
        url.push_str(&format!("?family={f}"));
    }
    let resp = http
        .get(&url)
        .bearer_auth(key.trim())
        .send()
        .await
        .map_err(|_| LedgerError::Unavailable(format!("the admin API at {base} did not answer")))?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        return Err(LedgerError::Unavailable(format!(
            "the admin API refused the event stream (HTTP {status}): {body}"
        )));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut kind = String::new();
    let mut data = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| LedgerError::Unavailable("event stream broke".into()))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() {
                    let ev = StreamEvent {
                        kind: std::mem::take(&mut kind),
                        data: std::mem::take(&mut data),
                    };
                    if !on_event(ev) {
                        return Ok(());
                    }
                }
                kind.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.trim_start());
            }
        }
    }
    Ok(())
}
