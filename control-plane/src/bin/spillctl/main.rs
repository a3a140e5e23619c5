//! spillctl: the command line for Spillway's admin API.
//!
//! One module per noun (`regions`, `profiles`, `routes`, `quotas`,
//! `tenants`, `keys`, `agents`) holds its subcommands, its fields and how
//! it shows; what they share is in `client` (connecting, calls, pages,
//! `--revision`) and `output` (tables and JSON).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agents;
mod client;
mod keys;
mod output;
mod profiles;
mod quotas;
mod regions;
mod routes;
mod tenants;

use client::Connection;
use output::Output;

/// Manage a Spillway control plane: regions, inference profiles, route
/// tables, and the agents connected to it.
///
/// Every change is validated by the control plane; a refused change prints
/// one line naming the field that is wrong and exits non-zero. Updates are
/// safe against concurrent edits: spillctl sends the revision it read, and
/// the control plane refuses the write if someone changed the object since.
#[derive(Parser, Debug)]
#[command(name = "spillctl", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  spillctl regions create us-east --geography us
  spillctl profiles create us.llama-3.1-8b --destinations us-east,us-west
  spillctl profiles create team-search --base-profile us.llama-3.1-8b --tag cost-center=search
  spillctl routes set us.llama-3.1-8b --source us-east --dest us-east=3 --dest us-west=1
  spillctl routes set us.llama-3.1-8b --source us-east --dest us-east=1 --dest us-west=1:1 --ttft-objective-ms 1500
  spillctl routes explain us.llama-3.1-8b --source us-east
  spillctl quotas create --profile us.llama-3.1-8b --source us-east --rpm 600 --tpm 200000
  spillctl tenants create acme --profiles 'us.*' --deny-regions us-west
  spillctl keys create --tenant acme
  spillctl quotas create --tenant acme --rpm 60
  spillctl agents list -o json";

#[derive(Subcommand, Debug)]
enum Command {
    /// Regions: named places with their own agents and model servers.
    #[command(subcommand)]
    Regions(regions::Cmd),
    /// Inference profiles: what clients name as their model.
    #[command(subcommand)]
    Profiles(profiles::Cmd),
    /// Route tables: per profile and source region, the destination regions
    /// with their weights and priorities.
    #[command(subcommand)]
    Routes(routes::Cmd),
    /// Quotas: requests and tokens per minute (and tokens per day) for a
    /// profile in a source region, a tenant on a profile, or a tenant.
    #[command(subcommand)]
    Quotas(quotas::Cmd),
    /// Tenants: who calls with API keys, which profiles they may call, and
    /// where their requests may be served.
    #[command(subcommand)]
    Tenants(tenants::Cmd),
    /// API keys of tenants: created (shown once), listed, revoked.
    #[command(subcommand)]
    Keys(keys::Cmd),
    /// Agents connected to the control plane.
    #[command(subcommand)]
    Agents(agents::Cmd),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let mut c = cli.connection.connect().await?;
    let out = cli.output;
    match cli.command {
        Command::Regions(cmd) => regions::run(&mut c, cmd, out).await,
        Command::Profiles(cmd) => profiles::run(&mut c, cmd, out).await,
        Command::Routes(cmd) => routes::run(&mut c, cmd, out).await,
        Command::Quotas(cmd) => quotas::run(&mut c, cmd, out).await,
        Command::Tenants(cmd) => tenants::run(&mut c, cmd, out).await,
        Command::Keys(cmd) => keys::run(&mut c, cmd, out).await,
        Command::Agents(cmd) => agents::run(&mut c, cmd, out).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
