//! The overview: every family with its usage, sortable and filterable through query
//! parameters (plain links and a GET form, so it works without JavaScript).

use std::cmp::Ordering;

use maud::{html, Markup};
use serde::Deserialize;
use till_ledger::FamilyView;

use super::chart::{percent, sparkline, usage_bar};
use super::layout::{page, short_id, when, Nav};
use super::Viewer;
use crate::api::{near_limit, FamilyFilter};

/// `GET /?label=&upstream=&near_limit=on&sort=&dir=` (unknown parameters are ignored: a
/// browser form may add some).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OverviewQuery {
    /// Case-insensitive substring of the label.
    pub label: Option<String>,
    /// Exact upstream.
    pub upstream: Option<String>,
    /// Only families at or above 80 % of their cap (any non-empty value but `false`).
    pub near_limit: Option<String>,
    /// Sort column: `label`, `upstream`, `used`, `fill` (default), `remaining`, `last`,
    /// `rate`.
    pub sort: Option<String>,
    /// `asc` or `desc` (default: descending for numbers, ascending for names).
    pub dir: Option<String>,
}

/// Sort columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Label, then id.
    Label,
    /// Upstream.
    Upstream,
    /// Activations used.
    Used,
    /// used / cap.
    Fill,
    /// Activations left.
    Remaining,
    /// Latest activation.
    Last,
    /// Activations in the last minute.
    Rate,
}

impl Sort {
    const ALL: [(Sort, &'static str); 7] = [
        (Sort::Label, "label"),
        (Sort::Upstream, "upstream"),
        (Sort::Used, "used"),
        (Sort::Fill, "fill"),
        (Sort::Remaining, "remaining"),
        (Sort::Last, "last"),
        (Sort::Rate, "rate"),
    ];

    fn parse(s: Option<&str>) -> Self {
        Self::ALL
            .iter()
            .find(|(_, n)| Some(*n) == s)
            .map_or(Sort::Fill, |(k, _)| *k)
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("fill", |(_, n)| n)
    }

    fn descending_by_default(self) -> bool {
        !matches!(self, Sort::Label | Sort::Upstream)
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl OverviewQuery {
    fn near_limit_only(&self) -> bool {
        non_empty(&self.near_limit).is_some_and(|v| v != "false" && v != "0")
    }

    fn sort(&self) -> (Sort, bool) {
        let sort = Sort::parse(non_empty(&self.sort));
        let desc = match non_empty(&self.dir) {
            Some("asc") => false,
            Some("desc") => true,
            _ => sort.descending_by_default(),
        };
        (sort, desc)
    }

    /// The API's filter for the exact-match parts (upstream, near-limit); the label is a
    /// substring search here, friendlier in a search box.
    fn filter(&self) -> FamilyFilter {
        FamilyFilter {
            label: None,
            upstream: non_empty(&self.upstream).map(str::to_string),
            near_limit: Some(self.near_limit_only()),
        }
    }

    /// The query string for a sort link: same filters, this column, the other direction
    /// when it is already the current one.
    fn sort_href(&self, column: Sort) -> String {
        let (current, desc) = self.sort();
        let dir = if current == column {
            if desc {
                "asc"
            } else {
                "desc"
            }
        } else if column.descending_by_default() {
            "desc"
        } else {
            "asc"
        };
        let mut q = vec![
            ("sort", column.name().to_string()),
            ("dir", dir.to_string()),
        ];
        if let Some(l) = non_empty(&self.label) {
            q.push(("label", l.to_string()));
        }
        if let Some(u) = non_empty(&self.upstream) {
            q.push(("upstream", u.to_string()));
        }
        if self.near_limit_only() {
            q.push(("near_limit", "on".to_string()));
        }
        let mut out = String::from("/?");
        for (i, (k, v)) in q.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&percent_encode(v));
        }
        out
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn fill(f: &FamilyView) -> f64 {
    f.cap.map_or(-1.0, |c| percent(f.used, c))
}

fn compare(a: &FamilyView, b: &FamilyView, sort: Sort) -> Ordering {
    let primary = match sort {
        Sort::Label => a
            .label
            .as_deref()
            .unwrap_or("")
            .to_lowercase()
            .cmp(&b.label.as_deref().unwrap_or("").to_lowercase()),
        Sort::Upstream => a.upstream.cmp(&b.upstream),
        Sort::Used => a.used.cmp(&b.used),
        Sort::Fill => fill(a).total_cmp(&fill(b)),
        // Uncapped families have the most left.
        Sort::Remaining => a
            .remaining
            .unwrap_or(u64::MAX)
            .cmp(&b.remaining.unwrap_or(u64::MAX)),
        Sort::Last => a.last_activation.cmp(&b.last_activation),
        Sort::Rate => a.activity.last_minute.cmp(&b.activity.last_minute),
    };
    primary.then_with(|| a.family.cmp(&b.family))
}

/// The families the query selects, in its order.
pub fn select<'a>(families: &'a [FamilyView], q: &OverviewQuery) -> Vec<&'a FamilyView> {
    let filter = q.filter();
    let label = non_empty(&q.label).map(str::to_lowercase);
    let mut out: Vec<&FamilyView> = families
        .iter()
        .filter(|f| filter.keeps(f))
        .filter(|f| {
            label.as_ref().is_none_or(|l| {
                f.label
                    .as_deref()
                    .is_some_and(|fl| fl.to_lowercase().contains(l.as_str()))
            })
        })
        .collect();
    let (sort, desc) = q.sort();
    out.sort_by(|a, b| {
        let o = compare(a, b, sort);
        if desc {
            o.reverse()
        } else {
            o
        }
    });
    out
}

/// The overview page.
pub fn render_overview(
    families: &[FamilyView],
    q: &OverviewQuery,
    viewer: &Viewer,
    now: u64,
) -> Markup {
    let shown = select(families, q);
    let mut upstreams: Vec<&str> = families
        .iter()
        .filter_map(|f| f.upstream.as_deref())
        .collect();
    upstreams.sort_unstable();
    upstreams.dedup();
    let near = families.iter().filter(|f| near_limit(f)).count();
    let revoked = families.iter().filter(|f| f.revoked).count();
    let (sort, desc) = q.sort();
    let th = |col: Sort, text: &str| -> Markup {
        let aria = if col == sort {
            if desc {
                "descending"
            } else {
                "ascending"
            }
        } else {
            "none"
        };
        html! {
            th scope="col" aria-sort=(aria) class=[(col == Sort::Remaining).then_some("num")] {
                a href=(q.sort_href(col)) { (text) @if col == sort { span aria-hidden="true" { @if desc { " ▼" } @else { " ▲" } } } }
            }
        }
    };
    let body = html! {
        h1 { "Key families" }
        form.filters method="get" action="/" role="search" aria-label="Filter families" {
            label { "Label " input type="search" name="label" value=[non_empty(&q.label)] placeholder="contains…"; }
            label { "Upstream "
                select name="upstream" {
                    option value="" { "any" }
                    @for u in &upstreams {
                        option value=(u) selected[non_empty(&q.upstream) == Some(*u)] { (u) }
                    }
                }
            }
            label.check { input type="checkbox" name="near_limit" value="on" checked[q.near_limit_only()]; " near limit only (≥ 80 %)" }
            input type="hidden" name="sort" value=(sort.name());
            input type="hidden" name="dir" value=(if desc { "desc" } else { "asc" });
            button type="submit" { "Apply" }
            " " a href="/" { "Reset" }
        }
        section #overview-live data-live="" aria-label="Families" {
            p.summary {
                (families.len()) @if families.len() == 1 { " family · " } @else { " families · " } (near) " near their cap · " (revoked) " revoked"
                @if shown.len() != families.len() { " · showing " (shown.len()) }
            }
            @if shown.is_empty() {
                p.empty { "No family matches. Families appear at their first proxied call, or when minted here." }
            } @else {
                div.scroll {
                    table.families {
                        caption.visually-hidden { "Key families, sorted by " (sort.name()) }
                        thead { tr {
                            (th(Sort::Label, "Label"))
                            (th(Sort::Upstream, "Upstream"))
                            (th(Sort::Fill, "Used / cap"))
                            (th(Sort::Remaining, "Remaining"))
                            (th(Sort::Last, "Last activation (UTC)"))
                            (th(Sort::Rate, "Per minute (last hour)"))
                            th scope="col" { "State" }
                        } }
                        tbody {
                            @for f in &shown {
                                tr id=(format!("f-{}", &f.family[..16.min(f.family.len())])) class=[f.revoked.then_some("revoked")] {
                                    td {
                                        a href=(format!("/families/{}", f.family)) {
                                            @if let Some(l) = &f.label { (l) } @else { span.muted { "(no label)" } }
                                        }
                                        br; (short_id(&f.family))
                                    }
                                    td { (f.upstream.as_deref().unwrap_or("—")) }
                                    td { (usage_bar(f.used, f.cap)) }
                                    td.num { @if let Some(r) = f.remaining { (r) } @else { "∞" } }
                                    td { (when(f.last_activation, now)) }
                                    td { (sparkline(&f.activity.per_minute)) " " span.nums { (f.activity.last_minute) "/min" } }
                                    td {
                                        @if f.revoked { span.badge.revoked { "revoked" } }
                                        @else if f.expires.is_some_and(|e| e <= now) { span.badge.expired { "expired" } }
                                        @else if f.cap.is_some_and(|c| f.used >= c) { span.badge.full { "cap reached" } }
                                        @else { span.badge.active { "active" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.feed aria-labelledby="feed-h" hidden {
            h2 #feed-h { "Live events" }
            ol #feed aria-live="polite" {}
        }
    };
    page("Overview", Nav::Overview, Some(viewer), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use till_ledger::family::Activity;

    pub(crate) fn fam(
        id: &str,
        label: &str,
        upstream: &str,
        used: u64,
        cap: Option<u64>,
    ) -> FamilyView {
        FamilyView {
            family: id.to_string(),
            label: Some(label.to_string()),
            upstream: Some(upstream.to_string()),
            cap,
            used,
            remaining: cap.map(|c| c.saturating_sub(used)),
            revoked: false,
            expires: None,
            recorded_at: 1,
            minted: false,
            first_activation: None,
            last_activation: None,
            blocks: 1,
            activity: Activity::default(),
        }
    }

    fn viewer() -> Viewer {
        Viewer {
            can_write: true,
            can_mint: true,
            csrf: "t".into(),
        }
    }

    #[test]
    fn filters_and_sorts() {
        let all = vec![
            fam("aa", "Alpha bot", "openai", 9, Some(10)),
            fam("bb", "beta", "anthropic", 1, Some(10)),
            fam("cc", "Gamma", "openai", 5, None),
        ];
        let ids = |q: &OverviewQuery| {
            select(&all, q)
                .iter()
                .map(|f| f.family.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&OverviewQuery::default()), ["aa", "bb", "cc"]);
        let q = OverviewQuery {
            sort: Some("label".into()),
            dir: Some("desc".into()),
            ..Default::default()
        };
        assert_eq!(ids(&q), ["cc", "bb", "aa"]);
        let q = OverviewQuery {
            upstream: Some("openai".into()),
            ..Default::default()
        };
        assert_eq!(ids(&q), ["aa", "cc"]);
        let q = OverviewQuery {
            near_limit: Some("on".into()),
            ..Default::default()
        };
        assert_eq!(ids(&q), ["aa"]);
        let q = OverviewQuery {
            label: Some("ALP".into()),
            ..Default::default()
        };
        assert_eq!(ids(&q), ["aa"]);
        let q = OverviewQuery {
            sort: Some("remaining".into()),
            dir: Some("asc".into()),
            ..Default::default()
        };
        assert_eq!(ids(&q), ["aa", "bb", "cc"]);
    }

    #[test]
    fn labels_are_escaped_and_sort_links_keep_filters() {
        let all = vec![fam("aa", "<script>x</script>", "openai", 1, Some(2))];
        let q = OverviewQuery {
            upstream: Some("openai".into()),
            ..Default::default()
        };
        let html = render_overview(&all, &q, &viewer(), 10).into_string();
        assert!(!html.contains("<script>x"));
        assert!(html.contains("&lt;script&gt;x"));
        assert!(
            html.contains("/?sort=label&amp;dir=asc&amp;upstream=openai"),
            "{html}"
        );
    }
}
