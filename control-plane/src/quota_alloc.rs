//! The quota lease allocator, pure: splits one limit (requests or tokens per
//! minute) among the agents that share it, in proportion to their recent
//! demand, in the spirit of Doorman's proportional share, so that the sum of
//! the leases that are alive never exceeds the limit.
//!
//! A refresh replaces the leases of the agents it grants to; leases of
//! others that are still alive (agents that left, or, for a new leader, all
//! the leases its predecessor may have granted) are subtracted first. A new
//! leader therefore grants nothing until the longest lease it might not know
//! of has run out ([`Allocator::learning_until`]).
//!
//! The leader runs one allocator per limit of every quota (see `leader`).

use std::collections::BTreeMap;

/// Grants for one refresh: `limit` minus what `live_others` still hold,
/// shared max-min fairly by `demands` (nobody gets more than it asks while
/// another wants more), and what is left over after every demand is met is
/// spread in proportion to demand, so that growing agents find room at once.
pub fn allocate(
    limit: f64,
    demands: &BTreeMap<String, f64>,
    live_others: f64,
) -> BTreeMap<String, f64> {
    let available = (limit - live_others).max(0.0);
    let mut grants: BTreeMap<String, f64> = demands.keys().map(|a| (a.clone(), 0.0)).collect();
    if available <= 0.0 || demands.is_empty() {
        return grants;
    }
    // Water-filling, smallest demand first.
    let mut order: Vec<(&String, f64)> = demands.iter().map(|(a, d)| (a, d.max(0.0))).collect();
    order.sort_by(|x, y| x.1.total_cmp(&y.1));
    let mut left = available;
    let n = order.len();
    for (i, (agent, demand)) in order.iter().enumerate() {
        let fair = left / (n - i) as f64;
        let give = demand.min(fair);
        grants.insert((*agent).clone(), give);
        left -= give;
    }
    // Spare capacity, by demand (evenly when nobody asked for anything).
    if left > 0.0 {
        let total: f64 = order.iter().map(|(_, d)| d).sum();
        for (agent, demand) in &order {
            let extra = if total > 0.0 {
                left * demand / total
            } else {
                left / n as f64
            };
            *grants.get_mut(*agent).expect("every agent has a grant") += extra;
        }
    }
    grants
}

/// A lease the allocator handed out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    pub amount: f64,
    /// Seconds on the allocator's clock.
    pub expires_at: f64,
}

/// The leases of one limit, as one leader knows them.
#[derive(Debug, Clone)]
pub struct Allocator {
    pub limit: f64,
    pub lease_seconds: f64,
    /// Per agent: the latest grant, and an earlier, larger one the agent
    /// may still hold (the smaller grant may not have reached it yet).
    leases: BTreeMap<String, Booked>,
    /// Before this time a new leader cannot know what its predecessor
    /// granted, and assumes the whole limit is held.
    learning_until: f64,
}

#[derive(Debug, Clone, Copy)]
struct Booked {
    current: Lease,
    earlier: Option<Lease>,
}

impl Booked {
    /// What the agent may hold at most, at `now`.
    fn outstanding(&self, now: f64) -> f64 {
        let live = |l: &Lease| if l.expires_at > now { l.amount } else { 0.0 };
        live(&self.current).max(self.earlier.as_ref().map_or(0.0, live))
    }
}

impl Allocator {
    /// A leader that starts at `now`, after another may have granted leases
    /// of up to `lease_seconds`.
    pub fn new_leader(limit: f64, lease_seconds: f64, now: f64) -> Allocator {
        Allocator {
            limit,
            lease_seconds,
            leases: BTreeMap::new(),
            learning_until: now + lease_seconds,
        }
    }

    pub fn learning_until(&self) -> f64 {
        self.learning_until
    }

    /// Grants the agents in `demands` new leases, replacing theirs. Each
    /// demand is (what the agent wants, what it holds now under a live
    /// lease, by its latest report).
    ///
    /// A grant that shrinks reaches its agent later than the grants that
    /// grow elsewhere with what it frees: until the agent reports holding
    /// no more than its new grant (or its earlier lease runs out), the
    /// earlier amount stays booked, and growth elsewhere waits for it. So
    /// what agents hold never adds up to more than the limit, whatever the
    /// delivery order.
    ///
    /// While learning, an agent gets at most what it holds: those amounts
    /// were granted within the limit by the previous leader, so renewing
    /// them keeps the sum, and nobody starves meanwhile.
    pub fn refresh(
        &mut self,
        demands: &BTreeMap<String, (f64, f64)>,
        now: f64,
    ) -> BTreeMap<String, Lease> {
        // Forget what has run out, and earlier leases that agents have
        // confirmed giving up.
        self.leases
            .retain(|_, b| b.outstanding(now) > 0.0 || b.current.expires_at > now);
        for (agent, (_, has)) in demands {
            if let Some(b) = self.leases.get_mut(agent)
                && (*has <= b.current.amount + 1e-9
                    || b.earlier.is_some_and(|e| e.expires_at <= now))
            {
                b.earlier = None;
            }
        }
        let others: f64 = self
            .leases
            .iter()
            .filter(|(a, _)| !demands.contains_key(*a))
            .map(|(_, b)| b.outstanding(now))
            .sum();
        let available = (self.limit - others).max(0.0);
        let mut grants: BTreeMap<String, f64> = if now < self.learning_until {
            let mut renew: BTreeMap<String, f64> = demands
                .iter()
                .map(|(a, (_, has))| {
                    let known = self.leases.get(a).map_or(0.0, |b| b.current.amount);
                    (a.clone(), has.max(known).max(0.0))
                })
                .collect();
            // Reports cross lease changes in flight: never renew more than
            // the limit in all.
            let sum: f64 = renew.values().sum();
            if sum > available {
                for v in renew.values_mut() {
                    *v *= available / sum;
                }
            }
            renew
        } else {
            let wants = demands
                .iter()
                .map(|(a, (want, _))| (a.clone(), *want))
                .collect();
            allocate(self.limit, &wants, others)
        };
        // Growth waits for the shrinks still on their way.
        let pending: BTreeMap<&String, f64> = demands
            .keys()
            .map(|a| (a, self.leases.get(a).map_or(0.0, |b| b.outstanding(now))))
            .collect();
        let booked: f64 = grants.iter().map(|(a, g)| g.max(pending[a])).sum();
        if booked > available + 1e-9 {
            let growth: f64 = grants.iter().map(|(a, g)| (g - pending[a]).max(0.0)).sum();
            let cut = ((booked - available) / growth).min(1.0);
            for (a, g) in grants.iter_mut() {
                let grow = (*g - pending[a]).max(0.0);
                *g -= grow * cut;
            }
        }
        let mut out = BTreeMap::new();
        for (agent, amount) in grants {
            let lease = Lease {
                amount,
                expires_at: now + self.lease_seconds,
            };
            let earlier = self.leases.get(&agent).and_then(|b| {
                // The largest live lease above the new grant stays booked.
                [Some(b.current), b.earlier]
                    .into_iter()
                    .flatten()
                    .filter(|l| l.expires_at > now && l.amount > amount)
                    .max_by(|x, y| x.amount.total_cmp(&y.amount))
            });
            self.leases.insert(
                agent.clone(),
                Booked {
                    current: lease,
                    earlier,
                },
            );
            out.insert(agent, lease);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn demands(d: &[(&str, f64)]) -> BTreeMap<String, f64> {
        d.iter().map(|(a, x)| (a.to_string(), *x)).collect()
    }

    #[test]
    fn shares_by_demand_and_spreads_the_rest() {
        let g = allocate(
            600.0,
            &demands(&[("a", 100.0), ("b", 1000.0), ("c", 1000.0)]),
            0.0,
        );
        assert_eq!(g["a"], 100.0, "a small demand is met in full");
        assert_eq!((g["b"], g["c"]), (250.0, 250.0));
        let g = allocate(600.0, &demands(&[("a", 100.0), ("b", 200.0)]), 0.0);
        // 300 spare, spread by demand.
        assert_eq!((g["a"], g["b"]), (200.0, 400.0));
        let g = allocate(600.0, &demands(&[("a", 100.0)]), 550.0);
        assert_eq!(g["a"], 50.0, "only what others do not still hold");
    }

    #[test]
    fn a_new_leader_learns_before_it_grants() {
        let mut alloc = Allocator::new_leader(600.0, 10.0, 0.0);
        let d = BTreeMap::from([
            ("a".to_string(), (300.0, 0.0)),
            ("b".to_string(), (300.0, 250.0)),
        ]);
        let g = alloc.refresh(&d, 5.0);
        assert_eq!(g["a"].amount, 0.0, "nothing new while learning");
        assert_eq!(g["b"].amount, 250.0, "what b holds is renewed");
        let g = alloc.refresh(&d, 10.0);
        assert_eq!((g["a"].amount, g["b"].amount), (300.0, 300.0));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Demand(usize, f64),
        Leave(usize),
        Refresh,
        /// The grants in flight to one agent arrive.
        Deliver(usize),
        Advance(f64),
        NewLeader,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..5, 0.0f64..1000.0).prop_map(|(a, d)| Step::Demand(a, d)),
            (0usize..5).prop_map(Step::Leave),
            Just(Step::Refresh),
            Just(Step::Refresh),
            (0usize..5).prop_map(Step::Deliver),
            (0usize..5).prop_map(Step::Deliver),
            (0.0f64..6.0).prop_map(Step::Advance),
            Just(Step::NewLeader),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn what_agents_hold_never_exceeds_the_limit(steps in proptest::collection::vec(step(), 1..120)) {
            let (limit, lease) = (600.0, 10.0);
            let mut now = 0.0;
            let mut alloc = Allocator::new_leader(limit, lease, now);
            // What agents really hold, whoever granted it, and the grants
            // on their way to them (delivered in order, late or never).
            let mut held: BTreeMap<String, Lease> = BTreeMap::new();
            let mut in_flight: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
            let mut want: BTreeMap<String, f64> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Demand(a, d) => { want.insert(format!("agent-{a}"), d); }
                    Step::Leave(a) => { want.remove(&format!("agent-{a}")); }
                    Step::Advance(dt) => now += dt,
                    Step::NewLeader => alloc = Allocator::new_leader(limit, lease, now),
                    Step::Deliver(a) => {
                        let agent = format!("agent-{a}");
                        for l in in_flight.remove(&agent).unwrap_or_default() {
                            held.insert(agent.clone(), l);
                        }
                    }
                    Step::Refresh => {
                        // Agents report what they want and what they hold.
                        let demands = want
                            .iter()
                            .map(|(a, w)| {
                                let has = held
                                    .get(a)
                                    .filter(|l| l.expires_at > now)
                                    .map_or(0.0, |l| l.amount);
                                (a.clone(), (*w, has))
                            })
                            .collect();
                        for (agent, l) in alloc.refresh(&demands, now) {
                            in_flight.entry(agent).or_default().push(l);
                        }
                    }
                }
                let live: f64 = held.values().filter(|l| l.expires_at > now).map(|l| l.amount).sum();
                prop_assert!(live <= limit + 1e-6, "{} held of {} at {}", live, limit, now);
            }
        }

        #[test]
        fn an_agent_with_demand_gets_a_share_in_one_refresh(d in proptest::collection::btree_map("[a-e]", 0.001f64..1000.0, 1..5), others in 0.0f64..599.0) {
            let g = allocate(600.0, &d, others);
            for (agent, grant) in &g {
                prop_assert!(*grant > 0.0, "{} got nothing: {:?}", agent, g);
            }
            let sum: f64 = g.values().sum();
            prop_assert!(sum <= 600.0 - others + 1e-6);
        }
    }
}
