//! Plain SVG bar charts, written by hand (no dependency): horizontal bars, one group per
//! category, one bar per series, value labels, a legend and a scale.
use std::fmt::Write;

/// One series: a value per category (None: no bar).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

const PALETTE: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" scale maximum at or above `max`.
fn nice_max(max: f64) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let exp = max.log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * base >= max {
            return m * base;
        }
    }
    10.0 * base
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Horizontal grouped bars. `unit` labels the axis; `notes` are lines under the chart.
pub fn hbars(
    title: &str,
    unit: &str,
    categories: &[String],
    series: &[Series],
    notes: &[String],
) -> String {
    let label_w = 250.0;
    let chart_w = 520.0;
    let right_pad = 70.0;
    let bar_h = 14.0;
    let gap = 10.0;
    let legend_h = 22.0 * series.len().div_ceil(3) as f64;
    let top = 40.0 + legend_h;
    let group_h = bar_h * series.len() as f64 + gap;
    let chart_h = group_h * categories.len() as f64;
    let notes_h = 16.0 * notes.len() as f64;
    let width = label_w + chart_w + right_pad;
    let height = top + chart_h + 40.0 + notes_h;
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    let scale_max = nice_max(max);
    let x = |v: f64| label_w + chart_w * (v / scale_max).clamp(0.0, 1.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, se) in series.iter().enumerate() {
        let lx = 10.0 + 260.0 * (i % 3) as f64;
        let ly = 34.0 + 22.0 * (i / 3) as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            lx + 16.0,
            ly + 10.5,
            escape(&se.name)
        );
    }
    // Grid and scale.
    for t in 0..=5 {
        let v = scale_max * f64::from(t) / 5.0;
        let gx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            top + chart_h,
            top + chart_h + 16.0,
            fmt_value(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
        label_w + chart_w / 2.0,
        top + chart_h + 32.0,
        escape(unit)
    );
    for (c, cat) in categories.iter().enumerate() {
        let gy = top + group_h * c as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            gy + (bar_h * series.len() as f64) / 2.0 + 4.0,
            escape(cat)
        );
        for (i, se) in series.iter().enumerate() {
            let Some(v) = se.values.get(c).copied().flatten() else {
                continue;
            };
            if !v.is_finite() {
                continue;
            }
            let by = gy + bar_h * i as f64;
            let w = (x(v.max(0.0)) - label_w).max(0.5);
            let _ = writeln!(
                s,
                r##"<rect x="{label_w}" y="{by:.1}" width="{w:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" fill="#222">{}</text>"##,
                bar_h - 2.0,
                PALETTE[i % PALETTE.len()],
                label_w + w + 4.0,
                by + bar_h - 4.0,
                fmt_value(v)
            );
        }
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="10" y="{:.1}" fill="#555" font-size="11">{}</text>"##,
            top + chart_h + 52.0 + 16.0 * i as f64,
            escape(n)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_value_and_escape_labels() {
        let svg = hbars(
            "t <1>",
            "ns",
            &["a & b".into(), "c".into()],
            &[Series {
                name: "s".into(),
                values: vec![Some(40.0), None],
            }],
            &[],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a &amp; b") && svg.contains("t &lt;1&gt;"));
        assert_eq!(nice_max(40.0), 50.0);
        assert_eq!(nice_max(180.0), 200.0);
        assert_eq!(
            svg.matches("<rect").count(),
            3,
            "background, legend, one bar"
        );
    }
}
