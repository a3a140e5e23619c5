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
        "spillway_agent_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "notAfter, in Unix seconds, of the certificate the agent presents now (updated when its files are reloaded).",
    ),
    (
        "spillway_agent_tls_reloads_total",
        "counter",
        "The agent's TLS files by outcome: loaded (at start), reloaded (changed files in use), refused (changed files that cannot be used; the previous certificate stays).",
    ),
    (
        "spillway_agent_connections_closed_total",
        "counter",
        "Connections the agent closed or refused, by reason: header_timeout (a request head or TLS handshake too slow), idle, evicted (idle, to make room at the connection limit), limit (refused at the connection limit).",
    ),
    (
        "spillway_agent_relay_errors_total",
        "counter",
        "Relay attempts to an agent of inference_region that failed before the answer's first byte (its head), by cause: connect (no connection: refused, unreachable, a bad address), tls (the handshake failed, or the peer's certificate is not an agent's of that region), timeout (connecting, the destination's acknowledgment or its head, or the channel's pings took too long), refused (the destination answered the call with an error: at capacity, unavailable, not served, a call it will not take, a head for another region), reset (the connection or the call broke off before the head with no status from the destination; this includes calls a hung destination had taken when the channel's pings gave up on it, as such a call only learns that its connection closed). Calls with no agent of the region to relay to are not attempts and not counted.",
    ),
    (
        "spillway_agent_audit_write_errors_total",
        "counter",
        "Failures of the audit writer, by op: create_dir (the audit folder, tried again before each batch while it fails), open (the current file), write (a batch, or syncing the file to disk), rotate (renaming the full file, or syncing it first). Each may lose audit records.",
    ),
    (
        "spillway_agent_audit_dropped_total",
        "counter",
        "Audit records dropped because the audit writer's queue was full (it fell behind).",
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
        "spillway_cp_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "notAfter, in Unix seconds, of the certificate this replica presents now (updated when its files are reloaded).",
    ),
    (
        "spillway_cp_tls_reloads_total",
        "counter",
        "This replica's TLS files by outcome: loaded (at start), reloaded (changed files in use), refused (changed files that cannot be used; the previous certificate stays).",
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
        "spillway_cp_resources_sent_total",
        "counter",
        "Resources (added or changed) this replica sent to agents in config updates, by kind (region, endpoint, profile, route, weights, elsewhere, quota, tenant, key), and removals (kind removed).",
    ),
    (
        "spillway_cp_update_bytes_total",
        "counter",
        "Encoded bytes of the config updates this replica sent to agents (protobuf, before gRPC framing).",
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
    (
        "spillway_cp_effective_weight",
        "gauge",
        "The leader's current effective weight (0 to 1) of inference_region in the route table of profile for source_region, as of its last weights update, with the reason (headroom, spill, drained, panic, override). 0 means the table sends it no calls: drained (reason drained), or waiting behind a priority level with headroom, or given no base weight. Only the leader reports it.",
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

    /// Makes `series` (labels, value) the only series of a gauge, under
    /// one lock: a scrape sees the family before or after, never half
    /// cleared, and a series left out (a table that went) is gone.
    pub fn replace<'a, L>(&self, name: &'static str, series: impl IntoIterator<Item = (L, f64)>)
    where
        L: AsRef<[(&'a str, &'a str)]>,
    {
        // Labels are rendered before the lock is taken.
        let fresh: Vec<_> = series
            .into_iter()
            .map(|(pairs, v)| {
                let pairs = pairs.as_ref();
                ((name, key(pairs)), (labels(pairs), v))
            })
            .collect();
        let mut g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|(n, _), _| *n != name);
        g.extend(fresh);
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

    #[test]
    fn a_gauge_family_is_replaced_whole_or_cleared() {
        let m = Metrics::new(CONTROL_PLANE);
        let w = "spillway_cp_effective_weight";
        let series = |p: &'static str, r: &'static str| {
            [
                ("profile", p),
                ("source_region", "s"),
                ("inference_region", r),
            ]
        };
        m.replace(w, [(series("p", "a"), 0.75), (series("p", "b"), 0.25)]);
        m.set("spillway_cp_leader", &[], 1.0);
        let text = m.render();
        assert!(text.contains(
            "spillway_cp_effective_weight{profile=\"p\",source_region=\"s\",inference_region=\"a\"} 0.75"
        ));
        assert!(text.contains("inference_region=\"b\"} 0.25"), "{text}");
        // Region b went from the table: its series goes with it.
        m.replace(w, [(series("p", "a"), 1.0)]);
        let text = m.render();
        assert!(text.contains("inference_region=\"a\"} 1\n"), "{text}");
        assert!(!text.contains("inference_region=\"b\""), "{text}");
        // Clearing drops the family's series, and only those.
        m.clear(w);
        let text = m.render();
        assert!(!text.contains("spillway_cp_effective_weight{"), "{text}");
        assert!(text.contains("# TYPE spillway_cp_effective_weight gauge"));
        assert!(text.contains("spillway_cp_leader 1"), "{text}");
    }
}
