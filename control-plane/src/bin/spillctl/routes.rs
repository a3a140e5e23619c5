//! `spillctl routes`: route tables (per profile and source region, the
//! destination regions with their weights and priorities), and the
//! effective weights that calls follow now.

use clap::Subcommand;
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, RevisionArg, all_pages, call, status_line};
use crate::output::{Output, Shown, deleted, list, one, render};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create or replace the route table of a profile for one source region.
    Set {
        profile: String,
        /// The source region whose calls this table routes.
        #[arg(long, short = 's')]
        source: String,
        /// A destination: region=weight or region=weight:priority (lower
        /// priorities are tried first); repeatable.
        #[arg(long = "dest", required = true, value_parser = parse_dest)]
        destinations: Vec<pb::RouteDestination>,
        /// Time-to-first-token objective, in milliseconds (1 to 600000): a
        /// model server whose engine reports a TTFT p90 above it counts as
        /// saturated for this table's calls, so they spill. 0 removes it;
        /// without this flag, a table being replaced keeps its objective.
        #[arg(long, value_name = "MS")]
        ttft_objective_ms: Option<u32>,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Show the route table of a profile for one source region.
    Get {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
    },
    /// List route tables, of one profile or of all.
    List {
        #[arg(long)]
        profile: Option<String>,
    },
    /// Show the effective weights that calls from SOURCE follow now, the
    /// reason for each (headroom, spill, drained, panic, override), and the
    /// load figures they came from.
    Explain {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
    },
    /// Delete a route table; calls then follow the default (source first).
    Delete {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

fn parse_dest(s: &str) -> Result<pb::RouteDestination, String> {
    let (region, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not region=weight[:priority]"))?;
    let (weight, priority) = match rest.split_once(':') {
        Some((w, p)) => (
            w,
            p.parse::<u32>()
                .map_err(|_| format!("priority `{p}` is not a whole number"))?,
        ),
        None => (rest, 0),
    };
    let weight = weight
        .parse::<f64>()
        .map_err(|_| format!("weight `{weight}` is not a number"))?;
    Ok(pb::RouteDestination {
        region: region.to_string(),
        weight,
        priority,
    })
}

impl Shown for pb::RouteTable {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("PROFILE", "profile"),
        ("SOURCE", "source_region"),
        ("DESTINATIONS", "destinations"),
        ("TTFT OBJECTIVE", "ttft_objective"),
        ("REVISION", "revision"),
    ];

    fn json(&self) -> Value {
        let dests: Vec<Value> = self
            .destinations
            .iter()
            .map(|d| json!({"region": d.region, "weight": d.weight, "priority": d.priority}))
            .collect();
        let objective = (self.ttft_objective_ms > 0).then_some(self.ttft_objective_ms);
        json!({
            "profile": self.profile, "source_region": self.source_region, "destinations": dests,
            "ttft_objective_ms": objective,
            "ttft_objective": objective.map_or_else(|| "none".to_string(), |ms| format!("{ms} ms")),
            "revision": self.revision,
        })
    }
}

/// The objective a table written by `routes set` gets: the flag's (0: none),
/// else the one of the table it replaces, if any.
fn objective_to_write(flag: Option<u32>, existing: Option<&pb::RouteTable>) -> u32 {
    flag.unwrap_or_else(|| existing.map_or(0, |t| t.ttft_objective_ms))
}

/// The TTFT objective that applies to calls of `profile` from `source`: an
/// application profile follows the route table of the profile it copies,
/// and with no table there is none.
async fn objective_for(c: &mut Client, profile: &str, source: &str) -> anyhow::Result<u32> {
    let p = call(c.get_profile(pb::GetProfileRequest { id: profile.into() })).await?;
    let owner = if p.base_profile.is_empty() {
        p.id
    } else {
        p.base_profile
    };
    let get = pb::GetRouteTableRequest {
        profile: owner,
        source_region: source.into(),
    };
    match c.get_route_table(get).await {
        Ok(t) => Ok(t.into_inner().ttft_objective_ms),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(0),
        Err(s) => Err(status_line(s)),
    }
}

/// The engines' part of an explained destination, e.g. `kv 91%, 6 waiting,
/// 12 running, 2/2 servers saturated, ttft p90 180 ms`, with only what is
/// known: no KV usage when no engine reports one, and where no server
/// reports engine figures, the limit learned from time to first token
/// instead. Empty when the region reported no model server.
fn engines_text(d: &pb::ExplainedDestination) -> String {
    if d.servers == 0 {
        return String::new();
    }
    // An idle engine may report all zeros and no KV usage (llama.cpp):
    // it then reads as a server without engine figures, which for an idle
    // server says nothing wrong.
    let engines = d.kv_usage.is_some()
        || d.engine_running > 0.0
        || d.engine_waiting > 0.0
        || d.engine_ttft_p90_ms > 0.0;
    let mut parts = Vec::new();
    if engines {
        if let Some(kv) = d.kv_usage {
            parts.push(format!("kv {:.0}%", kv * 100.0));
        }
        parts.push(format!("{:.0} waiting", d.engine_waiting));
        parts.push(format!("{:.0} running", d.engine_running));
    } else {
        parts.push(format!("learned limit {:.0}", d.learned_limit));
    }
    parts.push(format!(
        "{}/{} servers saturated",
        d.saturated_servers, d.servers
    ));
    if d.engine_ttft_p90_ms > 0.0 {
        parts.push(format!("ttft p90 {:.0} ms", d.engine_ttft_p90_ms));
    }
    parts.join(", ")
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Set {
            profile,
            source,
            destinations,
            ttft_objective_ms,
            revision,
        } => {
            let get = pb::GetRouteTableRequest {
                profile: profile.clone(),
                source_region: source.clone(),
            };
            let existing = match c.get_route_table(get).await {
                Ok(t) => Some(t.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(status_line(s)),
            };
            let mut table = pb::RouteTable {
                profile,
                source_region: source,
                destinations,
                ttft_objective_ms: objective_to_write(ttft_objective_ms, existing.as_ref()),
                revision: 0,
            };
            let written = match existing {
                Some(current) => {
                    table.revision = revision.or(current.revision);
                    call(c.update_route_table(pb::UpdateRouteTableRequest {
                        route_table: Some(table),
                    }))
                    .await?
                }
                None => {
                    call(c.create_route_table(pb::CreateRouteTableRequest {
                        route_table: Some(table),
                    }))
                    .await?
                }
            };
            one(out, &written)
        }
        Cmd::Get { profile, source } => {
            let req = pb::GetRouteTableRequest {
                profile,
                source_region: source,
            };
            one(out, &call(c.get_route_table(req)).await?)
        }
        Cmd::List { profile } => {
            let req = pb::ListRouteTablesRequest {
                profile: profile.unwrap_or_default(),
                ..Default::default()
            };
            list(out, &all_pages!(c, list_route_tables, req, route_tables))
        }
        Cmd::Explain { profile, source } => explain(c, profile, source, out).await?,
        Cmd::Delete {
            profile,
            source,
            revision,
        } => {
            let name = format!("{profile}/{source}");
            let req = pb::DeleteRouteTableRequest {
                profile,
                source_region: source,
                revision: revision.or(0),
            };
            let rev = call(c.delete_route_table(req)).await?.revision;
            deleted(out, "route table", &name, rev)
        }
    })
}

/// `routes explain`: the effective weights from SOURCE, with their reasons
/// and the load figures behind them.
async fn explain(
    c: &mut Client,
    profile: String,
    source: String,
    out: Output,
) -> anyhow::Result<String> {
    let req = pb::ExplainRouteRequest {
        profile: profile.clone(),
        source_region: source.clone(),
    };
    let e = call(c.explain_route(req)).await?;
    let objective = objective_for(c, &profile, &source).await?;
    if out == Output::Json {
        let dests: Vec<Value> = e
            .destinations
            .iter()
            .map(|d| {
                json!({
                    "region": d.region, "base_weight": d.base_weight, "priority": d.priority,
                    "weight": d.weight, "reason": d.reason, "capacity": d.capacity,
                    "in_flight": d.in_flight, "error_rate": d.error_rate, "reporting": d.reporting,
                    "ttft_ms": d.ttft_ms, "output_tokens_per_second": d.output_tokens_per_second,
                    "engine_running": d.engine_running, "engine_waiting": d.engine_waiting,
                    "kv_usage": d.kv_usage, "learned_limit": d.learned_limit,
                    "engine_ttft_p90_ms": d.engine_ttft_p90_ms, "servers": d.servers,
                    "saturated_servers": d.saturated_servers,
                })
            })
            .collect();
        let v = json!({
            "profile": e.profile, "source_region": e.source_region, "model": e.model,
            "ttft_objective_ms": (objective > 0).then_some(objective),
            "leader": e.leader, "destinations": dests,
        });
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    let rows: Vec<Value> = e
        .destinations
        .iter()
        .map(|d| {
            let load = if d.reporting {
                format!(
                    "{:.0}/{:.0} in flight, {:.0}% errors, ttft {:.1} ms, {:.0} tokens/s",
                    d.in_flight,
                    d.capacity,
                    d.error_rate * 100.0,
                    d.ttft_ms,
                    d.output_tokens_per_second
                )
            } else {
                "no reports".to_string()
            };
            json!({
                "region": d.region,
                "base": format!("{}:{}", d.base_weight, d.priority),
                "weight": format!("{:.3}", d.weight),
                "reason": d.reason,
                "load": load,
                "servers": if d.reporting { engines_text(d) } else { String::new() },
            })
        })
        .collect();
    let leader = if e.leader.is_empty() {
        "nobody yet"
    } else {
        e.leader.as_str()
    };
    let objective = if objective > 0 {
        format!(", ttft objective {objective} ms")
    } else {
        String::new()
    };
    let head = format!(
        "{} from {} (model {}{objective}), weights computed by {leader}\n",
        e.profile, e.source_region, e.model
    );
    Ok(head
        + &render(
            Output::Table,
            rows,
            &[
                ("REGION", "region"),
                ("BASE WEIGHT:PRIORITY", "base"),
                ("WEIGHT", "weight"),
                ("REASON", "reason"),
                ("LOAD", "load"),
                ("SERVERS", "servers"),
            ],
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn set(args: &[&str]) -> Option<u32> {
        let mut argv = vec!["spillctl", "routes", "set", "p", "-s", "a", "--dest", "a=1"];
        argv.extend(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Routes(Cmd::Set {
                ttft_objective_ms, ..
            }) => ttft_objective_ms,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes_set_keeps_sets_or_clears_the_ttft_objective() {
        let existing = pb::RouteTable {
            ttft_objective_ms: 800,
            ..Default::default()
        };
        // Without the flag a replaced table keeps its objective; a new
        // one has none.
        assert_eq!(set(&[]), None);
        assert_eq!(objective_to_write(set(&[]), Some(&existing)), 800);
        assert_eq!(objective_to_write(set(&[]), None), 0);
        let given = set(&["--ttft-objective-ms", "1500"]);
        assert_eq!(objective_to_write(given, Some(&existing)), 1500);
        // 0 clears it.
        let cleared = set(&["--ttft-objective-ms", "0"]);
        assert_eq!(objective_to_write(cleared, Some(&existing)), 0);
        // Not a count of milliseconds: refused before anything is sent.
        for bad in ["-5", "fast", "1.5"] {
            let argv = [
                "spillctl",
                "routes",
                "set",
                "p",
                "-s",
                "a",
                "--dest",
                "a=1",
                "--ttft-objective-ms",
                bad,
            ];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn route_tables_show_their_objective() {
        let mut t = pb::RouteTable {
            profile: "p".into(),
            source_region: "a".into(),
            destinations: vec![pb::RouteDestination {
                region: "a".into(),
                weight: 1.0,
                priority: 0,
            }],
            ttft_objective_ms: 1500,
            revision: 7,
        };
        let table = one(Output::Table, &t);
        assert!(
            table.lines().next().unwrap().contains("TTFT OBJECTIVE"),
            "{table}"
        );
        assert!(table.lines().nth(1).unwrap().contains("1500 ms"), "{table}");
        assert_eq!(t.json()["ttft_objective_ms"], 1500);
        t.ttft_objective_ms = 0;
        assert!(one(Output::Table, &t).contains("none"));
        assert_eq!(t.json()["ttft_objective_ms"], Value::Null);
    }

    #[test]
    fn explain_shows_what_the_engines_say() {
        let engines = pb::ExplainedDestination {
            engine_running: 12.0,
            engine_waiting: 6.0,
            kv_usage: Some(0.91),
            learned_limit: 9.0,
            engine_ttft_p90_ms: 180.0,
            servers: 2,
            saturated_servers: 2,
            ..Default::default()
        };
        assert_eq!(
            engines_text(&engines),
            "kv 91%, 6 waiting, 12 running, 2/2 servers saturated, ttft p90 180 ms"
        );
        // No KV usage reported (llama.cpp): none shown.
        let slots = pb::ExplainedDestination {
            kv_usage: None,
            ..engines.clone()
        };
        assert_eq!(
            engines_text(&slots),
            "6 waiting, 12 running, 2/2 servers saturated, ttft p90 180 ms"
        );
        // No engine metrics: the learned limit instead.
        let learned = pb::ExplainedDestination {
            learned_limit: 7.0,
            servers: 3,
            saturated_servers: 0,
            ..Default::default()
        };
        assert_eq!(
            engines_text(&learned),
            "learned limit 7, 0/3 servers saturated"
        );
        assert_eq!(engines_text(&pb::ExplainedDestination::default()), "");
    }
}
