//! Server-rendered SVG: usage bars, sparklines and the activations chart. Sizes are SVG
//! attributes, never `style=`, so the pages need no inline styles (the CSP forbids them).

use maud::{html, Markup};

/// Fill level of a capped counter: drives the bar colour (and its text, so colour is
/// never the only signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Below 80 %.
    Ok,
    /// At or above 80 %.
    Warn,
    /// At the cap.
    Full,
}

impl Level {
    /// Level of `used` out of `cap` (the 80 % rule of [`crate::api::near_limit`]).
    pub fn of(used: u64, cap: u64) -> Self {
        if used >= cap {
            Level::Full
        } else if used.saturating_mul(5) >= cap.saturating_mul(4) {
            Level::Warn
        } else {
            Level::Ok
        }
    }

    fn class(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Full => "full",
        }
    }
}

/// `used / cap` as a percentage, 0..=100.
pub fn percent(used: u64, cap: u64) -> f64 {
    if cap == 0 {
        return 100.0;
    }
    (used as f64 / cap as f64 * 100.0).min(100.0)
}

/// A used/cap bar with its numbers; "uncapped" without a cap.
pub fn usage_bar(used: u64, cap: Option<u64>) -> Markup {
    let Some(cap) = cap else {
        return html! { span.usage { span.nums { (used) " used" } " " span.muted { "(uncapped)" } } };
    };
    let level = Level::of(used, cap);
    let pct = percent(used, cap);
    let label = format!("{used} of {cap} used ({pct:.0} %)");
    html! {
        span.usage {
            svg class={ "bar " (level.class()) } viewBox="0 0 100 8" preserveAspectRatio="none"
                width="120" height="10" role="img" aria-label=(label) {
                rect.track x="0" y="0" width="100" height="8" rx="2" {}
                rect.fill x="0" y="0" width=(format!("{pct:.2}")) height="8" rx="2" {}
            }
            " "
            span class={ "nums " (level.class()) } { (used) " / " (cap) " · " (format!("{pct:.0}")) "%" }
        }
    }
}

/// Per-minute counts (oldest first) as a small line.
pub fn sparkline(per_minute: &[u64]) -> Markup {
    const W: f64 = 120.0;
    const H: f64 = 24.0;
    let max = per_minute.iter().copied().max().unwrap_or(0).max(1) as f64;
    let n = per_minute.len().max(2) as f64 - 1.0;
    let mut points = String::with_capacity(per_minute.len() * 12);
    for (i, v) in per_minute.iter().enumerate() {
        let x = i as f64 / n * W;
        let y = H - 1.0 - (*v as f64 / max) * (H - 2.0);
        if !points.is_empty() {
            points.push(' ');
        }
        points.push_str(&format!("{x:.1},{y:.1}"));
    }
    let total: u64 = per_minute.iter().sum();
    let label = format!(
        "{total} activations in the last {} minutes",
        per_minute.len()
    );
    html! {
        svg.spark viewBox=(format!("0 0 {W} {H}")) width="120" height="24" role="img" aria-label=(label) {
            polyline points=(points) {}
        }
    }
}

/// The activations-per-minute chart of a family page (bars, with a y scale and minutes).
pub fn activity_chart(per_minute: &[u64]) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    const LEFT: f64 = 36.0;
    const BOTTOM: f64 = 20.0;
    let max = per_minute.iter().copied().max().unwrap_or(0).max(1);
    let n = per_minute.len().max(1) as f64;
    let plot_w = W - LEFT - 4.0;
    let plot_h = H - BOTTOM - 8.0;
    let step = plot_w / n;
    let total: u64 = per_minute.iter().sum();
    let label = format!(
        "Activations per minute over the last {} minutes: {total} in all, at most {max} in one minute",
        per_minute.len()
    );
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(label) {
            line.axis x1=(LEFT) y1=(8) x2=(LEFT) y2=(H - BOTTOM) {}
            line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W - 4.0) y2=(H - BOTTOM) {}
            text.tick x=(LEFT - 4.0) y=(12) text-anchor="end" { (max) }
            text.tick x=(LEFT - 4.0) y=(H - BOTTOM) text-anchor="end" { "0" }
            @for (i, v) in per_minute.iter().enumerate() {
                @if *v > 0 {
                    @let h = *v as f64 / max as f64 * plot_h;
                    rect.col x=(format!("{:.1}", LEFT + i as f64 * step + 1.0))
                        y=(format!("{:.1}", H - BOTTOM - h))
                        width=(format!("{:.1}", (step - 2.0).max(1.0)))
                        height=(format!("{h:.1}")) {
                        title { (v) " in minute −" (per_minute.len() - 1 - i) }
                    }
                }
            }
            text.tick x=(LEFT) y=(H - 4.0) { "−" (per_minute.len()) " min" }
            text.tick x=(W - 4.0) y=(H - 4.0) text-anchor="end" { "now" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_80_and_100_percent_rule() {
        assert_eq!(Level::of(79, 100), Level::Ok);
        assert_eq!(Level::of(80, 100), Level::Warn);
        assert_eq!(Level::of(99, 100), Level::Warn);
        assert_eq!(Level::of(100, 100), Level::Full);
        assert_eq!(Level::of(0, 0), Level::Full);
        assert_eq!(Level::of(4, 5), Level::Warn);
    }

    #[test]
    fn bars_say_their_numbers() {
        let bar = usage_bar(4, Some(5)).into_string();
        assert!(bar.contains("4 of 5 used (80 %)"), "{bar}");
        assert!(bar.contains("bar warn"));
        assert!(!bar.contains("style="));
        assert!(usage_bar(7, None).into_string().contains("uncapped"));
    }

    #[test]
    fn sparkline_has_a_point_per_minute() {
        let s = sparkline(&[0, 1, 2, 0]).into_string();
        assert_eq!(s.matches(',').count(), 4, "{s}");
        assert!(s.contains("3 activations in the last 4 minutes"));
    }
}
