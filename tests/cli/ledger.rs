//! revoke, usage, receipt verify, audit (issue #3 acceptance).
