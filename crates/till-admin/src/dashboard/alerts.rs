//! The alerts page: what fired, and whether the webhook got it.

use maud::{html, Markup};
use till_ledger::alert::{AlertKind, DeliveryStatus};
use till_ledger::{AlertPolicy, AlertRecord};

use super::layout::{page, short_id, time, when, Nav};
use super::Viewer;

fn what(a: &AlertRecord) -> Markup {
    html! {
        @match a.kind {
            AlertKind::Threshold => {
                "Threshold " (a.threshold.unwrap_or(0)) " % reached"
                @if let (Some(u), Some(c)) = (a.used, a.cap) { ": " (u) " of " (c) " used" }
                @if let Some(b) = a.block { " (block " (b) ")" }
            }
            AlertKind::Rate => {
                "Rate " (a.rate_per_minute.unwrap_or(0)) "/min above the ceiling of " (a.ceiling.unwrap_or(0))
            }
            AlertKind::Revocation => {
                "Revoked"
                @if let Some(r) = &a.revocation_id { " " (short_id(r)) }
                @if let Some(b) = a.block { " (block " (b) ")" }
            }
        }
    }
}

fn delivery(a: &AlertRecord, now: u64) -> Markup {
    let d = &a.delivery;
    html! {
        @match d.status {
            DeliveryStatus::Delivered => {
                span.badge.active { "delivered" }
                @if let Some(t) = d.delivered_at { " " (when(Some(t), now)) }
            }
            DeliveryStatus::NotConfigured => span.badge { "recorded (no webhook)" },
            DeliveryStatus::Pending => {
                span.badge.warn { "pending" }
                @if let Some(t) = d.next_attempt { " next try " (time(t)) }
            }
        }
        @if d.attempts > 0 { br; span.muted { (d.attempts) " attempt" @if d.attempts != 1 { "s" } } }
        @if let Some(e) = &d.last_error { br; span.bad { "last error: " (e) } }
    }
}

/// The alerts page (newest first).
pub fn render_alerts(
    alerts: &[AlertRecord],
    policy: &AlertPolicy,
    webhook: bool,
    viewer: &Viewer,
    now: u64,
) -> Markup {
    let body = html! {
        h1 { "Alerts" }
        p.muted {
            "Thresholds: "
            @if policy.thresholds.is_empty() { "none" }
            @for (i, t) in policy.thresholds.iter().enumerate() { @if i > 0 { ", " } (t) " %" }
            " of each capped key · rate ceiling: "
            @if let Some(r) = policy.rate_per_minute { (r) "/min" } @else { "none" }
            " · revocations: " @if policy.revocations { "on" } @else { "off" }
            " · webhook: " @if webhook { "configured" } @else { "not configured (alerts are recorded and logged)" }
        }
        section #alerts-live data-live="" aria-label="Alerts" {
            @if alerts.is_empty() {
                p.empty { "No alert has fired." }
            } @else {
                div.scroll {
                    table.alerts {
                        caption.visually-hidden { "Alerts, newest first" }
                        thead { tr {
                            th scope="col" { "Fired (UTC)" } th scope="col" { "Family" }
                            th scope="col" { "What" } th scope="col" { "Delivery" }
                        } }
                        tbody {
                            @for a in alerts {
                                tr {
                                    td { (time(a.at)) }
                                    td {
                                        @if let Some(f) = &a.family {
                                            a href=(format!("/families/{f}")) {
                                                @if let Some(l) = &a.label { (l) } @else { (short_id(f)) }
                                            }
                                        } @else { "—" }
                                    }
                                    td { (what(a)) }
                                    td { (delivery(a, now)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Alerts", Nav::Alerts, Some(viewer), body)
}
