//! Plots written by hand: line and bar charts as SVG panels, placed side by side in one
//! document. No plotting crate; just enough axes, ticks and legends to read the figures.

use std::fmt::Write;

pub const PANEL_WIDTH: f64 = 520.0;
pub const PANEL_HEIGHT: f64 = 340.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;

pub const BLUE: &str = "#1f77b4";
pub const ORANGE: &str = "#ff7f0e";
pub const GREEN: &str = "#2ca02c";
pub const RED: &str = "#d62728";
pub const GREY: &str = "#7f7f7f";

/// A line of points, drawn with markers.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line (a target or a limit), dashed, with a label.
pub struct Rule {
    pub y: f64,
    pub label: String,
    pub color: &'static str,
}

pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub rules: Vec<Rule>,
    pub log_y: bool,
    /// Start the axes at zero (linear axes only).
    pub from_zero: bool,
}

/// One bar: its series (for the legend), its value and its colour.
pub struct Bar {
    pub series: String,
    pub value: f64,
    pub color: &'static str,
}

impl Bar {
    pub fn new(series: &str, value: f64, color: &'static str) -> Bar {
        Bar {
            series: series.to_string(),
            value,
            color,
        }
    }
}

/// Bars in groups: each group has a label and one bar per series.
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<(String, Vec<Bar>)>,
    pub rules: Vec<Rule>,
}

/// Panels side by side, under one title.
pub fn document(title: &str, panels: &[String]) -> String {
    let width = PANEL_WIDTH * panels.len().max(1) as f64;
    let height = PANEL_HEIGHT + 30.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let _ = write!(
            out,
            r#"<g transform="translate({},30)">{panel}</g>"#,
            i as f64 * PANEL_WIDTH
        );
    }
    out.push_str("</svg>\n");
    out
}

struct Axis {
    min: f64,
    max: f64,
    log: bool,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool, from_zero: bool) -> Axis {
        let values: Vec<f64> = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let (mut min, mut max) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if !min.is_finite() {
            (min, max) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if log {
            min = 10f64.powf(min.log10().floor());
            max = 10f64.powf(max.log10().ceil().max(min.log10() + 1.0));
        } else {
            if from_zero {
                min = min.min(0.0);
            }
            if max <= min {
                max = min + 1.0;
            }
            let step = nice_step((max - min) / 5.0);
            min = (min / step).floor() * step;
            max = (max / step).ceil() * step;
        }
        Axis { min, max, log }
    }

    /// Position from 0 (min) to 1 (max).
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.max(self.min).log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            (v - self.min) / (self.max - self.min)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut ticks = Vec::new();
            let mut t = self.min;
            while t <= self.max * 1.0001 {
                ticks.push(t);
                t *= 10.0;
            }
            ticks
        } else {
            let step = nice_step((self.max - self.min) / 5.0);
            let mut ticks = Vec::new();
            let mut t = self.min;
            while t <= self.max + step * 1e-6 {
                ticks.push(t);
                t += step;
            }
            ticks
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let r = raw / magnitude;
    let nice = if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 2.5 {
        2.5
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Frame, title, axis labels and ticks; returns the drawing closure's coordinate helpers.
fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str, y: &Axis) -> (f64, f64) {
    let plot_w = PANEL_WIDTH - LEFT - RIGHT;
    let plot_h = PANEL_HEIGHT - TOP - BOTTOM;
    let _ = write!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    for t in y.ticks() {
        let py = TOP + plot_h * (1.0 - y.frac(t));
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0,
            label(t)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        PANEL_HEIGHT - 12.0,
        escape(x_label)
    );
    let _ = write!(
        out,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    (plot_w, plot_h)
}

fn rules(out: &mut String, rules: &[Rule], y: &Axis, plot_w: f64, plot_h: f64) {
    for rule in rules {
        let py = TOP + plot_h * (1.0 - y.frac(rule.y).clamp(0.0, 1.0));
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="{}" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="{}">{}</text>"#,
            LEFT + plot_w,
            rule.color,
            LEFT + plot_w - 4.0,
            py - 4.0,
            rule.color,
            escape(&rule.label)
        );
    }
}

fn legend(out: &mut String, entries: &[(String, &str)]) {
    for (i, (name, color)) in entries.iter().enumerate() {
        let y = TOP + 14.0 + i as f64 * 16.0;
        let _ = write!(
            out,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 10.0,
            y - 9.0,
            LEFT + 24.0,
            y,
            escape(name)
        );
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let x = Axis::fit(points().map(|p| p.0), false, self.from_zero);
        let y = Axis::fit(
            points().map(|p| p.1).chain(self.rules.iter().map(|r| r.y)),
            self.log_y,
            self.from_zero,
        );
        let mut out = String::new();
        let (plot_w, plot_h) = frame(&mut out, &self.title, &self.x_label, &self.y_label, &y);
        for t in x.ticks() {
            let px = LEFT + plot_w * x.frac(t);
            let _ = write!(
                out,
                r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
                TOP + plot_h + 16.0,
                label(t)
            );
        }
        rules(&mut out, &self.rules, &y, plot_w, plot_h);
        for s in &self.series {
            let coords: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.log_y || p.1 > 0.0))
                .map(|&(px, py)| {
                    (
                        LEFT + plot_w * x.frac(px),
                        TOP + plot_h * (1.0 - y.frac(py).clamp(0.0, 1.0)),
                    )
                })
                .collect();
            let path: Vec<String> = coords
                .iter()
                .map(|(a, b)| format!("{a:.1},{b:.1}"))
                .collect();
            let _ = write!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                s.color
            );
            for (a, b) in coords {
                let _ = write!(
                    out,
                    r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{}"/>"#,
                    s.color
                );
            }
        }
        let entries: Vec<(String, &str)> = self
            .series
            .iter()
            .map(|s| (s.name.clone(), s.color))
            .collect();
        legend(&mut out, &entries);
        out
    }
}

impl BarChart {
    pub fn render(&self) -> String {
        let values = self
            .groups
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|b| b.value));
        let y = Axis::fit(values.chain(self.rules.iter().map(|r| r.y)), false, true);
        let mut out = String::new();
        let (plot_w, plot_h) = frame(&mut out, &self.title, "", &self.y_label, &y);
        let group_w = plot_w / self.groups.len().max(1) as f64;
        let mut entries: Vec<(String, &str)> = Vec::new();
        for (g, (name, bars)) in self.groups.iter().enumerate() {
            let bar_w = (group_w * 0.7) / bars.len().max(1) as f64;
            let x0 = LEFT + g as f64 * group_w + group_w * 0.15;
            for (b, bar) in bars.iter().enumerate() {
                let (value, color) = (bar.value, bar.color);
                if !entries.iter().any(|(n, _)| *n == bar.series) {
                    entries.push((bar.series.clone(), color));
                }
                if !value.is_finite() {
                    continue;
                }
                let top = TOP + plot_h * (1.0 - y.frac(value));
                let px = x0 + b as f64 * bar_w;
                let _ = write!(
                    out,
                    r#"<rect x="{px:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                    bar_w * 0.92,
                    TOP + plot_h - top,
                    px + bar_w * 0.46,
                    top - 4.0,
                    label(value)
                );
            }
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                LEFT + (g as f64 + 0.5) * group_w,
                TOP + plot_h + 16.0,
                escape(name)
            );
        }
        rules(&mut out, &self.rules, &y, plot_w, plot_h);
        if entries.len() > 1 {
            legend(&mut out, &entries);
        }
        out
    }
}
