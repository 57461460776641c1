//! A family's page: its block tree, activity chart, latest receipts, audit, and the revoke
//! confirmation.

use std::collections::HashMap;

use maud::{html, Markup};
use serde_json::Value;
use till_ledger::family::BlockView;
use till_ledger::{BlockMeta, FamilyDetail};
use till_receipt::Receipt;

use super::chart::{activity_chart, usage_bar};
use super::layout::{csrf_field, notice, page, short_id, time, when, Nav};
use super::Viewer;

/// How many of the latest receipts a family page lists.
pub const PAGE_RECEIPTS: usize = 50;

/// The latest audit of a family, as the dashboard keeps it.
#[derive(Debug, Clone)]
pub struct AuditView {
    /// When it ran (Unix seconds).
    pub at: u64,
    /// The admin API's audit document (`{clean, report, error, mismatches}`).
    pub result: Value,
}

/// The blocks as a tree: children of each revocation id, in (index, id) order.
struct Tree<'a> {
    roots: Vec<&'a BlockView>,
    children: HashMap<&'a str, Vec<&'a BlockView>>,
}

impl<'a> Tree<'a> {
    fn of(blocks: &'a [BlockView]) -> Self {
        let known: std::collections::HashSet<&str> = blocks
            .iter()
            .map(|b| b.record.revocation_id.as_str())
            .collect();
        let mut roots = Vec::new();
        let mut children: HashMap<&str, Vec<&BlockView>> = HashMap::new();
        for b in blocks {
            match b.record.parent.as_deref() {
                Some(p) if known.contains(p) => children.entry(p).or_default().push(b),
                // A block whose parent the ledger never saw still shows, at the top.
                _ => roots.push(b),
            }
        }
        Self { roots, children }
    }

    fn children(&self, id: &str) -> &[&'a BlockView] {
        self.children.get(id).map_or(&[], Vec::as_slice)
    }

    /// `id` and every block under it, depth first.
    fn subtree(&self, id: &'a str, blocks: &'a [BlockView]) -> Vec<&'a BlockView> {
        let mut out = Vec::new();
        let mut stack: Vec<&BlockView> = blocks
            .iter()
            .filter(|b| b.record.revocation_id == id)
            .collect();
        while let Some(b) = stack.pop() {
            out.push(b);
            for c in self.children(&b.record.revocation_id).iter().rev() {
                stack.push(c);
            }
        }
        out
    }
}

/// Every block that dies with `revocation_id` (itself and its descendants the ledger
/// knows of), depth first.
pub fn doomed<'a>(blocks: &'a [BlockView], revocation_id: &'a str) -> Vec<&'a BlockView> {
    Tree::of(blocks).subtree(revocation_id, blocks)
}

pub(super) fn caveats(c: &BlockMeta, now: u64) -> Markup {
    html! {
        dl.caveats {
            @if let Some(u) = &c.upstream { dt { "upstream" } dd { (u) } }
            @if !c.methods.is_empty() { dt { "methods" } dd { (c.methods.join(", ")) } }
            @if !c.paths.is_empty() { dt { "paths" } dd { @for (i, p) in c.paths.iter().enumerate() { @if i > 0 { ", " } code { (p) } } } }
            @if !c.models.is_empty() { dt { "models" } dd { (c.models.join(", ")) } }
            @if let Some(cap) = c.cap { dt { "cap" } dd { (cap) } }
            @if let Some(e) = c.expires {
                dt { "expires" } dd { (time(e)) @if e <= now { " " span.badge.expired { "expired" } } }
            }
            @if c.upstream.is_none() && c.methods.is_empty() && c.paths.is_empty() && c.models.is_empty() && c.cap.is_none() && c.expires.is_none() {
                dt { "caveats" } dd.muted { "none added" }
            }
        }
    }
}

fn block_node(
    tree: &Tree<'_>,
    b: &BlockView,
    family: &str,
    dead_above: bool,
    viewer: &Viewer,
    now: u64,
) -> Markup {
    let dead = dead_above || b.revoked;
    let kids = tree.children(&b.record.revocation_id);
    html! {
        li {
            article.block id=(format!("b-{}", &b.record.revocation_id[..16.min(b.record.revocation_id.len())])) {
                header {
                    strong { @if b.record.index == 0 { "Root key" } @else { "Block " (b.record.index) } }
                    " " (short_id(&b.record.revocation_id))
                    @if b.revoked { " " span.badge.revoked { "revoked" } @if let Some(at) = b.revoked_at { " " span.muted { (time(at)) } } }
                    @else if dead_above { " " span.badge.revoked { "dead (ancestor revoked)" } }
                    @if b.record.minted { " " span.badge.minted title="minted or attenuated through the admin API" { "minted here" } }
                }
                (caveats(&b.record.caveats, now))
                p { (usage_bar(b.used, b.record.caveats.cap)) }
                @if viewer.can_write && !dead {
                    a.button.danger href=(format!("/families/{family}/revoke?block={}", b.record.revocation_id)) {
                        "Revoke…" span.visually-hidden { " block " (b.record.index) " " (&b.record.revocation_id[..12.min(b.record.revocation_id.len())]) }
                    }
                }
            }
            @if !kids.is_empty() {
                ul.tree {
                    @for k in kids { (block_node(tree, k, family, dead, viewer, now)) }
                }
            }
        }
    }
}

fn audit_section(family: &str, audit: Option<&AuditView>, now: u64) -> Markup {
    html! {
        section #audit aria-labelledby="audit-h" {
            h2 #audit-h { "Audit" }
            @match audit {
                None => p.muted { "Not audited since this server started: run the audit to check every receipt." },
                Some(a) => {
                    @let clean = a.result.get("clean").and_then(Value::as_bool).unwrap_or(false);
                    @let receipts = a.result.pointer("/report/receipts").and_then(Value::as_u64).unwrap_or(0);
                    p {
                        @if clean { span.badge.active { "clean" } } @else { span.badge.revoked { "problems found" } }
                        " ran at " (time(a.at)) " UTC (" (super::layout::ago(a.at, now)) ")"
                    }
                    ul.audit {
                        @if let Some(err) = a.result.get("error").and_then(Value::as_str) {
                            li.bad { "Receipt chain: " (err) }
                        } @else if receipts > 0 {
                            li { "Receipt chain verified: " (receipts) " receipts, every signature valid, no gap, no fork, no slot over its cap." }
                        } @else {
                            li { "No receipts yet." }
                        }
                        @for m in a.result.get("mismatches").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
                            li.bad { "Counter mismatch: " (m.as_str().unwrap_or("")) }
                        }
                        @if let Some(levels) = a.result.pointer("/report/levels").and_then(Value::as_array) {
                            @for l in levels {
                                li {
                                    "Level " (short_id(l.get("revocation_id").and_then(Value::as_str).unwrap_or("")))
                                    ": " (l.get("used").and_then(Value::as_u64).unwrap_or(0)) " receipts"
                                    @if let Some(c) = l.get("cap").and_then(Value::as_u64) { " of cap " (c) }
                                }
                            }
                        }
                    }
                }
            }
            form method="get" action=(format!("/families/{family}/audit")) {
                button type="submit" { @if audit.is_some() { "Re-run audit" } @else { "Run audit" } }
            }
        }
    }
}

fn receipts_table(family: &str, recent: &[Receipt]) -> Markup {
    let latest = &recent[recent.len().saturating_sub(PAGE_RECEIPTS)..];
    html! {
        section aria-labelledby="receipts-h" {
            h2 #receipts-h { "Latest receipts" }
            p {
                a.button href=(format!("/families/{family}/receipts.jsonl")) download=(format!("till-receipts-{}.jsonl", &family[..16.min(family.len())])) {
                    "Download all receipts (JSONL)"
                }
                " "
                span.muted { "Every claim and void receipt the ledger still holds (receipts pruned by retention are in its export files)." }
            }
            @if latest.is_empty() {
                p.empty { "No activation yet." }
            } @else {
                div.scroll {
                    table.receipts {
                        caption.visually-hidden { "The " (latest.len()) " latest receipts, newest first" }
                        thead { tr {
                            th.num scope="col" { "Seq" } th.num scope="col" { "Slot" } th scope="col" { "Time (UTC)" }
                            th scope="col" { "Proxy" } th scope="col" { "Method" } th scope="col" { "Path" } th scope="col" { "Model" }
                        } }
                        tbody {
                            @for r in latest.iter().rev() {
                                @let b = r.body();
                                @let slot = b.slots.last();
                                tr {
                                    td.num { (b.seq) }
                                    td.num {
                                        @if let Some(of) = b.void {
                                            span.muted title="the upstream was unreachable: this receipt gives back the slot of claim" { "void of " (of) }
                                        } @else if let Some(s) = slot {
                                            (s.slot) @if let Some(c) = s.cap { " / " (c) }
                                            @if s.block > 0 { " " span.muted { "(block " (s.block) ")" } }
                                        }
                                    }
                                    td { (time(b.iat)) }
                                    td { (b.proxy) }
                                    td { (b.request.method) }
                                    td { code { (b.request.path) } }
                                    td { (b.request.model.as_deref().unwrap_or("—")) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The family page. `recent` is the family's latest receipts, oldest first (the page
/// lists the last [`PAGE_RECEIPTS`] of them, newest first).
pub fn render_family(
    detail: &FamilyDetail,
    recent: &[Receipt],
    audit: Option<&AuditView>,
    viewer: &Viewer,
    now: u64,
    message: Option<Markup>,
) -> Markup {
    let f = &detail.family;
    let tree = Tree::of(&detail.blocks);
    let title = f.label.clone().unwrap_or_else(|| "Family".to_string());
    let body = html! {
        p.crumbs { a href="/" { "Overview" } " / " (title) }
        @if let Some(m) = message { (m) }
        div #family-live data-live="" data-family=(f.family) {
            h1 {
                (title) " "
                @if f.revoked { span.badge.revoked { "revoked" } }
            }
            dl.facts {
                dt { "Family" } dd { code.id.wrap { (f.family) } }
                dt { "Upstream" } dd { (f.upstream.as_deref().unwrap_or("—")) }
                dt { "Used" } dd { (usage_bar(f.used, f.cap)) }
                dt { "Remaining" } dd { @if let Some(r) = f.remaining { (r) } @else { "∞ (uncapped)" } }
                dt { "Last activation" } dd { (when(f.last_activation, now)) }
                dt { "Expires" } dd { @if let Some(e) = f.expires { (time(e)) } @else { "never" } }
                dt { "Last minute / hour" } dd { (f.activity.last_minute) " / " (f.activity.last_hour) }
            }
            section aria-labelledby="chart-h" {
                h2 #chart-h { "Activations per minute" }
                (activity_chart(&f.activity.per_minute))
            }
            section aria-labelledby="tree-h" {
                h2 #tree-h { "Keys in this family" }
                p.muted { "The root key and the attenuated keys the ledger has seen (at their first call, or minted here). Revoking a block kills it and every key derived from it." }
                ul.tree.top {
                    @for r in &tree.roots { (block_node(&tree, r, &f.family, false, viewer, now)) }
                }
            }
            (receipts_table(&f.family, recent))
            (audit_section(&f.family, audit, now))
        }
    };
    page(&title, Nav::Overview, Some(viewer), body)
}

/// "Revoke this block?": what will die, and the form that does it.
pub fn render_revoke_confirm(
    detail: &FamilyDetail,
    revocation_id: &str,
    viewer: &Viewer,
    now: u64,
) -> Markup {
    let f = &detail.family;
    let doomed = doomed(&detail.blocks, revocation_id);
    let title = f.label.clone().unwrap_or_else(|| "Family".to_string());
    let body = html! {
        p.crumbs { a href="/" { "Overview" } " / " a href=(format!("/families/{}", f.family)) { (title) } " / revoke" }
        h1 { "Revoke this key?" }
        @if doomed.is_empty() {
            (notice("error", "This block is not part of this family."))
        } @else {
            p { "Revoking is permanent. These keys stop working at their next request, on every proxy that shares this ledger:" }
            ul.doomed {
                @for b in &doomed {
                    li {
                        strong { @if b.record.index == 0 { "Root key" } @else { "Block " (b.record.index) } }
                        " " (short_id(&b.record.revocation_id)) " — " (usage_bar(b.used, b.record.caveats.cap))
                        @if b.revoked { " " span.badge.revoked { "already revoked" } }
                        (caveats(&b.record.caveats, now))
                    }
                }
            }
            p.muted { "…and any key derived from these offline that the ledger has not seen yet." }
            form method="post" action=(format!("/families/{}/revoke", f.family)) {
                (csrf_field(viewer))
                input type="hidden" name="revocation_id" value=(revocation_id);
                button.danger type="submit" { "Revoke " (doomed.len()) @if doomed.len() == 1 { " key" } @else { " keys" } }
                " "
                a href=(format!("/families/{}", f.family)) { "Cancel" }
            }
        }
    };
    page("Revoke", Nav::Overview, Some(viewer), body)
}

/// Appends receipts as JSON lines (the admin API's receipt objects), for the download.
pub fn write_receipts_jsonl(receipts: &[Receipt], out: &mut Vec<u8>) {
    for r in receipts {
        let line = crate::api::receipt_json(r);
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use till_ledger::family::{Activity, BlockRecord};
    use till_ledger::FamilyView;

    fn block(id: &str, index: u32, parent: Option<&str>, revoked: bool) -> BlockView {
        BlockView {
            record: BlockRecord {
                family: "r".into(),
                revocation_id: id.into(),
                index,
                parent: parent.map(str::to_string),
                caveats: BlockMeta {
                    cap: Some(10),
                    ..BlockMeta::default()
                },
                recorded_at: 0,
                minted: false,
            },
            used: 1,
            remaining: Some(9),
            revoked,
            revoked_at: None,
        }
    }

    fn detail() -> FamilyDetail {
        FamilyDetail {
            family: FamilyView {
                family: "r".into(),
                label: Some("bot".into()),
                upstream: Some("openai".into()),
                cap: Some(10),
                used: 1,
                remaining: Some(9),
                revoked: false,
                expires: None,
                recorded_at: 0,
                minted: false,
                first_activation: None,
                last_activation: None,
                blocks: 4,
                activity: Activity::default(),
            },
            blocks: vec![
                block("r", 0, None, false),
                block("a", 1, Some("r"), true),
                block("b", 1, Some("r"), false),
                block("a2", 2, Some("a"), false),
            ],
        }
    }

    #[test]
    fn revoking_a_block_takes_its_subtree() {
        let d = detail();
        let ids = |id| {
            doomed(&d.blocks, id)
                .iter()
                .map(|b| b.record.revocation_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("a"), ["a", "a2"]);
        assert_eq!(ids("r"), ["r", "a", "a2", "b"]);
        assert_eq!(ids("b"), ["b"]);
        assert!(ids("zz").is_empty());
    }

    #[test]
    fn revoke_buttons_only_for_writers_and_live_blocks() {
        let d = detail();
        let mut v = Viewer {
            can_write: true,
            can_mint: true,
            csrf: "t".into(),
        };
        let html = render_family(&d, &[], None, &v, 0, None).into_string();
        // r and b are live; a is revoked; a2 is dead under a.
        assert_eq!(html.matches("Revoke…").count(), 2, "{html}");
        assert!(html.contains("dead (ancestor revoked)"));
        v.can_write = false;
        let html = render_family(&d, &[], None, &v, 0, None).into_string();
        assert!(!html.contains("Revoke…"));
        assert!(!html.contains("/revoke"));
    }

    #[test]
    fn confirmation_lists_what_dies() {
        let d = detail();
        let v = Viewer {
            can_write: true,
            can_mint: true,
            csrf: "tok".into(),
        };
        let html = render_revoke_confirm(&d, "a", &v, 0).into_string();
        assert!(html.contains("Revoke 2 keys"));
        assert!(html.contains(r#"name="csrf" value="tok""#));
    }
}
