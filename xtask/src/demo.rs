//! `cargo xtask demo`: a local three-region cluster with simulated model
//! servers, a burst of traffic that saturates one region, and a table of
//! where the calls were served.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, find, free_port, run, target_dir, wait_for};

const REGIONS: &[(&str, &str)] = &[("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")];
const MODEL: &str = "llama-3.1-8b";
/// Concurrent sequences of each us-east model server: small, so that the
/// burst saturates us-east and spills.
/// Calls each of us-east's engines holds by KV cache: the demo's call
/// takes about 41 KV tokens (a 100-byte prompt and 16 output tokens).
const EAST_CAPACITY: u32 = 4;
const EAST_KV_TOKENS: &str = "170";
const OTHER_CAPACITY: u32 = 32;
const BURST: usize = 48;

/// Children that are killed when the demo ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Agent {
    region: &'static str,
    grpc: u16,
    http: u16,
}

pub fn demo(exit_after: bool) -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--bins",
        "-p",
        "spillway-control-plane",
        "-p",
        "spillway-agent",
        "-p",
        "spillway-tests",
    ]);
    run(
        build,
        "building the control plane, the agent and the model-server simulator",
    )?;
    let target = target_dir()?;
    let bin = target.join("debug");
    let dir = target.join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
    };
    let mut procs = Procs(Vec::new());

    // etcd when installed, else the embedded store.
    println!(
        "(the demo talks plaintext, with --insecure-dev; the README shows TLS with `cargo xtask certs`)"
    );
    let mut cp_args: Vec<String> = Vec::new();
    if let Some(etcd) = find("etcd") {
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(etcd)
            .args(["--name", "demo", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("demo={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log("etcd")?)
            .spawn()
            .context("starting etcd")?;
        procs.0.push(child);
        wait_for("etcd", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", client)).is_ok()
        })?;
        println!(
            "store:          etcd at {url} (data in {})",
            dir.join("etcd").display()
        );
        cp_args = vec!["--etcd-endpoints".into(), url];
    } else {
        println!("store:          embedded in-memory store (etcd is not installed)");
    }

    let cp_port = free_port()?;
    let cp_url = format!("http://127.0.0.1:{cp_port}");
    let child = Command::new(bin.join("spillway-control-plane"))
        .args([
            "--listen",
            &format!("127.0.0.1:{cp_port}"),
            "--insecure-dev",
            "--replica-id",
            "demo-cp",
        ])
        .args(&cp_args)
        .stdout(Stdio::null())
        .stderr(log("control-plane")?)
        .spawn()
        .context("starting the control plane")?;
    procs.0.push(child);
    wait_for("the control plane", Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", cp_port)).is_ok()
    })?;
    println!("control plane:  {cp_url} (logs: {}/*.log)", dir.display());

    let spillctl = |args: &[&str]| -> Result<String> {
        let out = Command::new(bin.join("spillctl"))
            .args(["--control-plane", &cp_url])
            .args(args)
            .output()
            .context("running spillctl")?;
        if !out.status.success() {
            bail!(
                "spillctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for (region, geo) in REGIONS {
        spillctl(&["regions", "create", region, "--geography", geo])?;
    }
    let us = format!("us.{MODEL}");
    let eu = format!("eu.{MODEL}");
    let global = format!("global.{MODEL}");
    spillctl(&[
        "profiles",
        "create",
        &us,
        "--destinations",
        "us-east,us-west",
    ])?;
    spillctl(&["profiles", "create", &eu, "--destinations", "eu-west"])?;
    spillctl(&[
        "profiles",
        "create",
        &global,
        "--destinations",
        "us-east,us-west,eu-west",
    ])?;
    spillctl(&[
        "profiles",
        "create",
        "team-search",
        "--base-profile",
        &us,
        "--tag",
        "cost-center=search",
    ])?;

    // Two tenants, each with a key: acme may call everything; free-tier
    // may call the us profiles, under a quota of 30 requests a minute.
    spillctl(&["tenants", "create", "acme", "--profiles", "*"])?;
    spillctl(&[
        "tenants",
        "create",
        "free-tier",
        "--profiles",
        "us.*,team-search",
    ])?;
    spillctl(&["quotas", "create", "--tenant", "free-tier", "--rpm", "30"])?;
    let key_of = |tenant: &str| -> Result<String> {
        let out = spillctl(&["keys", "create", "--tenant", tenant, "-o", "json"])?;
        json_string(&out, "key").context("spillctl keys create printed no key")
    };
    let acme_key = key_of("acme")?;
    let free_key = key_of("free-tier")?;

    // Two simulated model servers and one agent per region.
    let mut agents = Vec::new();
    for (region, _) in REGIONS {
        let capacity = if *region == "us-east" {
            EAST_CAPACITY
        } else {
            OTHER_CAPACITY
        };
        let mut servers = Vec::new();
        for i in 1..=2 {
            // us-east runs engine-like simulators (continuous batching under
            // a KV-cache budget, vLLM's metrics) with no capacity given: the
            // agent reads their load from their metrics. The others are
            // simple simulators with a capacity.
            let east = *region == "us-east";
            let engine: &[&str] = if east {
                &["--engine", "vllm", "--kv-tokens", EAST_KV_TOKENS]
            } else {
                &[]
            };
            let (child, addr) =
                start_sim(&bin, capacity, engine, log(&format!("sim-{region}-{i}"))?)?;
            procs.0.push(child);
            // The simulator serves every API an engine can.
            let apis = "apis=chat|completions|embeddings|responses|messages";
            servers.push(if east {
                format!("http://{addr},models={MODEL},{apis}")
            } else {
                format!("http://{addr},models={MODEL},{apis},capacity={capacity}")
            });
        }
        let (grpc, http) = (free_port()?, free_port()?);
        let mut cmd = Command::new(bin.join("spillway-agent"));
        cmd.args([
            "--agent-id",
            &format!("{region}-1"),
            "--region",
            region,
            "--control-plane",
            &cp_url,
        ])
        .args([
            "--grpc-listen",
            &format!("127.0.0.1:{grpc}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ])
        .arg("--insecure-dev")
        .arg("--state-dir")
        .arg(dir.join(format!("agent-{region}")))
        .arg("--audit-dir")
        .arg(dir.join(format!("audit-{region}")));
        for s in &servers {
            cmd.args(["--model-server", s]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log(&format!("agent-{region}"))?)
            .spawn()
            .context("starting an agent")?;
        procs.0.push(child);
        agents.push(Agent { region, grpc, http });
    }
    wait_for(
        "every agent to ACK its config",
        Duration::from_secs(30),
        || {
            spillctl(&["agents", "list", "-o", "json"])
                .is_ok_and(|out| count_acked(&out) == REGIONS.len())
        },
    )?;
    for a in &agents {
        wait_for("the agents' HTTP doors", Duration::from_secs(10), || {
            get(a.http, "/health").is_ok_and(|r| r.status == 200)
        })?;
    }
    println!("\nprofiles:\n{}", spillctl(&["profiles", "list"])?);
    println!("agents:\n{}", spillctl(&["agents", "list"])?);

    // The burst: more calls at once than us-east's model servers take.
    let east = agents
        .iter()
        .find(|a| a.region == "us-east")
        .expect("us-east agent");
    println!(
        "sending {BURST} calls at once to us-east for `{us}` (us-east's two vLLM-mode engines hold about {} calls at a time by KV cache; no capacity is configured)...",
        2 * EAST_CAPACITY
    );
    let started = Instant::now();
    let body = format!(
        r#"{{"model":"{us}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}"#
    );
    let handles: Vec<_> = (0..BURST)
        .map(|_| {
            let (body, key) = (body.clone(), acme_key.clone());
            let port = east.http;
            std::thread::spawn(move || post(port, "/v1/chat/completions", &key, &body))
        })
        .collect();
    let mut served: Vec<(String, usize)> =
        REGIONS.iter().map(|(r, _)| (r.to_string(), 0)).collect();
    let (mut throttled, mut failed) = (0, 0);
    for h in handles {
        match h.join().expect("a request thread") {
            Ok(Answer {
                status: 200,
                region: Some(region),
                ..
            }) => {
                if let Some(row) = served.iter_mut().find(|(r, _)| *r == region) {
                    row.1 += 1;
                }
            }
            Ok(Answer { status: 429, .. }) => throttled += 1,
            _ => failed += 1,
        }
    }
    println!("done in {:.1?}\n", started.elapsed());
    println!("{:<12} {:>6}", "SERVED IN", "CALLS");
    for (region, n) in &served {
        let note = if region == "us-east" {
            "  (source)"
        } else if *n > 0 {
            "  (spilled over)"
        } else {
            ""
        };
        println!("{region:<12} {n:>6}{note}");
    }
    println!(
        "{:<12} {throttled:>6}\n{:<12} {failed:>6}",
        "throttled", "failed"
    );
    let spilled: usize = served
        .iter()
        .filter(|(r, _)| r != "us-east")
        .map(|(_, n)| n)
        .sum();
    println!(
        "\n{spilled} of {BURST} calls spilled over from us-east; every answer names its region in x-spillway-inference-region."
    );
    // Residency: every call is audited by the agent that took it, in its
    // region; the regions that served spilled calls keep no record of them.
    std::thread::sleep(Duration::from_millis(300));
    let audited = |region: &str| {
        std::fs::read_to_string(dir.join(format!("audit-{region}/audit.jsonl")))
            .map_or(0, |t| t.lines().count())
    };
    println!(
        "audit records: us-east {}, us-west {}, eu-west {} (in {}/audit-*: a spilled call is audited in its source region only)",
        audited("us-east"),
        audited("us-west"),
        audited("eu-west"),
        dir.display()
    );

    // Sustained saturation: the agents' load reports reach the control
    // plane, whose weight engine moves part of us-east's share to us-west;
    // when the load stops, us-east takes it back.
    println!(
        "\nkeeping us-east saturated for 4 s; the weight engine follows the load reports (routes explain shows the engines' KV cache and queue)..."
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..3 * EAST_CAPACITY as usize)
        .map(|_| {
            let (stop, body, port, key) = (stop.clone(), body.clone(), east.http, acme_key.clone());
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let _ = post(port, "/v1/chat/completions", &key, &body);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    println!(
        "{}",
        spillctl(&["routes", "explain", &us, "--source", "us-east"])?
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        let _ = c.join();
    }
    println!("load stopped; 5 s later:");
    std::thread::sleep(Duration::from_secs(5));
    println!(
        "{}",
        spillctl(&["routes", "explain", &us, "--source", "us-east"])?
    );

    // A throttled tenant: the same ten calls from each tenant, one after
    // the other; free-tier's quota lets one through every two seconds.
    println!(
        "\nten calls in a row from each tenant to us-east (free-tier: 30 requests a minute)..."
    );
    println!(
        "{:<12} {:>6} {:>20}",
        "TENANT", "SERVED", "THROTTLED BY QUOTA"
    );
    let mut example = None;
    for (tenant, key) in [("acme", &acme_key), ("free-tier", &free_key)] {
        let (mut ok, mut quota) = (0, 0);
        for _ in 0..10 {
            let a = post(east.http, "/v1/chat/completions", key, &body)?;
            match (a.status, a.throttle.as_deref()) {
                (200, _) => ok += 1,
                (429, Some("quota")) => {
                    quota += 1;
                    example.get_or_insert(a);
                }
                _ => {}
            }
        }
        println!("{tenant:<12} {ok:>6} {quota:>20}");
    }
    if let Some(a) = example {
        println!(
            "\na throttled answer (429, not spilled to another region: the quota is the source region's):\n{}\n{}",
            a.head
                .lines()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.starts_with("retry-after")
                        || l.starts_with("x-ratelimit")
                        || l.starts_with("x-spillway-throttle")
                })
                .collect::<Vec<_>>()
                .join("\n"),
            a.body.trim()
        );
    }

    write_cluster_json(
        &dir,
        &cp_url,
        &agents,
        &[&us, &eu, &global, "team-search"],
        &[("acme", &acme_key), ("free-tier", &free_key)],
    )?;
    let e = east.http;
    println!(
        "\nThe cluster is described in {} (with the tenants' API keys). Call it:\n\n  \
         export SPILLWAY_KEY={acme_key}\n  \
         curl -s http://127.0.0.1:{e}/v1/chat/completions -H \"Authorization: Bearer $SPILLWAY_KEY\" \\\n    \
         -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"{us}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -i\n\n  \
         python3 -c 'import os; from openai import OpenAI; c = OpenAI(base_url=\"http://127.0.0.1:{e}/v1\", api_key=os.environ[\"SPILLWAY_KEY\"]); \
         print(c.chat.completions.create(model=\"{us}\", messages=[{{\"role\":\"user\",\"content\":\"hi\"}}]))'\n",
        dir.join("cluster.json").display()
    );
    if exit_after {
        return Ok(());
    }
    println!("Running until Ctrl-C.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts a simulator and reads the address it listens on.
fn start_sim(
    bin: &Path,
    capacity: u32,
    engine: &[&str],
    log: std::fs::File,
) -> Result<(Child, String)> {
    let mut child = Command::new(bin.join("spillway-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ttft-ms",
            "300",
            "--inter-token-ms",
            "5",
            "--output-tokens",
            "16",
        ])
        .args(["--max-concurrent", &capacity.to_string()])
        .args(engine)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting spillway-sim")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    if addr.is_empty() {
        bail!("spillway-sim did not say where it listens");
    }
    Ok((child, addr))
}

fn write_cluster_json(
    dir: &Path,
    cp: &str,
    agents: &[Agent],
    profiles: &[&str],
    keys: &[(&str, &str)],
) -> Result<PathBuf> {
    let regions: Vec<String> = agents
        .iter()
        .map(|a| {
            format!(
                r#"    {{"region": "{}", "openai_base_url": "http://127.0.0.1:{}/v1", "grpc_address": "127.0.0.1:{}"}}"#,
                a.region, a.http, a.grpc
            )
        })
        .collect();
    let profiles: Vec<String> = profiles.iter().map(|p| format!("\"{p}\"")).collect();
    let keys: Vec<String> = keys
        .iter()
        .map(|(t, k)| format!(r#"    {{"tenant": "{t}", "api_key": "{k}"}}"#))
        .collect();
    let json = format!(
        "{{\n  \"control_plane\": \"{cp}\",\n  \"regions\": [\n{}\n  ],\n  \"profiles\": [{}],\n  \"keys\": [\n{}\n  ]\n}}\n",
        regions.join(",\n"),
        profiles.join(", "),
        keys.join(",\n")
    );
    let path = dir.join("cluster.json");
    std::fs::write(&path, json)?;
    Ok(path)
}

/// An HTTP answer as the demo reads it.
struct Answer {
    status: u16,
    region: Option<String>,
    throttle: Option<String>,
    head: String,
    body: String,
}

fn request(port: u16, head: &str, key: &str, body: &str) -> Result<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = if key.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {key}\r\n")
    };
    write!(
        s,
        "{head} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status in the answer")?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    Ok(Answer {
        status,
        region: header("x-spillway-inference-region"),
        throttle: header("x-spillway-throttle"),
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn post(port: u16, path: &str, key: &str, body: &str) -> Result<Answer> {
    request(port, &format!("POST {path}"), key, body)
}

fn get(port: u16, path: &str) -> Result<Answer> {
    request(port, &format!("GET {path}"), "", "")
}

/// The string value of `"name": "..."` in JSON printed by spillctl (a
/// plain parse that keeps xtask free of a JSON dependency).
fn json_string(json: &str, name: &str) -> Option<String> {
    let at = json.find(&format!("\"{name}\""))?;
    let rest = &json[at + name.len() + 2..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    Some(rest[start..end].to_string())
}

/// How many agents in `spillctl agents list -o json` ACKed what they were
/// last sent (a plain parse that keeps xtask free of a JSON dependency).
fn count_acked(json: &str) -> usize {
    let num = |l: &str| {
        l.rsplit(':')
            .next()
            .map(|v| v.trim().trim_end_matches(',').to_string())
    };
    let sent: Vec<Option<String>> = json
        .lines()
        .filter(|l| l.contains("\"sent_version\""))
        .map(num)
        .collect();
    let acked: Vec<Option<String>> = json
        .lines()
        .filter(|l| l.contains("\"acked_version\""))
        .map(num)
        .collect();
    sent.iter()
        .zip(&acked)
        .filter(|(s, a)| s.is_some() && s == a && s.as_deref() != Some("0"))
        .count()
}
