//! A strict checker of the OpenMetrics 1.0 text format, for the agent's `/metrics` when a scraper
//! asks for `application/openmetrics-text`. It parses line by line and reports the first
//! violation with its line number: grammar (names, labels, escapes, numbers, `# EOF` last),
//! metadata (one TYPE/HELP/UNIT per family, before its samples), family and metric grouping, the
//! sample-name suffixes each type allows, and the values each type allows. It checks the
//! exposition, not the meaning of the metrics.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail, ensure};

/// A parsed exposition: families in order, with their samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    pub families: Vec<Family>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp: Option<f64>,
}

const TYPES: &[&str] = &[
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "stateset",
    "info",
    "summary",
    "unknown",
];

/// The suffixes a sample name may add to its family's name, by type.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        // gauge, stateset, unknown
        _ => &[""],
    }
}

/// Parses `text` and checks it; Err names the line and the rule broken.
pub fn check(text: &str) -> Result<Exposition> {
    let mut p = Checker::default();
    let Some(body) = text.strip_suffix('\n') else {
        bail!("the exposition must end with a newline after `# EOF`");
    };
    let lines: Vec<&str> = body.split('\n').collect();
    let Some((last, rest)) = lines.split_last() else {
        bail!("empty exposition");
    };
    for (i, line) in rest.iter().enumerate() {
        p.line(line)
            .map_err(|e| anyhow::anyhow!("line {}: {e}: {line:?}", i + 1))?;
    }
    ensure!(
        *last == "# EOF",
        "line {}: the last line must be `# EOF`, got {last:?}",
        lines.len()
    );
    p.close_family()
        .map_err(|e| anyhow::anyhow!("line {}: {e}", lines.len()))?;
    Ok(p.out)
}

#[derive(Default)]
struct Checker {
    out: Exposition,
    /// Family names already closed: a name may not come back.
    closed: BTreeSet<String>,
    /// The open family: whether samples started, and the label sets of its metrics seen so far
    /// (a metric's lines must be contiguous).
    open: Option<Family>,
    sampling: bool,
    metrics_done: BTreeSet<Vec<(String, String)>>,
    current_metric: Option<Vec<(String, String)>>,
    /// (sample name, full label set) seen in the open family.
    series: BTreeSet<(String, Vec<(String, String)>)>,
}

impl Checker {
    fn line(&mut self, line: &str) -> Result<()> {
        ensure!(!line.is_empty(), "empty line");
        if let Some(rest) = line.strip_prefix('#') {
            return self.metadata(rest);
        }
        self.sample(line)
    }

    fn metadata(&mut self, rest: &str) -> Result<()> {
        let Some(rest) = rest.strip_prefix(' ') else {
            bail!("a `#` line must be `# TYPE|HELP|UNIT name ...`");
        };
        ensure!(rest != "EOF", "`# EOF` before the end");
        let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (name, value) = match rest.split_once(' ') {
            Some((n, v)) => (n, Some(v)),
            None => (rest, None),
        };
        check_metric_name(name)?;
        let family = self.family_for_metadata(name)?;
        match keyword {
            "TYPE" => {
                let kind = value.unwrap_or("");
                ensure!(TYPES.contains(&kind), "unknown type {kind:?}");
                ensure!(family.kind.is_empty(), "a second TYPE for {name}");
                family.kind = kind.to_string();
            }
            "HELP" => {
                ensure!(family.help.is_none(), "a second HELP for {name}");
                let help = value.unwrap_or("");
                family.help = Some(unescape(help, false)?);
            }
            "UNIT" => {
                ensure!(family.unit.is_none(), "a second UNIT for {name}");
                let unit = value.unwrap_or("");
                if !unit.is_empty() {
                    check_metric_name(unit)?;
                    ensure!(
                        name.ends_with(&format!("_{unit}")),
                        "family {name} has unit {unit} but its name does not end in _{unit}"
                    );
                }
                family.unit = Some(unit.to_string());
            }
            other => bail!("unknown metadata {other:?} (TYPE, HELP, UNIT)"),
        }
        Ok(())
    }

    /// The open family if `name` is it and has no samples yet; else a new one (closing the
    /// open one).
    fn family_for_metadata(&mut self, name: &str) -> Result<&mut Family> {
        let same = self.open.as_ref().is_some_and(|f| f.name == name);
        if same {
            ensure!(!self.sampling, "metadata for {name} after its samples");
        } else {
            self.close_family()?;
            ensure!(
                !self.closed.contains(name),
                "family {name} appears a second time (families must be contiguous)"
            );
            self.open = Some(Family {
                name: name.to_string(),
                ..Family::default()
            });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    fn close_family(&mut self) -> Result<()> {
        let Some(mut f) = self.open.take() else {
            return Ok(());
        };
        if f.kind.is_empty() {
            f.kind = "unknown".into();
        }
        check_family_values(&f)?;
        self.closed.insert(f.name.clone());
        self.out.families.push(f);
        self.sampling = false;
        self.metrics_done.clear();
        self.current_metric = None;
        self.series.clear();
        Ok(())
    }

    fn sample(&mut self, line: &str) -> Result<()> {
        let sample = parse_sample(line)?;
        // Which family: the open one if the name is its name plus an allowed suffix.
        let belongs = self.open.as_ref().is_some_and(|f| {
            let kind = if f.kind.is_empty() {
                "unknown"
            } else {
                &f.kind
            };
            suffixes(kind)
                .iter()
                .any(|s| sample.name == format!("{}{s}", f.name))
        });
        if !belongs {
            if let Some(f) = &self.open
                && (sample.name == f.name || sample.name.starts_with(&format!("{}_", f.name)))
            {
                bail!(
                    "sample {} does not fit family {} of type {} (allowed suffixes {:?})",
                    sample.name,
                    f.name,
                    f.kind,
                    suffixes(&f.kind)
                );
            }
            // A sample without metadata opens an unknown-typed family of its own name.
            self.close_family()?;
            ensure!(
                !self.closed.contains(&sample.name),
                "family {} appears a second time (families must be contiguous)",
                sample.name
            );
            self.open = Some(Family {
                name: sample.name.clone(),
                kind: "unknown".into(),
                ..Family::default()
            });
        }
        let family = self.open.as_mut().expect("open");
        if family.kind.is_empty() {
            family.kind = "unknown".into();
        }
        self.sampling = true;
        // The metric is the label set without the labels the type uses per sample.
        let metric: Vec<(String, String)> = sample
            .labels
            .iter()
            .filter(|(k, _)| !(k == "le" && family.kind.ends_with("histogram")))
            .filter(|(k, _)| !(k == "quantile" && family.kind == "summary"))
            .cloned()
            .collect();
        if self.current_metric.as_ref() != Some(&metric) {
            ensure!(
                !self.metrics_done.contains(&metric),
                "the lines of metric {}{:?} are not contiguous",
                family.name,
                metric
            );
            if let Some(done) = self.current_metric.replace(metric.clone()) {
                self.metrics_done.insert(done);
            }
        }
        ensure!(
            self.series
                .insert((sample.name.clone(), sample.labels.clone())),
            "duplicate series {}{:?}",
            sample.name,
            sample.labels
        );
        family.samples.push(sample);
        Ok(())
    }
}

/// Per-type value rules, checked when a family is complete.
fn check_family_values(f: &Family) -> Result<()> {
    for s in &f.samples {
        let suffix = &s.name[f.name.len()..];
        match (f.kind.as_str(), suffix) {
            ("counter", "_total") => ensure!(
                s.value >= 0.0 && !s.value.is_nan(),
                "counter {} has value {}",
                s.name,
                s.value
            ),
            ("info", _) => ensure!(s.value == 1.0, "info {} must be 1, is {}", s.name, s.value),
            ("stateset", _) => {
                ensure!(
                    s.value == 0.0 || s.value == 1.0,
                    "stateset {} must be 0 or 1",
                    s.name
                );
                ensure!(
                    s.labels.iter().any(|(k, _)| k == &f.name),
                    "stateset {} needs a label named {}",
                    s.name,
                    f.name
                );
            }
            ("histogram" | "gaugehistogram", "_bucket") => ensure!(
                s.labels.iter().any(|(k, _)| k == "le"),
                "bucket {} without le",
                s.name
            ),
            ("summary", "") => ensure!(
                s.labels.iter().any(|(k, _)| k == "quantile"),
                "summary quantile {} without quantile label",
                s.name
            ),
            _ => {}
        }
    }
    if f.kind == "counter" {
        ensure!(
            f.samples
                .iter()
                .all(|s| s.name.ends_with("_total") || s.name.ends_with("_created")),
            "counter {} without _total",
            f.name
        );
    }
    if f.kind.ends_with("histogram") {
        check_histograms(f)?;
    }
    Ok(())
}

/// Buckets: increasing `le`, ending at +Inf, cumulative counts that never decrease, and
/// `_count` equal to the +Inf bucket.
fn check_histograms(f: &Family) -> Result<()> {
    /// Per metric (label set without `le`): its (le, count) buckets and its `_count`.
    type Buckets = (Vec<(f64, f64)>, Option<f64>);
    let count_suffix = if f.kind == "histogram" {
        "_count"
    } else {
        "_gcount"
    };
    let mut per_metric: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
    for s in &f.samples {
        let metric: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        let entry = per_metric.entry(metric).or_default();
        let suffix = &s.name[f.name.len()..];
        if suffix == "_bucket" {
            let le = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .expect("checked")
                .1
                .clone();
            entry.0.push((parse_number(&le)?, s.value));
        } else if suffix == count_suffix {
            entry.1 = Some(s.value);
        }
    }
    for (metric, (buckets, count)) in per_metric {
        ensure!(
            !buckets.is_empty(),
            "histogram {}{metric:?} without buckets",
            f.name
        );
        for w in buckets.windows(2) {
            ensure!(
                w[0].0 < w[1].0,
                "histogram {}{metric:?}: le not increasing",
                f.name
            );
            ensure!(
                w[0].1 <= w[1].1,
                "histogram {}{metric:?}: buckets not cumulative",
                f.name
            );
        }
        let (le, last) = *buckets.last().expect("not empty");
        ensure!(
            le == f64::INFINITY,
            "histogram {}{metric:?}: no +Inf bucket",
            f.name
        );
        if let Some(count) = count {
            ensure!(
                count == last,
                "histogram {}{metric:?}: count {count} != +Inf bucket {last}",
                f.name
            );
        }
    }
    Ok(())
}

fn check_metric_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    ensure!(ok, "bad metric name {name:?}");
    Ok(())
}

fn check_label_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ensure!(ok, "bad label name {name:?}");
    ensure!(!name.starts_with("__"), "label name {name:?} is reserved");
    Ok(())
}

/// `\\`, `\"` (in label values only) and `\n`; nothing else may follow a backslash.
fn unescape(s: &str, quote_allowed: bool) -> Result<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quote_allowed => out.push('"'),
            other => bail!(
                "bad escape \\{}",
                other.map(String::from).unwrap_or_default()
            ),
        }
    }
    Ok(out)
}

/// `name[{labels}] value [timestamp]` (exemplars are not expected here and are rejected).
fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| anyhow::anyhow!("a sample needs a value"))?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    let Some(rest) = rest.strip_prefix(' ') else {
        bail!("one space must separate the sample's name or labels from its value");
    };
    let parts: Vec<&str> = rest.split(' ').collect();
    ensure!(
        matches!(parts.len(), 1 | 2),
        "a sample is `name{{labels}} value [timestamp]` (single spaces; exemplars not expected)"
    );
    let value = parse_number(parts[0])?;
    let timestamp = parts.get(1).map(|t| parse_number(t)).transpose()?;
    if let Some(t) = timestamp {
        ensure!(t.is_finite(), "timestamp {t} is not finite");
    }
    let mut names = BTreeSet::new();
    for (k, _) in &labels {
        ensure!(names.insert(k.clone()), "label {k} twice");
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp,
    })
}

/// After `{`: `name="value"` pairs separated by `,`, then `}`. Returns the pairs and the rest.
fn parse_labels(mut s: &str) -> Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    if let Some(rest) = s.strip_prefix('}') {
        return Ok((labels, rest));
    }
    loop {
        let eq = s
            .find('=')
            .ok_or_else(|| anyhow::anyhow!("label without `=`"))?;
        let name = &s[..eq];
        check_label_name(name)?;
        let Some(after) = s[eq + 1..].strip_prefix('"') else {
            bail!("label value of {name} must be quoted");
        };
        // The closing quote: the first `"` not escaped.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                (false, '\n') => bail!("newline in a label value"),
                _ => escaped = false,
            }
        }
        let end = end.ok_or_else(|| anyhow::anyhow!("unterminated label value of {name}"))?;
        labels.push((name.to_string(), unescape(&after[..end], true)?));
        s = &after[end + 1..];
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let Some(rest) = s.strip_prefix(',') else {
            bail!("labels must be separated by `,` and closed by `}}`");
        };
        ensure!(!rest.starts_with('}'), "trailing `,` in labels");
        s = rest;
    }
}

/// A number as OpenMetrics writes it: decimal or exponent floats, `+Inf`, `-Inf`, `NaN`.
fn parse_number(s: &str) -> Result<f64> {
    match s {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && s.chars().any(|c| c.is_ascii_digit());
    ensure!(ok, "bad number {s:?}");
    s.parse::<f64>()
        .map_err(|e| anyhow::anyhow!("bad number {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# TYPE xdplb_packets counter\n# HELP xdplb_packets Packets \\\\ seen.\n\
        xdplb_packets_total{service=\"web\",backend=\"a\\\"b\"} 10\n\
        xdplb_packets_total{service=\"dns\"} 3\n\
        # TYPE xdplb_ready gauge\n# UNIT xdplb_ready_seconds seconds\n";

    #[test]
    fn a_valid_exposition_parses() {
        let text = "# TYPE a counter\n# HELP a The a.\na_total{x=\"1\"} 1\na_created{x=\"1\"} 1.7e9\n\
            a_total{x=\"2\"} 0\n# TYPE b gauge\nb -1.5\n\
            # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 0.3\n\
            # TYPE i info\ni_info{version=\"1\"} 1\n# EOF\n";
        let e = check(text).unwrap();
        assert_eq!(e.families.len(), 4);
        assert_eq!(e.families[0].samples[1].value, 1.7e9);
        assert_eq!(e.families[1].samples[0].value, -1.5);
    }

    #[test]
    fn escapes_in_help_and_labels_are_read() {
        let e = check(&format!(
            "{}# EOF\n",
            GOOD.split("# TYPE xdplb_ready").next().unwrap()
        ))
        .unwrap();
        assert_eq!(e.families[0].help.as_deref(), Some("Packets \\ seen."));
        assert_eq!(e.families[0].samples[0].labels[1].1, "a\"b");
    }

    #[test]
    fn each_rule_is_enforced() {
        let bad = [
            ("a_total 1\n", "no # EOF"),
            ("# TYPE a counter\na_total 1\n# EOF", "no final newline"),
            ("# TYPE a counter\na_total 1\n# EOF\n\n", "text after EOF"),
            ("# TYPE a counter\n\na_total 1\n# EOF\n", "empty line"),
            (
                "# TYPE a counter\na 1\n# EOF\n",
                "counter sample without _total",
            ),
            ("# TYPE a counter\na_total -1\n# EOF\n", "negative counter"),
            ("# TYPE a gauge\na_total 1\n# EOF\n", "gauge with a suffix"),
            (
                "# TYPE a counter\n# TYPE a counter\na_total 1\n# EOF\n",
                "two TYPEs",
            ),
            (
                "# TYPE a counter\na_total 1\n# HELP a late\n# EOF\n",
                "HELP after samples",
            ),
            (
                "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n",
                "family twice",
            ),
            (
                "# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n# EOF\n",
                "duplicate series",
            ),
            (
                "# TYPE a counter\na_total{x=\"1\"} 1\na_total{x=\"2\"} 1\na_created{x=\"1\"} 1\n# EOF\n",
                "metric not contiguous",
            ),
            ("# TYPE a gauge\na{x=1} 1\n# EOF\n", "unquoted label"),
            ("# TYPE a gauge\na{x=\"\\t\"} 1\n# EOF\n", "bad escape"),
            ("# TYPE a gauge\na{__x=\"1\"} 1\n# EOF\n", "reserved label"),
            ("# TYPE a gauge\na{x=\"1\",} 1\n# EOF\n", "trailing comma"),
            ("# TYPE a gauge\na  1\n# EOF\n", "two spaces"),
            ("# TYPE a gauge\na 0x10\n# EOF\n", "hex number"),
            ("# TYPE a foo\na 1\n# EOF\n", "unknown type"),
            ("# UNIT a seconds\na 1\n# EOF\n", "unit not in the name"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
                "not cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\n# EOF\n",
                "no +Inf bucket",
            ),
            ("# TYPE i info\ni_info 2\n# EOF\n", "info not 1"),
            ("#TYPE a gauge\na 1\n# EOF\n", "no space after #"),
            ("# TYPE 1a gauge\n# EOF\n", "bad name"),
        ];
        for (text, why) in bad {
            let e = check(text).expect_err(&format!("accepted ({why}): {text:?}"));
            eprintln!("{why}: {e}");
        }
    }
}
