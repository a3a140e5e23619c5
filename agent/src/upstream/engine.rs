//! What an engine says of its own load: its Prometheus `/metrics`, read in
//! the dialects of vLLM, SGLang and llama.cpp's server.
//!
//! The reader scans the text exposition line by line and keeps only the
//! few families it needs (requests running and waiting, KV-cache usage, the
//! time-to-first-token histogram). It allocates nothing per sample: names
//! are compared as slices, values parsed in place, histogram buckets summed
//! into a fixed array. No crate was taken for this: `prometheus-parse` and
//! `openmetrics-parser` build a `String` per name and label and a map per
//! sample, for the whole page (hundreds of families on a vLLM server), to
//! keep four of them, four times a second per server.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The metrics dialect of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Vllm,
    Sglang,
    Llamacpp,
}

impl EngineKind {
    pub const ALL: [EngineKind; 3] = [EngineKind::Vllm, EngineKind::Sglang, EngineKind::Llamacpp];

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
        }
    }

    fn families(self) -> Families {
        match self {
            EngineKind::Vllm => Families {
                running: &["vllm:num_requests_running"],
                waiting: &["vllm:num_requests_waiting"],
                // Renamed in vLLM's V1 engine; older servers write the first.
                kv: &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"],
                ttft_bucket: &["vllm:time_to_first_token_seconds_bucket"],
            },
            EngineKind::Sglang => Families {
                running: &["sglang:num_running_reqs"],
                waiting: &["sglang:num_queue_reqs"],
                kv: &["sglang:token_usage"],
                ttft_bucket: &["sglang:time_to_first_token_seconds_bucket"],
            },
            EngineKind::Llamacpp => Families {
                running: &["llamacpp:requests_processing"],
                waiting: &["llamacpp:requests_deferred"],
                kv: &["llamacpp:kv_cache_usage_ratio"],
                ttft_bucket: &[],
            },
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metrics=` of a model server: which dialect to read, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsMode {
    /// Read whichever dialect `/metrics` turns out to speak; a server
    /// without engine metrics gets the adaptive limit.
    #[default]
    Auto,
    /// Do not scrape: the adaptive limit (and `capacity=`) decide.
    None,
    Engine(EngineKind),
}

impl FromStr for MetricsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(MetricsMode::Auto),
            "none" => Ok(MetricsMode::None),
            _ => EngineKind::ALL
                .into_iter()
                .find(|k| k.as_str() == s)
                .map(MetricsMode::Engine)
                .ok_or_else(|| {
                    format!("unknown metrics `{s}`: one of auto, vllm, sglang, llamacpp, none")
                }),
        }
    }
}

impl fmt::Display for MetricsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsMode::Auto => f.write_str("auto"),
            MetricsMode::None => f.write_str("none"),
            MetricsMode::Engine(k) => k.fmt(f),
        }
    }
}

struct Families {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    kv: &'static [&'static str],
    ttft_bucket: &'static [&'static str],
}

/// Most buckets a TTFT histogram may have (vLLM's has 23 with `+Inf`).
pub const MAX_BUCKETS: usize = 40;

/// A cumulative histogram, as scraped: upper bounds and counts, summed over
/// the page's label sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Histogram {
    pub len: usize,
    pub le: [f64; MAX_BUCKETS],
    pub count: [f64; MAX_BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            len: 0,
            le: [0.0; MAX_BUCKETS],
            count: [0.0; MAX_BUCKETS],
        }
    }
}

impl Histogram {
    fn add(&mut self, le: f64, count: f64) {
        if let Some(i) = self.le[..self.len].iter().position(|b| *b == le) {
            self.count[i] += count;
        } else if self.len < MAX_BUCKETS {
            // Pages list a series' buckets in order; keep the array sorted
            // even if one does not.
            let at = self.le[..self.len].partition_point(|b| *b < le);
            self.le.copy_within(at..self.len, at + 1);
            self.count.copy_within(at..self.len, at + 1);
            self.le[at] = le;
            self.count[at] = count;
            self.len += 1;
        }
    }

    /// Requests counted (the `+Inf` bucket, or the largest).
    pub fn total(&self) -> f64 {
        if self.len == 0 {
            0.0
        } else {
            self.count[self.len - 1]
        }
    }

    /// The `q` quantile of what was observed between `earlier` and `self`
    /// (cumulative snapshots of the same histogram), interpolated within a
    /// bucket as Prometheus' `histogram_quantile` does. `None` when nothing
    /// was observed in between, or the layout changed (an engine restart).
    pub fn quantile_since(&self, earlier: &Histogram, q: f64) -> Option<f64> {
        if self.len != earlier.len || self.le[..self.len] != earlier.le[..earlier.len] {
            return None;
        }
        let total = self.total() - earlier.total();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut below = 0.0;
        let mut lower = 0.0;
        for i in 0..self.len {
            let cum = self.count[i] - earlier.count[i];
            if cum >= rank {
                let upper = self.le[i];
                if upper.is_infinite() {
                    // Past the last finite bound: say that bound.
                    return Some(lower);
                }
                let in_bucket = cum - below;
                let frac = if in_bucket > 0.0 {
                    (rank - below) / in_bucket
                } else {
                    1.0
                };
                return Some(lower + (upper - lower) * frac);
            }
            below = cum;
            lower = self.le[i];
        }
        Some(lower)
    }
}

/// An engine's figures from one page of metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    pub running: f64,
    pub waiting: f64,
    /// 0 to 1, when the engine writes it.
    pub kv_usage: Option<f64>,
    pub ttft: Histogram,
}

/// What a page of metrics turned out to be. (Returned by value once per
/// scrape: the histogram's fixed array is cheaper there than a box.)
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Page {
    Engine(EngineKind, Figures),
    /// Prometheus text without any engine family the agent reads.
    NoEngine,
    /// Not Prometheus text (or lines that cannot be read), with the first
    /// offending line for the log.
    Garbage(String),
}

/// Reads a page of metrics. `kind`: the dialect to read, or `None` to
/// detect it (the first family of a known engine decides).
pub fn read(page: &[u8], kind: Option<EngineKind>) -> Page {
    let Ok(text) = std::str::from_utf8(page) else {
        return Page::Garbage("the page is not UTF-8 text".into());
    };
    let kind = match kind {
        Some(k) => k,
        None => match detect(text) {
            Some(k) => k,
            None => {
                return match first_bad_line(text) {
                    Some(bad) => Page::Garbage(bad),
                    None => Page::NoEngine,
                };
            }
        },
    };
    let families = kind.families();
    let mut figures = Figures::default();
    let mut seen_running = false;
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(sample) = Sample::parse(line) else {
            return Page::Garbage(clip(line));
        };
        let v = sample.value;
        if v.is_nan() {
            continue;
        }
        if families.running.contains(&sample.name) {
            seen_running = true;
            figures.running += v.max(0.0);
        } else if families.waiting.contains(&sample.name) {
            figures.waiting += v.max(0.0);
        } else if families.kv.contains(&sample.name) {
            let v = v.clamp(0.0, 1.0);
            figures.kv_usage = Some(figures.kv_usage.map_or(v, |k: f64| k.max(v)));
        } else if families.ttft_bucket.contains(&sample.name)
            && let Some(le) = sample.label("le")
            && let Ok(le) = parse_value(le)
        {
            figures.ttft.add(le, v.max(0.0));
        }
    }
    if !seen_running {
        return Page::Garbage(format!(
            "no `{}` in the page, so it is not {kind}'s metrics",
            families.running[0]
        ));
    }
    if !figures.running.is_finite() || !figures.waiting.is_finite() {
        return Page::Garbage("running or waiting requests are not finite".into());
    }
    Page::Engine(kind, figures)
}

fn detect(text: &str) -> Option<EngineKind> {
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line
            .split(|c: char| c == '{' || c.is_ascii_whitespace())
            .next()
            .unwrap_or_default();
        for kind in EngineKind::ALL {
            if kind.families().running.contains(&name) {
                return Some(kind);
            }
        }
    }
    None
}

fn first_bad_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find(|l| Sample::parse(l).is_none())
        .map(clip)
}

fn clip(line: &str) -> String {
    let mut end = line.len().min(80);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// One sample line, borrowed from the page.
struct Sample<'a> {
    name: &'a str,
    /// The text between the braces (empty when none).
    labels: &'a str,
    value: f64,
}

impl<'a> Sample<'a> {
    /// `name{labels} value [timestamp]`, or `None` when it is not one.
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            || name.as_bytes()[0].is_ascii_digit()
        {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = "";
        if let Some(inner) = rest.strip_prefix('{') {
            let close = closing_brace(inner)?;
            labels = &inner[..close];
            rest = &inner[close + 1..];
        }
        let mut fields = rest.split_ascii_whitespace();
        let value = parse_value(fields.next()?).ok()?;
        // An optional timestamp, then nothing.
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().ok()?;
        }
        if fields.next().is_some() {
            return None;
        }
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// The value of label `key`, unescaped only as far as the numbers and
    /// names read here need (no escapes in them).
    fn label(&self, key: &str) -> Option<&'a str> {
        let mut rest = self.labels;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if rest.is_empty() {
                return None;
            }
            let eq = rest.find('=')?;
            let k = rest[..eq].trim();
            let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
            let end = closing_quote(after)?;
            if k == key {
                return Some(&after[..end]);
            }
            rest = &after[end + 1..];
        }
    }
}

/// Where the label set that `s` starts inside ends (the index of its `}`),
/// skipping braces inside quoted values.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(s: &str) -> Result<f64, std::num::ParseFloatError> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse(),
    }
}

/// Snapshots of the TTFT histogram over a few seconds, for its recent p90.
#[derive(Debug, Default)]
pub struct TtftWindow {
    /// (seconds since the first snapshot, histogram), oldest first.
    snapshots: std::collections::VecDeque<(Duration, Histogram)>,
}

/// How far back the engine's TTFT percentile looks.
pub const TTFT_WINDOW: Duration = Duration::from_secs(5);

impl TtftWindow {
    /// Adds a snapshot taken at `at` (a monotonic offset) and returns the
    /// p90 of the requests that got their first token in the last
    /// [`TTFT_WINDOW`], in seconds.
    pub fn push(&mut self, at: Duration, h: Histogram) -> Option<f64> {
        if let Some((_, last)) = self.snapshots.back()
            && (last.len != h.len || h.total() < last.total())
        {
            // A new layout or a counter reset: the engine restarted.
            self.snapshots.clear();
        }
        while self
            .snapshots
            .front()
            .is_some_and(|(t, _)| at.saturating_sub(*t) > TTFT_WINDOW)
            && self.snapshots.len() > 1
        {
            self.snapshots.pop_front();
        }
        let p90 = self
            .snapshots
            .front()
            .and_then(|(_, old)| h.quantile_since(old, 0.9));
        self.snapshots.push_back((at, h));
        p90
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 8530.0
process_resident_memory_bytes 1.2345e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.91
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.4
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="llama"} 0.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="llama"} 18.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="llama"} 20.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 20.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 20.0
vllm:cache_config_info{block_size="16",label_with_brace="a}b, c=\"d\"",num_gpu_blocks="1024"} 1.0
"#;

    #[test]
    fn reads_vllm_and_detects_it() {
        let Page::Engine(kind, f) = read(VLLM.as_bytes(), None) else {
            panic!("not read: {:?}", read(VLLM.as_bytes(), None));
        };
        assert_eq!(kind, EngineKind::Vllm);
        assert_eq!((f.running, f.waiting), (10.0, 2.0));
        assert_eq!(f.kv_usage, Some(0.91));
        assert_eq!(f.ttft.len, 4);
        assert_eq!(f.ttft.total(), 20.0);
        // Declared: the same.
        assert_eq!(
            read(VLLM.as_bytes(), Some(EngineKind::Vllm)),
            read(VLLM.as_bytes(), None)
        );
    }

    #[test]
    fn reads_sglang_and_llamacpp() {
        let sglang = "sglang:num_running_reqs{model_name=\"m\"} 4\n\
                      sglang:num_queue_reqs{model_name=\"m\"} 1\n\
                      sglang:token_usage{model_name=\"m\"} 0.5\n";
        assert_eq!(
            read(sglang.as_bytes(), None),
            Page::Engine(
                EngineKind::Sglang,
                Figures {
                    running: 4.0,
                    waiting: 1.0,
                    kv_usage: Some(0.5),
                    ttft: Histogram::default()
                }
            )
        );
        let llama = "# HELP llamacpp:requests_processing Number of requests processing.\n\
                     # TYPE llamacpp:requests_processing gauge\n\
                     llamacpp:requests_processing 2\n\
                     llamacpp:requests_deferred 5\n";
        let Page::Engine(EngineKind::Llamacpp, f) = read(llama.as_bytes(), None) else {
            panic!()
        };
        assert_eq!((f.running, f.waiting, f.kv_usage), (2.0, 5.0, None));
    }

    #[test]
    fn tells_no_engine_from_garbage() {
        let plain = "# TYPE up gauge\nup 1\nhttp_requests_total{code=\"200\"} 3 1700000000000\n";
        assert_eq!(read(plain.as_bytes(), None), Page::NoEngine);
        for junk in [
            &b"<html>oops</html>"[..],
            b"vllm:num_requests_running{model_name=\"m\" 3\n",
            b"vllm:num_requests_running three\n",
            b"\xff\xfe\x00garbage",
        ] {
            assert!(
                matches!(read(junk, None), Page::Garbage(_)),
                "{:?}",
                String::from_utf8_lossy(junk)
            );
        }
        // Declared vLLM, but the page is another engine's.
        assert!(matches!(
            read(b"sglang:num_running_reqs 1\n", Some(EngineKind::Vllm)),
            Page::Garbage(_)
        ));
    }

    #[test]
    fn p90_over_the_window() {
        let Page::Engine(_, before) = read(VLLM.as_bytes(), None) else {
            panic!()
        };
        let mut after = before.ttft;
        // Ten more requests, all between 0.1 and 0.25 s.
        for i in 2..after.len {
            after.count[i] += 10.0;
        }
        let p90 = after.quantile_since(&before.ttft, 0.9).unwrap();
        assert!((0.1..=0.25).contains(&p90), "{p90}");
        assert_eq!(before.ttft.quantile_since(&before.ttft, 0.9), None);
        let mut w = TtftWindow::default();
        assert_eq!(w.push(Duration::ZERO, before.ttft), None);
        assert_eq!(w.push(Duration::from_secs(1), after), Some(p90));
        // Six seconds on with nothing new: the old burst is out of the window.
        assert_eq!(w.push(Duration::from_secs(7), after), None);
        assert_eq!(w.push(Duration::from_secs(8), after), None);
    }

    #[test]
    fn parses_metrics_modes() {
        assert_eq!("auto".parse(), Ok(MetricsMode::Auto));
        assert_eq!("none".parse(), Ok(MetricsMode::None));
        assert_eq!(
            "sglang".parse(),
            Ok(MetricsMode::Engine(EngineKind::Sglang))
        );
        assert_eq!(
            "bogus".parse::<MetricsMode>().unwrap_err(),
            "unknown metrics `bogus`: one of auto, vllm, sglang, llamacpp, none"
        );
    }
}
