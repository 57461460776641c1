//! What the fleet test reads out of the `till` command line's JSON. Shared (by `#[path]`)
//! with `tests/cli/fleet_shapes.rs`, which checks these accessors against the real CLI on
//! the embedded ledger in the suite CI runs, so the gated fleet test cannot drift from the
//! CLI's output again (issue 15: it read `receipts` at the top level of `till audit
//! --json`, which nests it under `report`).
#![allow(dead_code)]

use serde_json::Value;

/// `till audit --json` → `clean`.
pub fn audit_clean(audit: &Value) -> Option<bool> {
    audit["clean"].as_bool()
}

/// `till audit --json` → the number of receipts in the family's chain.
pub fn audit_receipts(audit: &Value) -> Option<u64> {
    audit["report"]["receipts"].as_u64()
}

/// `till usage --json` → activations used through block `index` of the key.
pub fn usage_used(usage: &Value, index: usize) -> Option<u64> {
    usage["blocks"][index]["used"].as_u64()
}

/// `till usage --json` → whether block `index` of the key is revoked.
pub fn usage_revoked(usage: &Value, index: usize) -> Option<bool> {
    usage["blocks"][index]["revoked"].as_bool()
}

/// The fleet test's `till.toml` for one proxy: listen address, the ledger (as the
/// `[ledger]` table `ledger_table` holds, e.g. `backend = "fdb"\ncluster_file = "..."`)
/// and one generic-bearer upstream whose credential is in `TILL_FLEET_UPSTREAM_SECRET`.
pub fn proxy_config(listen: &str, upstream: &str, ledger_table: &str) -> String {
    format!(
        "listen = \"{listen}\"\n\
         \n\
         [ledger]\n\
         {ledger_table}\n\
         \n\
         [upstreams.up]\n\
         preset = \"generic\"\n\
         base_url = \"http://{upstream}\"\n\
         credential_env = \"TILL_FLEET_UPSTREAM_SECRET\"\n\
         auth = {{ header = \"authorization\", scheme = \"Bearer\" }}\n"
    )
}
