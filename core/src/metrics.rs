//! A small metrics registry rendered as Prometheus text: counters, gauges
//! and latency histograms, each family declared once with its help. The
//! agent and the control plane each declare theirs (`AGENT`, `CONTROL_PLANE`)
//! and serve them at `GET /metrics`. Labels are profiles, regions, outcomes:
//! never a tenant secret or content.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// (name, type, help) of a family.
pub type Family = (&'static str, &'static str, &'static str);

/// The agent's families, in the order they are written.
pub const AGENT: &[Family] = &[
    (
        "spillway_agent_calls_total",
        "counter",
        "Calls taken by this agent's front doors, by profile, serving region and outcome.",
    ),
    (
        "spillway_agent_call_duration_seconds",
        "histogram",
        "Time from a call's arrival to the end of its answer.",
    ),
    (
        "spillway_agent_time_to_first_token_seconds",
        "histogram",
        "Time from a streamed call's arrival to the first byte of its answer.",
    ),
    (
        "spillway_agent_tokens_total",
        "counter",
        "Tokens of answered calls, by profile and direction (input, output).",
    ),
    (
        "spillway_agent_throttled_total",
        "counter",
        "Calls refused 429, by profile and cause: quota (a quota of this region) or capacity (every region tried was saturated).",
    ),
    (
        "spillway_agent_spilled_total",
        "counter",
        "Calls served by another region than this agent's, by profile and serving region.",
    ),
    (
        "spillway_agent_relay_served_total",
        "counter",
        "Calls relayed to this agent by another region's agent, by source region and outcome.",
    ),
    (
        "spillway_agent_ejections_total",
        "counter",
        "Regions ejected after failing calls in a row, by region.",
    ),
    (
        "spillway_agent_config_version",
        "gauge",
        "The config version this agent runs.",
    ),
    (
        "spillway_agent_connections_closed_total",
        "counter",
        "Connections the agent closed or refused, by reason: header_timeout (a request head or TLS handshake too slow), idle, evicted (idle, to make room at the connection limit), limit (refused at the connection limit).",
    ),
];

/// The control plane's families.
pub const CONTROL_PLANE: &[Family] = &[
    (
        "spillway_cp_agents",
        "gauge",
        "Agents connected to any replica, by region.",
    ),
    (
        "spillway_cp_agents_behind",
        "gauge",
        "Agents whose ACKed config version is behind the version last sent to them, by region.",
    ),
    (
        "spillway_cp_config_version",
        "gauge",
        "The config version this replica serves.",
    ),
    (
        "spillway_cp_leader",
        "gauge",
        "1 while this replica is the leader (weights and quota leases).",
    ),
    (
        "spillway_cp_connections_refused_total",
        "counter",
        "gRPC connections closed at once because --max-connections were open.",
    ),
    (
        "spillway_cp_updates_sent_total",
        "counter",
        "Config updates this replica sent to agents.",
    ),
    (
        "spillway_cp_nacks_total",
        "counter",
        "Config updates agents refused.",
    ),
    (
        "spillway_cp_lease_writes_total",
        "counter",
        "Quota lease records the leader wrote.",
    ),
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The registry. Each call updates it a few times under one short lock.
///
/// Series are found by a hash of their labels, so that an update allocates
/// nothing once its series exists; the label text is built once, when the
/// series first appears.
#[derive(Debug)]
pub struct Metrics {
    families: &'static [Family],
    counters: Series<u64>,
    gauges: Series<f64>,
    histograms: Series<Histogram>,
}

/// Series of one kind: by (family, hash of the labels), the label text and
/// the value.
type Series<T> = Mutex<HashMap<(&'static str, u64), (String, T)>>;

fn key(pairs: &[(&str, &str)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pairs.hash(&mut h);
    h.finish()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{a="x",b="y"}` for the given pairs.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    pub fn new(families: &'static [Family]) -> Metrics {
        Metrics {
            families,
            counters: Mutex::default(),
            gauges: Mutex::default(),
            histograms: Mutex::default(),
        }
    }

    pub fn add(&self, name: &'static str, pairs: &[(&str, &str)], n: u64) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.entry((name, key(pairs)))
            .or_insert_with(|| (labels(pairs), 0))
            .1 += n;
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&str, &str)], d: Duration) {
        let secs = d.as_secs_f64();
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let entry = &mut h
            .entry((name, key(pairs)))
            .or_insert_with(|| (labels(pairs), Histogram::default()))
            .1;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                entry.counts[i] += 1;
            }
        }
        entry.count += 1;
        entry.sum += secs;
    }

    pub fn set(&self, name: &'static str, pairs: &[(&str, &str)], v: f64) {
        let mut g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.insert((name, key(pairs)), (labels(pairs), v));
    }

    /// Drops every series of a gauge (before setting the current ones).
    pub fn clear(&self, name: &'static str) {
        let mut g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|(n, _), _| *n != name);
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        fn sorted<T: Clone>(m: &Series<T>) -> BTreeMap<(&'static str, String), T> {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((n, _), (l, v))| ((*n, l.clone()), v.clone()))
                .collect()
        }
        let counters = sorted(&self.counters);
        let histograms = sorted(&self.histograms);
        let gauges = sorted(&self.gauges);
        let mut out = String::new();
        for (name, kind, help) in self.families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            match *kind {
                "counter" => {
                    for ((n, l), v) in counters.iter().filter(|((n, _), _)| n == name) {
                        let l = if l == "{}" { "" } else { l.as_str() };
                        let _ = writeln!(out, "{n}{l} {v}");
                    }
                }
                "histogram" => {
                    for ((n, l), h) in histograms.iter().filter(|((n, _), _)| n == name) {
                        // `{a="x"}` becomes `{a="x",le="0.1"}`.
                        let open = &l[..l.len() - 1];
                        let sep = if open.len() > 1 { "," } else { "" };
                        for (i, bound) in BUCKETS.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{n}_bucket{open}{sep}le=\"{bound}\"}} {}",
                                h.counts[i]
                            );
                        }
                        let _ = writeln!(out, "{n}_bucket{open}{sep}le=\"+Inf\"}} {}", h.count);
                        let _ = writeln!(out, "{n}_sum{l} {}", h.sum);
                        let _ = writeln!(out, "{n}_count{l} {}", h.count);
                    }
                }
                _ => {
                    for ((n, l), v) in gauges.iter().filter(|((n, _), _)| n == name) {
                        let l = if l == "{}" { "" } else { l.as_str() };
                        let _ = writeln!(out, "{n}{l} {v}");
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_the_gauge() {
        let m = Metrics::new(AGENT);
        m.add(
            "spillway_agent_throttled_total",
            &[("profile", "us.m"), ("cause", "quota")],
            2,
        );
        m.observe(
            "spillway_agent_call_duration_seconds",
            &[("profile", "us.m"), ("inference_region", "us-east")],
            Duration::from_millis(30),
        );
        m.set("spillway_agent_config_version", &[], 7.0);
        let text = m.render();
        assert!(
            text.contains("spillway_agent_throttled_total{profile=\"us.m\",cause=\"quota\"} 2")
        );
        assert!(text.contains("spillway_agent_call_duration_seconds_bucket{profile=\"us.m\",inference_region=\"us-east\",le=\"0.025\"} 0"));
        assert!(text.contains("spillway_agent_call_duration_seconds_bucket{profile=\"us.m\",inference_region=\"us-east\",le=\"0.05\"} 1"));
        assert!(text.contains("spillway_agent_call_duration_seconds_count{profile=\"us.m\",inference_region=\"us-east\"} 1"));
        assert!(text.contains("spillway_agent_config_version 7"));
        assert_eq!(labels(&[("p", "a\"b")]), "{p=\"a\\\"b\"}");
    }
}
