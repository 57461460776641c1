//! `till`: mint, attenuate, inspect and serve Till keys.
//!
//! Exit codes (also in README):
//! - 0: success
//! - 1: runtime error (I/O, ledger, network)
//! - 2: usage or configuration error
//! - 3: a key, receipt or audit did not verify
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;

/// mimalloc instead of glibc malloc: the proxy allocates on every request (hyper, reqwest,
/// JSON, receipts) from several threads at once; see benches/RESULTS.md for the effect.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod cli;
mod credential;
mod datadir;
#[cfg(feature = "fdb")]
mod fleet;
mod input;
mod keys;
mod keys_cmd;
mod ledger_check;
mod ledger_cmds;
mod mock;
mod receipts_export;
mod registry;
mod reload;
mod retention_task;
mod serve;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let result = cli::run(args);
    #[cfg(feature = "fdb")]
    fleet::shutdown();
    match result {
        Ok(code) => code,
        Err(err) => {
            let code = err
                .downcast_ref::<cli::Failure>()
                .map(|f| f.exit_code())
                .unwrap_or(cli::EXIT_RUNTIME);
            eprintln!("till: error: {err:#}");
            ExitCode::from(code)
        }
    }
}
