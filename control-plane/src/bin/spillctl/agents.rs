//! `spillctl agents`: the agents connected to the control plane.

use clap::Subcommand;
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, call};
use crate::output::{Output, Shown, list};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List connected agents with the config version each last ACKed and
    /// the last update each refused.
    List {
        #[arg(long)]
        region: Option<String>,
    },
}

impl Shown for pb::AgentStatus {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("REGION", "region"),
        ("AGENT", "agent_id"),
        ("RELAY", "relay_address"),
        ("CONTROL PLANE", "control_plane"),
        ("SENT", "sent_version"),
        ("ACKED", "acked_version"),
        ("NACKED", "nacked_version"),
        ("NACK REASON", "nack_reason"),
    ];

    fn json(&self) -> Value {
        json!({
            "agent_id": self.agent_id, "region": self.region, "relay_address": self.relay_address,
            "control_plane": self.control_plane, "connected_at_unix": self.connected_at_unix,
            "sent_version": self.sent_version, "acked_version": self.acked_version,
            "nacked_version": self.nacked_version, "nack_reason": self.nack_reason,
        })
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    match cmd {
        Cmd::List { region } => {
            let req = pb::ListAgentsRequest {
                region: region.unwrap_or_default(),
            };
            Ok(list(out, &call(c.list_agents(req)).await?.agents))
        }
    }
}
