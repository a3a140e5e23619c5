//! The leader's quota leases: every refresh it splits each limit of each
//! quota among the agents that enforce it, by their reported demand (one
//! [`Allocator`] per limit), and writes each agent's grants to
//! `leases/<region>/<agent-id>`, fenced by its leadership, where every
//! replica's sync streams pick them up.
//!
//! A new leader learns first: for one lease length it only renews what
//! agents say they hold, and agents that hold nothing get no lease (they
//! keep their safe share), so that leases a predecessor granted and this
//! leader cannot see are never granted twice.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_core::model::{Quota, QuotaScope};

use crate::keys::{self, AgentRecord, LeaseRecord, QuotaDemand, QuotaGrant};
use crate::quota_alloc::Allocator;
use crate::state::State;
use crate::store::{Op, Store, StoreError};
use spillway_core::metrics::Metrics;

/// Every agent gets at least this fraction of a limit, split among the
/// agents, so that its first call after a quiet spell finds a share.
const DEMAND_FLOOR: f64 = 0.01;

/// Leases live this much longer in the allocator's books than the agents
/// hold them: what a lease spends in flight.
const IN_FLIGHT_SLACK: f64 = 1.0;

/// A grant is rewritten when it would shrink, grow by more than this
/// fraction, or has less than half of its life left.
const GROWTH_TO_REWRITE: f64 = 0.01;

fn limit_of(q: &Quota, i: usize) -> Option<i64> {
    [q.requests_per_minute, q.tokens_per_minute, q.tokens_per_day][i]
}

fn shares(q: &Quota, a: &AgentRecord) -> bool {
    match &q.scope {
        QuotaScope::ProfileInRegion { source_region, .. } => *source_region == a.region,
        QuotaScope::TenantOnProfile { .. } | QuotaScope::Tenant { .. } => true,
    }
}

/// What one leadership term knows of the leases it granted.
pub struct QuotaLeader {
    lease: Duration,
    started: tokio::time::Instant,
    /// By (quota id, limit index).
    allocators: BTreeMap<(String, usize), Allocator>,
}

impl QuotaLeader {
    pub fn new(lease: Duration) -> QuotaLeader {
        QuotaLeader {
            lease,
            started: tokio::time::Instant::now(),
            allocators: BTreeMap::new(),
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Until when this term only renews (seconds on its clock).
    fn learning_until(&self) -> f64 {
        self.lease.as_secs_f64() + IN_FLIGHT_SLACK
    }

    /// The grants of every agent, by (region, agent id).
    pub fn grants(
        &mut self,
        st: &State,
        silence: Duration,
    ) -> BTreeMap<(String, String), Vec<QuotaGrant>> {
        let now = self.now();
        let lease_secs = self.lease.as_secs_f64() + IN_FLIGHT_SLACK;
        let learning_until = self.learning_until();
        let demand = fresh_demand(st, silence);
        let mut out: BTreeMap<(String, String), Vec<QuotaGrant>> = BTreeMap::new();
        for (id, q) in &st.catalog.quotas {
            let sharing: Vec<(String, String)> = st
                .agents
                .values()
                .filter(|a| shares(q, a))
                .map(|a| (a.region.clone(), a.agent_id.clone()))
                .collect();
            if sharing.is_empty() {
                continue;
            }
            let n = sharing.len();
            let mut amounts: BTreeMap<String, [f64; 3]> = BTreeMap::new();
            let mut learning = false;
            for i in 0..3 {
                let Some(limit) = limit_of(q, i) else {
                    continue;
                };
                let limit = limit as f64;
                let alloc = self.allocators.entry((id.clone(), i)).or_insert_with(|| {
                    // A quota first seen after the learning stretch has no
                    // leases anybody else granted: no learning for it.
                    let start = if now >= learning_until {
                        now - lease_secs
                    } else {
                        0.0
                    };
                    Allocator::new_leader(limit, lease_secs, start)
                });
                alloc.limit = limit;
                learning |= now < alloc.learning_until();
                let floor = limit * DEMAND_FLOOR / n as f64;
                let demands: BTreeMap<String, (f64, f64)> = sharing
                    .iter()
                    .map(|(region, agent)| {
                        let d = demand.get(&(region.clone(), agent.clone(), id.clone()));
                        let want = d.map_or(0.0, |d| match i {
                            0 => d.requests_per_minute,
                            1 => d.tokens_per_minute,
                            _ => d.tokens_per_minute * 1440.0,
                        });
                        let has = d.map_or(0.0, |d| d.held[i]);
                        (format!("{region}/{agent}"), (want.max(floor), has))
                    })
                    .collect();
                for (agent, lease) in alloc.refresh(&demands, now) {
                    amounts.entry(agent).or_insert([0.0; 3])[i] = lease.amount;
                }
            }
            for (region, agent) in &sharing {
                let a = amounts
                    .get(&format!("{region}/{agent}"))
                    .copied()
                    .unwrap_or([0.0; 3]);
                if learning && a.iter().all(|x| *x <= 0.0) {
                    continue;
                }
                out.entry((region.clone(), agent.clone()))
                    .or_default()
                    .push(QuotaGrant {
                        quota_id: id.clone(),
                        amounts: a,
                        sharing_agents: n as u32,
                    });
            }
        }
        // Quotas that went lose their allocators.
        self.allocators
            .retain(|(id, _), _| st.catalog.quotas.contains_key(id));
        out
    }
}

/// Demand by (region, agent, quota id), from reports fresher than `silence`.
fn fresh_demand(st: &State, silence: Duration) -> BTreeMap<(String, String, String), &QuotaDemand> {
    let now_ms = unix_ms();
    let mut out = BTreeMap::new();
    for seen in st.health.values() {
        let h = &seen.value;
        let fresh = match seen.at {
            Some(at) => at.elapsed() <= silence,
            None => now_ms.saturating_sub(h.received_at_ms) <= silence.as_millis() as u64,
        };
        if fresh {
            for d in &h.quotas {
                out.insert(
                    (h.region.clone(), h.agent_id.clone(), d.quota_id.clone()),
                    d,
                );
            }
        }
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `new` must replace the grants an agent holds under `old`.
fn must_rewrite(old: &LeaseRecord, new: &[QuotaGrant], now_ms: u64) -> bool {
    if now_ms.saturating_sub(old.granted_at_ms) > old.lease_ms / 2 || old.grants.len() != new.len()
    {
        return true;
    }
    old.grants.iter().zip(new).any(|(o, n)| {
        o.quota_id != n.quota_id
            || o.sharing_agents != n.sharing_agents
            || o.amounts.iter().zip(&n.amounts).any(|(o, n)| {
                // Shrinking must reach the agent; a small growth may wait.
                *n < *o || *n > *o * (1.0 + GROWTH_TO_REWRITE) + 1e-9
            })
    })
}

/// Computes and writes the agents' leases that changed, fenced.
pub async fn update(
    replica: &str,
    store: &Store,
    st: &State,
    fence: i64,
    leader: &mut QuotaLeader,
    silence: Duration,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let grants = leader.grants(st, silence);
    let now_ms = unix_ms();
    let mut writes = Vec::new();
    for ((region, agent), g) in &grants {
        let key = (region.clone(), agent.clone());
        if st
            .leases
            .get(&key)
            .is_some_and(|old| old.leader == replica && !must_rewrite(old, g, now_ms))
        {
            continue;
        }
        let record = LeaseRecord {
            agent_id: agent.clone(),
            region: region.clone(),
            leader: replica.to_string(),
            granted_at_ms: now_ms,
            lease_ms: leader.lease.as_millis() as u64,
            grants: g.clone(),
        };
        writes.push(Op::Put {
            key: keys::leases(region, agent),
            value: keys::encode(&record),
            lease: None,
        });
    }
    // Leases of agents that left, or that no quota covers any more (while
    // learning, a record without a renewal is left to expire instead: its
    // agent may still hold it).
    let learning = leader.now() < leader.learning_until();
    for (region, agent) in st.leases.keys() {
        let key = (region.clone(), agent.clone());
        let connected = st
            .agents
            .values()
            .any(|a| a.region == *region && a.agent_id == *agent);
        if !connected || (!grants.contains_key(&key) && !learning) {
            writes.push(Op::Delete {
                key: keys::leases(region, agent),
            });
        }
    }
    let written = crate::leader::write_fenced(store, fence, &writes, "quota leases").await?;
    metrics.add("spillway_cp_lease_writes_total", &[], written as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(amounts: [f64; 3]) -> QuotaGrant {
        QuotaGrant {
            quota_id: "q".into(),
            amounts,
            sharing_agents: 3,
        }
    }

    #[test]
    fn shrinking_grants_are_always_rewritten_small_growth_waits() {
        let old = LeaseRecord {
            agent_id: "a".into(),
            region: "r".into(),
            leader: "cp".into(),
            granted_at_ms: 10_000,
            lease_ms: 10_000,
            grants: vec![grant([100.0, 0.0, 0.0])],
        };
        assert!(!must_rewrite(&old, &[grant([100.5, 0.0, 0.0])], 11_000));
        assert!(must_rewrite(&old, &[grant([99.99, 0.0, 0.0])], 11_000));
        assert!(must_rewrite(&old, &[grant([102.0, 0.0, 0.0])], 11_000));
        assert!(
            must_rewrite(&old, &[grant([100.0, 0.0, 0.0])], 15_001),
            "renewed at half life"
        );
    }
}
