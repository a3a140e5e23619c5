//! Project automation, run as `cargo xtask <command>`:
//!
//! - `demo`: build, start a local multi-region cluster and show it working;
//! - `test`: install what the tests need that cargo cannot (etcd), then run
//!   the whole suite;
//! - `lint`: rustfmt and clippy, as CI would want them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Spillway's project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and start a local multi-region cluster (etcd when installed,
    /// else the embedded store) and show its configuration reaching agents.
    Demo {
        /// Stop after the scripted part instead of running until Ctrl-C.
        #[arg(long)]
        exit_after_traffic: bool,
    },
    /// Install etcd if missing (Debian/Ubuntu, as root), then run every test.
    Test {
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Check formatting and clippy lints.
    Lint,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Test { args } => test(&args),
        Cmd::Demo { exit_after_traffic } => demo(exit_after_traffic),
        Cmd::Lint => lint(),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = c
        .status()
        .with_context(|| format!("could not start: {what}"))?;
    if !status.success() {
        bail!("failed ({status}): {what}");
    }
    Ok(())
}

fn find(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// etcd and etcdctl, installed from Debian's packages when missing.
fn ensure_etcd() -> Result<()> {
    if find("etcd").is_some() && find("etcdctl").is_some() {
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "etcd is not installed; install etcd (server and etcdctl) 3.4 or newer and run again"
        );
    }
    if !is_root() {
        bail!(
            "etcd is not installed; run `sudo apt-get install etcd-server etcd-client` and run again"
        );
    }
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    run(update, "apt-get update (to install etcd)")?;
    let mut install = Command::new("apt-get");
    install
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "etcd-server",
            "etcd-client",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install, "apt-get install etcd-server etcd-client")?;
    if find("etcd").is_none() || find("etcdctl").is_none() {
        bail!("installed etcd-server and etcd-client, but etcd or etcdctl is still not on PATH");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    ensure_etcd()?;
    let started = Instant::now();
    // The end-to-end tests start the real binaries, so build them first.
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    run(build, "cargo build --workspace --bins")?;
    let nextest = cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut t = cargo();
    if nextest {
        t.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        t.args(["test", "--workspace", "--no-fail-fast"]);
    }
    t.args(extra);
    run(
        t,
        if nextest {
            "cargo nextest run --workspace"
        } else {
            "cargo test --workspace"
        },
    )?;
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

fn lint() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy")
}

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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

const REGIONS: &[(&str, &str)] = &[("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")];
const MODEL: &str = "llama-3.1-8b";

fn demo(exit_after: bool) -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--bins",
        "-p",
        "spillway-control-plane",
        "-p",
        "spillway-agent",
    ]);
    run(build, "building the control plane and the agent")?;
    let bin = root().join("target/debug");
    let dir = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
    };
    let mut procs = Procs(Vec::new());

    // etcd when installed, else the embedded store.
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
            std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
        })?;
        println!("store:          etcd at {url} (data in target/demo/etcd)");
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
        std::net::TcpStream::connect(("127.0.0.1", cp_port)).is_ok()
    })?;
    println!("control plane:  {cp_url} (log: target/demo/control-plane.log)");

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
    spillctl(&[
        "profiles",
        "create",
        &format!("us.{MODEL}"),
        "--destinations",
        "us-east,us-west",
    ])?;
    spillctl(&[
        "profiles",
        "create",
        &format!("eu.{MODEL}"),
        "--destinations",
        "eu-west",
    ])?;
    spillctl(&[
        "profiles",
        "create",
        &format!("global.{MODEL}"),
        "--destinations",
        "us-east,us-west,eu-west",
    ])?;
    spillctl(&[
        "profiles",
        "create",
        "team-search",
        "--base-profile",
        &format!("us.{MODEL}"),
        "--tag",
        "cost-center=search",
    ])?;
    spillctl(&[
        "routes",
        "set",
        &format!("us.{MODEL}"),
        "--source",
        "us-east",
        "--dest",
        "us-east=3",
        "--dest",
        "us-west=1",
    ])?;

    for (region, _) in REGIONS {
        let port = free_port()?;
        let child = Command::new(bin.join("spillway-agent"))
            .args([
                "--agent-id",
                &format!("{region}-1"),
                "--region",
                region,
                "--control-plane",
                &cp_url,
            ])
            .args([
                "--grpc-listen",
                &format!("127.0.0.1:{port}"),
                "--serve-model",
                MODEL,
                "--insecure-dev",
            ])
            .arg("--state-dir")
            .arg(dir.join(format!("agent-{region}")))
            .stdout(Stdio::null())
            .stderr(log(&format!("agent-{region}"))?)
            .spawn()
            .context("starting an agent")?;
        procs.0.push(child);
    }
    wait_for(
        "every agent to ACK its config",
        Duration::from_secs(30),
        || {
            spillctl(&["agents", "list", "-o", "json"])
                .is_ok_and(|out| count_acked(&out) == REGIONS.len())
        },
    )?;
    println!("\nprofiles:\n{}", spillctl(&["profiles", "list"])?);
    println!(
        "agents (each has ACKed the config version shown):\n{}",
        spillctl(&["agents", "list"])?
    );

    // A live change: the route table moves, and every agent ACKs the new version.
    spillctl(&[
        "routes",
        "set",
        &format!("us.{MODEL}"),
        "--source",
        "us-east",
        "--dest",
        "us-east=1",
        "--dest",
        "us-west=1",
    ])?;
    let started = Instant::now();
    let before = spillctl(&["agents", "list", "-o", "json"])?;
    wait_for(
        "the route change to be ACKed",
        Duration::from_secs(10),
        || {
            spillctl(&["agents", "list", "-o", "json"])
                .is_ok_and(|out| out != before && count_acked(&out) == REGIONS.len())
        },
    )?;
    println!(
        "route change for us-east ACKed by the agents it concerns within {:.0?}:\n{}",
        started.elapsed(),
        spillctl(&["agents", "list"])?
    );
    println!(
        "Inference traffic (OpenAI-compatible HTTP and gRPC) is not served yet: the data plane is the next piece of work.\n"
    );
    if exit_after {
        return Ok(());
    }
    println!(
        "Try: target/debug/spillctl --control-plane {cp_url} routes list\nRunning until Ctrl-C."
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// How many agents in `spillctl agents list -o json` ACKed what they were
/// last sent (a crude parse that keeps xtask free of a JSON dependency).
fn count_acked(json: &str) -> usize {
    let sent: Vec<&str> = json
        .lines()
        .filter(|l| l.contains("\"sent_version\""))
        .collect();
    let acked: Vec<&str> = json
        .lines()
        .filter(|l| l.contains("\"acked_version\""))
        .collect();
    sent.iter()
        .zip(&acked)
        .filter(|(s, a)| {
            let num = |l: &str| {
                l.rsplit(':')
                    .next()
                    .map(|v| v.trim().trim_end_matches(',').to_string())
            };
            let (s, a) = (num(s), num(a));
            s.is_some() && s == a && s.as_deref() != Some("0")
        })
        .count()
}
