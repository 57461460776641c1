//! `till serve`: run the proxy with the data dir's keys and embedded ledger.
//!
//! Config file: `--config`, else `$TILL_CONFIG`, else `<data dir>/till.toml` if it exists,
//! else none (every preset whose credential variable is set is enabled). Precedence and
//! keys: `spec/config.md`. Exit codes: 0 clean shutdown or valid config
//! (`--check-config`), 2 invalid config, 1 runtime failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use till_ledger::{EmbeddedConfig, Ledger, RetentionStore};
use till_proxy::config::LedgerChoice;
use till_proxy::config::ENV_CONFIG;
use till_proxy::preset::ENV_PRESETS;
use till_proxy::retention_config::RetentionSettings;
use till_proxy::{Config, Overrides, SystemEnv};
use till_token::KeyRing;

use crate::cli::Failure;
use crate::datadir::DataDir;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Arguments of `till serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Config file (default: $TILL_CONFIG, else <data dir>/till.toml if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// This proxy's id in receipts.
    #[arg(long, value_name = "ID")]
    pub proxy_id: Option<String>,
    /// Ledger: `embedded` (default; the data dir's ledger.redb) or `fdb[:CLUSTER_FILE]`
    /// (a FoundationDB cluster shared by a fleet; needs a build with `--features fdb`).
    #[arg(long, value_name = "LEDGER")]
    pub ledger: Option<String>,
    /// FoundationDB key space (default `till`; also $TILL_FDB_KEYSPACE or `[ledger]
    /// keyspace`): proxies of one fleet share it, other deployments on the cluster use
    /// their own.
    #[arg(long, value_name = "NAME")]
    pub keyspace: Option<String>,
    /// Admin API listen address (default 127.0.0.1:8081; `none` disables the admin plane).
    #[arg(long, value_name = "ADDR|none")]
    pub admin_listen: Option<String>,
    /// Validate the configuration, print a summary and exit (0 valid, 2 invalid).
    #[arg(long, short = 't')]
    pub check_config: bool,
    /// Log format (logs go to stderr; filter with $TILL_LOG, default `info`).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Runs the proxy until SIGINT or SIGTERM.
pub fn run(args: ServeArgs, dir: Option<&Path>) -> Result<ExitCode> {
    let data = DataDir::resolve(dir)?;
    let file = args
        .config
        .clone()
        .or_else(|| {
            std::env::var_os(ENV_CONFIG)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| Some(data.path().join("till.toml")).filter(|p| p.exists()));
    let flags = Overrides {
        listen: args.listen.clone(),
        proxy_id: args.proxy_id.clone(),
        ledger: args.ledger.clone(),
        keyspace: args.keyspace.clone(),
        admin_listen: args.admin_listen.clone(),
    };
    let config = Config::load(file.as_deref(), &flags, &SystemEnv).map_err(Failure::usage_from)?;
    // `credential = "store:NAME"`: decrypt now, so a wrong master key or a tampered store
    // is a startup (and --check-config) error naming the record, exit 2.
    crate::reload::resolve_store_credentials(&config, &data)
        .map_err(|e| Failure::usage(format!("{e:#}")))?;
    if args.check_config {
        println!(
            "config OK{}",
            file.as_deref()
                .map(|f| format!(" ({})", f.display()))
                .unwrap_or_else(|| " (no file; defaults and environment)".into())
        );
        println!("listen: {}", config.listen);
        println!("proxy id: {}", config.proxy_id);
        println!("ledger: {}", describe_ledger(&config.ledger));
        println!("admin: {}", describe_admin(&config));
        println!("alerts: {}", describe_alerts(&config));
        println!(
            "{}",
            describe_retention(&config, &data)
                .unwrap_or_else(|| "retention: none (receipts are kept)".into())
        );
        if !config.trusted_root_keys.is_empty() {
            let ids: Vec<String> = config
                .trusted_root_keys
                .iter()
                .map(|k| k.id().to_string())
                .collect();
            println!("trusted root keys (till.toml): {}", ids.join(", "));
        }
        print_upstreams(&config);
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(args.log_format);
    data.init()?;
    crate::admin::ensure_admin_key(&data)?;
    // One ring for the proxy and the admin plane: a reload swaps its contents for both.
    let keys = KeyRing::new();
    keys.replace(crate::reload::trusted_roots(
        &data,
        &config.trusted_root_keys,
    )?);
    let config_roots = config.trusted_root_keys.clone();
    let signer = Arc::new(data.receipt_signer()?);
    let mut ledger_config = EmbeddedConfig::new(Arc::clone(&signer), config.proxy_id.clone());
    ledger_config.claim_timeout = config.limits.ledger_claim_timeout;
    ledger_config.alerts = config.alerts.policy.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut embedded: Option<Arc<till_ledger::EmbeddedLedger>> = None;
        let (ledger, retention_store): (Arc<dyn Ledger>, Arc<dyn RetentionStore>) = match &config.ledger {
            LedgerChoice::Fdb {
                cluster_file,
                keyspace,
            } => {
                crate::ledger_cmds::open_fdb(
                    Arc::clone(&signer),
                    cluster_file.clone(),
                    keyspace,
                    &config.proxy_id,
                    config.alerts.policy.clone(),
                )
                .await?
            }
            // The data dir's own ledger, after its id and an integrity check (a damaged,
            // emptied or foreign ledger.redb is refused, never started over).
            _ => {
                let opened = Arc::new(crate::ledger_check::open_embedded(&data, ledger_config, true)?);
                embedded = Some(Arc::clone(&opened));
                (Arc::clone(&opened) as Arc<dyn Ledger>, opened)
            }
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let signal = shutdown_signal()?;
        let mut hangups = reload_signal()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = stop_tx.send(true);
        });
        let admin_listener = match config.admin.listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a} (admin API; `--admin-listen none` disables it)"))?,
            ),
            None => None,
        };
        println!("till data dir: {}", data.path().display());
        println!("listening on http://{addr}");
        match &admin_listener {
            Some(l) => println!(
                "admin API on http://{}/admin/v1 (admin key: {})",
                l.local_addr()?,
                data.path().join(crate::admin::ADMIN_KEY).display()
            ),
            None => println!("admin API: disabled"),
        }
        println!("ledger: {}", describe_ledger(&config.ledger));
        if let Some(line) = describe_retention(&config, &data) {
            println!("{line}");
        }
        print_upstreams(&config);
        match config.upstreams.keys().next() {
            Some(first) => {
                let dir_flag = dir.map(|d| format!(" --dir {}", d.display())).unwrap_or_default();
                println!("mint a first key: till{dir_flag} mint --upstream {first} --cap 100 --ttl 24h");
                println!("then point the SDK's base URL at http://{addr}/{first} and use the key as its API key");
            }
            None => {
                let vars: Vec<&str> = ENV_PRESETS.iter().filter_map(|p| p.credential_env()).collect();
                println!(
                    "no upstream enabled: set one of {} (then restart), or add [upstreams.<name>] to {}",
                    vars.join(", "),
                    data.path().join("till.toml").display()
                );
            }
        }
        let alerts = config.alerts.clone();
        let retention = config.retention.clone();
        let proxy_id = config.proxy_id.clone();
        // Where receipts are exported (by `[retention]`, else by hand with `till receipts
        // export`'s default): admin-plane audits read pruned receipts back from there.
        let export_dir = retention
            .as_ref()
            .map_or_else(|| crate::receipts_export::export_dir(&data, None), |s| retention_dir(s, &data));
        let app = config.build(keys.clone(), Arc::clone(&ledger)).map_err(Failure::usage_from)?;
        // `[retention]`: export and prune in the background, never on the request path.
        let retention_task = retention.map(|settings| {
            crate::retention_task::RetentionTask {
                store: retention_store,
                holder: proxy_id.clone(),
                retention: settings.retention,
                dir: retention_dir(&settings, &data),
                interval: settings.interval,
                counters: app.state().metrics().retention().clone(),
            }
            .spawn(stop_rx.clone())
        });
        let swappable = Arc::new(crate::reload::Swappable {
            data: data.clone(),
            ring: keys.clone(),
            config_roots,
            config_source: Some((file.clone(), flags.clone())),
            embedded,
            app: Some(Arc::clone(app.state())),
        });
        let admin = match admin_listener {
            None => None,
            Some(admin_listener) => {
                let mut receipt_keys = data.receipt_key_set()?;
                receipt_keys.insert(signer.public_key());
                let plane = till_admin::AdminPlane::new(till_admin::AdminConfig {
                    ledger: Arc::clone(&ledger),
                    keys,
                    root: Some(data.root_key()?),
                    receipt_keys,
                    events: app.state().events().clone(),
                    alerts,
                    alert_counters: app.state().metrics().alerts().clone(),
                });
                plane.set_reloader(swappable.reloader());
                plane.set_export_dir(export_dir.clone());
                let admin_addr = admin_listener.local_addr()?;
                let url = format!("http://{admin_addr}");
                crate::admin::write_discovery(&data, &url)?;
                let deliverer = plane.spawn_deliverer();
                let serving = {
                    let plane = plane.clone();
                    tokio::spawn(async move { plane.serve(admin_listener).await })
                };
                Some((plane, serving, deliverer))
            }
        };
        // SIGHUP: the same reload as POST /admin/v1/reload.
        {
            let plane = admin.as_ref().map(|(plane, _, _)| plane.clone());
            let reloader = swappable.reloader();
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    let outcome = match &plane {
                        Some(plane) => plane.reload().await.map(|_| ()),
                        None => reloader().await.map(|_| ()),
                    };
                    match outcome {
                        Ok(()) => tracing::info!("SIGHUP: reloaded keys and credentials"),
                        Err(e) => tracing::warn!(error = %e, "SIGHUP: reload failed; nothing changed"),
                    }
                }
            });
        }
        let mut proxy_stop = stop_rx.clone();
        let served = app
            .serve(listener, async move {
                let _ = proxy_stop.wait_for(|s| *s).await;
            })
            .await;
        if let Some((plane, serving, deliverer)) = admin {
            plane.shutdown();
            let _ = serving.await;
            let _ = deliverer.await;
            crate::admin::remove_discovery(&data);
        }
        if let Some(task) = retention_task {
            let _ = task.await;
        }
        served?;
        tracing::info!("till stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn describe_ledger(choice: &LedgerChoice) -> String {
    match choice {
        LedgerChoice::Fdb {
            cluster_file: Some(f),
            keyspace,
        } => format!("FoundationDB ({}, key space {keyspace})", f.display()),
        LedgerChoice::Fdb {
            cluster_file: None,
            keyspace,
        } => format!("FoundationDB (default cluster file, key space {keyspace})"),
        _ => "embedded".into(),
    }
}

/// Where `[retention]` exports: its `export_dir`, else the data dir's `receipts/` (where
/// `till audit` looks by default).
fn retention_dir(settings: &RetentionSettings, data: &DataDir) -> PathBuf {
    settings
        .export_dir
        .clone()
        .unwrap_or_else(|| crate::receipts_export::export_dir(data, None))
}

fn describe_retention(config: &Config, data: &DataDir) -> Option<String> {
    let settings = config.retention.as_ref()?;
    let mut what = Vec::new();
    if let Some(keep) = settings.retention.keep {
        what.push(format!("keep {keep} per family"));
    }
    if let Some(age) = settings.retention.max_age_secs {
        what.push(format!(
            "max age {}",
            humantime::format_duration(std::time::Duration::from_secs(age))
        ));
    }
    Some(format!(
        "retention: {}, exported to {} every {}",
        what.join(", "),
        retention_dir(settings, data).display(),
        humantime::format_duration(settings.interval)
    ))
}

fn describe_admin(config: &Config) -> String {
    match config.admin.listen {
        Some(a) => format!("http://{a}/admin/v1"),
        None => "disabled".into(),
    }
}

fn describe_alerts(config: &Config) -> String {
    let p = &config.alerts.policy;
    let thresholds: Vec<String> = p.thresholds.iter().map(|t| format!("{t}%")).collect();
    format!(
        "thresholds [{}], rate ceiling {}, revocations {}, webhook {}",
        thresholds.join(", "),
        p.rate_per_minute
            .map_or("none".into(), |r| format!("{r}/min")),
        if p.revocations { "on" } else { "off" },
        config
            .alerts
            .webhook
            .as_ref()
            .map_or("none (recorded and logged only)".to_string(), |w| w
                .url
                .clone())
    )
}

fn print_upstreams(config: &Config) {
    if config.upstreams.is_empty() {
        println!("upstreams: none");
    }
    for u in config.upstreams.values() {
        println!(
            "upstream {}: {} (preset {}, credential from {})",
            u.name,
            u.base_url,
            u.preset.name(),
            u.credential_source
        );
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TILL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// SIGHUP, registered now (like the shutdown signals) so one sent right after the banner
/// is not lost. Yields once per signal.
#[cfg(unix)]
fn reload_signal() -> Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A reload already pending covers this signal too.
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}

#[cfg(not(unix))]
fn reload_signal() -> Result<tokio::sync::mpsc::Receiver<()>> {
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    Ok(rx)
}

/// Registers SIGINT/SIGTERM handlers now (before the banner announces the server, so a
/// signal sent right after it is never lost) and returns the future that completes on one.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
    }
}
