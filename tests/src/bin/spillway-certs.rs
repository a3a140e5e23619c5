//! spillway-certs: writes a development CA and certificates for a local
//! deployment (`cargo xtask certs` runs it). Not for production: use your
//! own CA, with the same SPIFFE-style names in the certificates.

use std::path::PathBuf;

use clap::Parser;
use spillway_core::tls::{admin_uri, agent_uri, control_plane_uri};
use spillway_tests::certs::DevCa;

/// Write a development CA and certificates for agents, control planes and
/// operators.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where the PEM files go.
    #[arg(long, default_value = "target/certs")]
    out: PathBuf,
    /// Agents, as `<region>/<agent-id>`; repeatable.
    #[arg(long = "agent", default_values = ["us-east/us-east-1", "us-west/us-west-1", "eu-west/eu-west-1"])]
    agents: Vec<String>,
    /// Control-plane replicas; repeatable.
    #[arg(long = "control-plane", default_values = ["cp-1"])]
    control_planes: Vec<String>,
    /// Operators of the admin API (spillctl); repeatable.
    #[arg(long = "admin", default_values = ["ops"])]
    admins: Vec<String>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("spillway-certs: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let ca = DevCa::new(&args.out, "Spillway development CA").map_err(|e| e.to_string())?;
    println!("CA             {}", ca.ca_path().display());
    let issue = |stem: String, uri: String| -> Result<(), String> {
        let files = ca.issue(&stem, &uri).map_err(|e| e.to_string())?;
        println!("{uri:<52} {} {}", files.cert.display(), files.key.display());
        Ok(())
    };
    for a in &args.agents {
        let (region, id) = a
            .split_once('/')
            .ok_or_else(|| format!("--agent `{a}`: expected <region>/<agent-id>"))?;
        issue(format!("agent-{region}-{id}"), agent_uri(region, id))?;
    }
    for cp in &args.control_planes {
        issue(format!("control-plane-{cp}"), control_plane_uri(cp))?;
    }
    for admin in &args.admins {
        issue(format!("admin-{admin}"), admin_uri(admin))?;
    }
    Ok(())
}
