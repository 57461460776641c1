//! The page shell (navigation, sign-out, live status) and small formatting pieces shared
//! by every page.

use maud::{html, Markup, DOCTYPE};

use super::session::CSRF_FIELD;
use super::Viewer;

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The overview.
    Overview,
    /// Mint and attenuate.
    Keys,
    /// Alerts.
    Alerts,
    /// Sign-in (no navigation).
    None,
}

/// A whole page. `viewer` is `None` on the sign-in page.
pub fn page(title: &str, nav: Nav, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · Till" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Till" }
                    @if let Some(v) = viewer {
                        nav aria-label="Main" {
                            ul {
                                li { (nav_link("/", "Overview", nav == Nav::Overview)) }
                                li { (nav_link("/keys", "Mint & attenuate", nav == Nav::Keys)) }
                                li { (nav_link("/alerts", "Alerts", nav == Nav::Alerts)) }
                            }
                        }
                        span #live-status .live-status role="status" aria-live="polite" { "static view" }
                        @if !v.can_write {
                            span.badge.ro title="This admin key may only read" { "read-only" }
                        }
                        form.signout method="post" action="/logout" {
                            (csrf_field(v))
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

fn nav_link(href: &str, text: &str, current: bool) -> Markup {
    html! {
        @if current {
            a href=(href) aria-current="page" { (text) }
        } @else {
            a href=(href) { (text) }
        }
    }
}

/// The hidden CSRF field of a state-changing form.
pub fn csrf_field(v: &Viewer) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(v.csrf); }
}

/// `2026-11-30 03:05:10 UTC` in a `<time>`.
pub fn time(unix: u64) -> Markup {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(0)) else {
        return html! { (unix) };
    };
    let iso = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let shown = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    html! { time datetime=(iso) { (shown) } }
}

/// "12 s ago", "3 min ago", ... relative to `now`.
pub fn ago(unix: u64, now: u64) -> String {
    let d = now.saturating_sub(unix);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86_400),
    }
}

/// A time with its relative age, or a dash.
pub fn when(unix: Option<u64>, now: u64) -> Markup {
    match unix {
        Some(t) => html! { (time(t)) br; span.muted { (ago(t, now)) } },
        None => html! { span.muted { "never" } },
    }
}

/// First 12 hex digits of an id, with the whole id as its title.
pub fn short_id(id: &str) -> Markup {
    let short: String = id.chars().take(12).collect();
    html! { code.id title=(id) { (short) "…" } }
}

/// A page-level message (after a redirect or a failed form).
pub fn notice(kind: &str, text: &str) -> Markup {
    html! { p class={ "notice " (kind) } role=(if kind == "error" { "alert" } else { "status" }) { (text) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(
            time(0).into_string(),
            r#"<time datetime="1970-01-01T00:00:00Z">1970-01-01 00:00:00</time>"#
        );
        assert_eq!(ago(100, 130), "30 s ago");
        assert_eq!(ago(0, 7200), "2 h ago");
    }
}
