//! Reading keys and receipts from arguments or stdin (`-`).

use std::io::Read as _;

use anyhow::{Context as _, Result};

/// Largest value accepted on stdin (a key or receipt is far smaller).
const MAX_STDIN: u64 = 1024 * 1024;

/// Returns `arg`, or stdin's contents (trimmed) when `arg` is `-`.
pub fn arg_or_stdin(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.trim().to_string());
    }
    let mut buf = String::new();
    std::io::stdin()
        .take(MAX_STDIN)
        .read_to_string(&mut buf)
        .context("reading stdin")?;
    Ok(buf.trim().to_string())
}
