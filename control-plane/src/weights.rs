//! The weight engine: from the operator's route table (base weights and
//! priorities) and each region's load, the effective weights one source
//! region's agents use. Pure: inputs in, weights out, no clock, no I/O.
//!
//! A region's load (`leader::regions_for`) counts each model server once,
//! however many of the region's agents share it. Where a server's engine
//! reports its own figures, they decide: in flight is the requests running
//! and waiting in the engine (every caller's), capacity the calls it takes
//! without queuing as the agents estimate them from its KV cache. Where it
//! does not, in flight is the sum of the agents' calls and capacity the sum
//! of the concurrency limits they learned from time to first token, up to
//! the operator's `capacity=` bound. A server whose engine figures went
//! stale adds nothing (no spare capacity).
//!
//! How it decides, for one route table:
//!
//! - A region is **drained** (weight 0) when its agents went silent, its
//!   error rate crossed the drain threshold, or it has no capacity (as when
//!   every one of its servers has stale engine figures).
//! - Destinations are taken by priority level, lowest first (the default
//!   table puts the source region alone at the first level). A level gets
//!   all the traffic while its utilization (in-flight over capacity) is at or
//!   under the target; within the level, traffic splits by the operator's
//!   base weights (**headroom**).
//! - Above the target, the excess share (1 - target / utilization) **spills**
//!   to the next levels, in proportion to each region's spare capacity
//!   (target x capacity - in flight).
//! - When too little healthy capacity is left anywhere (healthy capacity x
//!   the overprovisioning factor under the panic threshold), the engine
//!   stops trusting health and spreads over every destination by base
//!   weight (**panic**), rather than pile everything on the last survivor.
//! - With no load figures at all, the operator's weights stand
//!   (**override**).
//!
//! [`smooth`] then moves from the previous weights toward these by a bounded
//! step, ignores changes under the hysteresis band, and drains at once but
//! brings a region back only step by step, so that weights do not oscillate.

use std::collections::BTreeMap;

use serde::Serialize;
use spillway_core::model::RouteTable;

/// One region's load for a model, summed over its model servers, each
/// counted once (see the module's introduction).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionLoad {
    /// Concurrent calls its model servers take without queuing.
    pub capacity: f64,
    /// Calls on them now (queued in an engine included).
    pub in_flight: f64,
    /// Share of recent calls that failed, in [0, 1].
    pub error_rate: f64,
    /// Whether its agents reported recently.
    pub fresh: bool,
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Utilization a level may reach before it spills.
    pub target_utilization: f64,
    /// Error rate at which a region is drained.
    pub drain_error_rate: f64,
    pub overprovisioning: f64,
    /// Healthy capacity share (times overprovisioning) under which the
    /// engine panics.
    pub panic_threshold: f64,
    /// Largest change of any weight per update.
    pub max_step: f64,
    /// Changes smaller than this are not made (nor pushed).
    pub hysteresis: f64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            target_utilization: 0.8,
            drain_error_rate: 0.5,
            overprovisioning: 1.4,
            panic_threshold: 0.5,
            max_step: 0.25,
            hysteresis: 0.02,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Headroom,
    Spill,
    Drained,
    Panic,
    Override,
}

impl Reason {
    /// As serialized, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Headroom => "headroom",
            Reason::Spill => "spill",
            Reason::Drained => "drained",
            Reason::Panic => "panic",
            Reason::Override => "override",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Weight {
    pub region: String,
    pub weight: f64,
    pub reason: Reason,
}

/// A region with no report at all (its agents predate load reports, say) is
/// not drained: nothing is known against it. One that reported is healthy
/// while its reports are fresh, it has capacity, and its errors are under
/// the threshold.
fn healthy(load: Option<&RegionLoad>, s: &EngineSettings) -> bool {
    load.is_none_or(|l| l.fresh && l.capacity > 0.0 && l.error_rate < s.drain_error_rate)
}

/// Shares proportional to `parts`, or an even split when they are all zero.
fn normalize(parts: &mut [f64]) {
    let total: f64 = parts.iter().sum();
    if total > 0.0 && total.is_finite() {
        for p in parts.iter_mut() {
            *p /= total;
        }
    } else if !parts.is_empty() {
        let even = 1.0 / parts.len() as f64;
        parts.iter_mut().for_each(|p| *p = even);
    }
}

/// The weights the engine aims at for `table` given the regions' `loads`,
/// measured while `previous` weights were in force (empty when none were).
/// Destinations with a zero base weight are kept out (at weight 0).
///
/// Utilization is measured under the current weights, so a level's new
/// share is its current share scaled by target / utilization: it settles at
/// the share that puts the level at its target, instead of swinging between
/// "all" (overloaded) and "less" (under target again).
pub fn target(
    table: &RouteTable,
    loads: &BTreeMap<String, RegionLoad>,
    previous: &[Weight],
    s: &EngineSettings,
) -> Vec<Weight> {
    let dests: Vec<_> = table
        .destinations
        .iter()
        .filter(|d| d.weight > 0.0)
        .collect();
    let zero = |region: &str, reason| Weight {
        region: region.to_string(),
        weight: 0.0,
        reason,
    };
    let mut out: Vec<Weight> = table
        .destinations
        .iter()
        .filter(|d| d.weight <= 0.0)
        .map(|d| zero(&d.region, Reason::Override))
        .collect();
    if dests.is_empty() {
        return out;
    }
    let by_base = |reason| -> Vec<Weight> {
        let mut w: Vec<f64> = dests.iter().map(|d| d.weight).collect();
        normalize(&mut w);
        dests
            .iter()
            .zip(w)
            .map(|(d, weight)| Weight {
                region: d.region.clone(),
                weight,
                reason,
            })
            .collect()
    };
    if dests.iter().all(|d| !loads.contains_key(&d.region)) {
        // No figures at all: the operator's table as it stands, the first
        // priority level by base weight and the rest behind it.
        let first = dests.iter().map(|d| d.priority).min().unwrap_or(0);
        let mut parts: Vec<f64> = dests
            .iter()
            .map(|d| if d.priority == first { d.weight } else { 0.0 })
            .collect();
        normalize(&mut parts);
        out.extend(dests.iter().zip(parts).map(|(d, weight)| Weight {
            region: d.region.clone(),
            weight,
            reason: Reason::Override,
        }));
        return out;
    }
    let capacity = |r: &str| loads.get(r).map_or(0.0, |l| l.capacity.max(0.0));
    let total: f64 = dests.iter().map(|d| capacity(&d.region)).sum();
    let healthy_cap: f64 = dests
        .iter()
        .filter(|d| healthy(loads.get(&d.region), s))
        .map(|d| capacity(&d.region))
        .sum();
    let share = if total > 0.0 {
        healthy_cap / total
    } else {
        0.0
    };
    if share * s.overprovisioning < s.panic_threshold {
        out.extend(by_base(Reason::Panic));
        return out;
    }

    // Healthy destinations by level; drained ones get zero.
    let mut levels: Vec<u32> = dests.iter().map(|d| d.priority).collect();
    levels.sort_unstable();
    levels.dedup();
    let mut weights: BTreeMap<String, (f64, Reason)> = BTreeMap::new();
    for d in &dests {
        if !healthy(loads.get(&d.region), s) {
            weights.insert(d.region.clone(), (0.0, Reason::Drained));
        }
    }
    // `remaining` is the share of traffic still to place, level by level.
    let mut remaining = 1.0;
    for (i, level) in levels.iter().enumerate() {
        let members: Vec<_> = dests
            .iter()
            .filter(|d| d.priority == *level && healthy(loads.get(&d.region), s))
            .collect();
        if members.is_empty() || remaining <= 0.0 {
            for d in members {
                weights.insert(d.region.clone(), (0.0, Reason::Spill));
            }
            continue;
        }
        let cap: f64 = members.iter().map(|d| capacity(&d.region)).sum();
        let in_flight: f64 = members
            .iter()
            .map(|d| loads.get(&d.region).map_or(0.0, |l| l.in_flight.max(0.0)))
            .sum();
        let utilization = if cap > 0.0 { in_flight / cap } else { 0.0 };
        // The share this level had while the load was measured.
        let had: f64 = if previous.is_empty() {
            1.0
        } else {
            previous
                .iter()
                .filter(|w| members.iter().any(|d| d.region == w.region))
                .map(|w| w.weight)
                .sum::<f64>()
                .max(0.1)
        };
        let scaled = if utilization > 0.0 {
            had * s.target_utilization / utilization
        } else {
            1.0
        };
        let last = i + 1 == levels.len()
            || dests
                .iter()
                .filter(|d| d.priority > *level)
                .all(|d| !healthy(loads.get(&d.region), s));
        let reason = if i == 0 {
            Reason::Headroom
        } else {
            Reason::Spill
        };
        if scaled >= 1.0 || last {
            // This level takes everything left, split by base weight.
            let mut w: Vec<f64> = members.iter().map(|d| d.weight).collect();
            normalize(&mut w);
            for (d, w) in members.iter().zip(w) {
                weights.insert(d.region.clone(), (remaining * w, reason));
            }
            remaining = 0.0;
        } else {
            let keep = scaled / remaining.max(f64::EPSILON);
            let keep = keep.min(1.0);
            let mut w: Vec<f64> = members.iter().map(|d| d.weight).collect();
            normalize(&mut w);
            for (d, w) in members.iter().zip(w) {
                weights.insert(d.region.clone(), (remaining * keep * w, reason));
            }
            remaining *= 1.0 - keep;
            // The excess goes to the next levels by spare capacity.
            let next: Vec<_> = dests
                .iter()
                .filter(|d| d.priority > *level && healthy(loads.get(&d.region), s))
                .collect();
            let mut spare: Vec<f64> = next
                .iter()
                .map(|d| {
                    loads.get(&d.region).map_or(0.0, |l| {
                        (s.target_utilization * l.capacity - l.in_flight).max(0.0)
                    })
                })
                .collect();
            normalize(&mut spare);
            for (d, sp) in next.iter().zip(spare) {
                weights.insert(d.region.clone(), (remaining * sp, Reason::Spill));
            }
            break;
        }
    }
    for d in &dests {
        weights
            .entry(d.region.clone())
            .or_insert((0.0, Reason::Spill));
    }
    out.extend(
        weights
            .into_iter()
            .map(|(region, (weight, reason))| Weight {
                region,
                weight,
                reason,
            }),
    );
    out
}

/// The operator's table that effective weights are computed for, as a
/// fingerprint stored with them: a change of regions, base weights or
/// priorities makes the weights of the older table stale (the order of the
/// destinations does not matter).
pub fn basis(table: &RouteTable) -> String {
    let mut parts: Vec<String> = table
        .destinations
        .iter()
        .map(|d| format!("{}={}@{}", d.region, d.weight, d.priority))
        .collect();
    parts.sort();
    parts.join(",")
}

/// Moves from `previous` toward `target`: drained regions drop at once, the
/// rest move together by at most `max_step` (the largest change bounds the
/// interpolation, so the weights keep summing to one; a step that would end
/// within the hysteresis band of the target goes all the way), and a change
/// smaller than the hysteresis band is not made at all, unless it takes a
/// region's last weight away. Returns the new weights and whether they
/// differ from `previous`.
pub fn smooth(previous: &[Weight], target: &[Weight], s: &EngineSettings) -> (Vec<Weight>, bool) {
    let prev_of = |region: &str| {
        previous
            .iter()
            .find(|w| w.region == region)
            .map(|w| w.weight)
    };
    if previous.is_empty() || target.iter().any(|t| prev_of(&t.region).is_none()) {
        return (target.to_vec(), true);
    }
    // Drain at once: take drained regions' weight away from the start point.
    let mut start: Vec<f64> = target
        .iter()
        .map(|t| {
            if t.reason == Reason::Drained {
                0.0
            } else {
                prev_of(&t.region).unwrap_or(0.0)
            }
        })
        .collect();
    let drained_now = target
        .iter()
        .zip(&start)
        .any(|(t, s0)| t.reason == Reason::Drained && prev_of(&t.region).unwrap_or(0.0) > *s0);
    let has_target_mass = target.iter().any(|t| t.weight > 0.0);
    if start.iter().sum::<f64>() <= 0.0 && has_target_mass {
        return (target.to_vec(), true);
    }
    normalize(&mut start);
    let delta = target
        .iter()
        .zip(&start)
        .map(|(t, p)| (t.weight - p).abs())
        .fold(0.0, f64::max);
    // Hysteresis holds small moves, but never one that takes a region's
    // last weight away: such a remainder would otherwise stay for good. (A
    // small first weight is held: a source just over its target would
    // otherwise flip a sliver of spill on and off at every update.)
    let empties = target
        .iter()
        .zip(&start)
        .any(|(t, p)| t.weight <= 0.0 && *p > 0.0);
    if delta < s.hysteresis && !drained_now && !empties {
        // Weights stay; reasons follow the target (a recovered region must
        // not stay "drained", a failing one must become so).
        let kept: Vec<Weight> = target
            .iter()
            .map(|t| Weight {
                weight: prev_of(&t.region).unwrap_or(0.0),
                ..t.clone()
            })
            .collect();
        let changed = kept.iter().zip(previous).any(|(k, p)| k.reason != p.reason)
            || kept.len() != previous.len();
        return (kept, changed);
    }
    // A step that would land within the hysteresis of the target goes all
    // the way.
    let alpha = if delta > s.max_step + s.hysteresis {
        s.max_step / delta
    } else {
        1.0
    };
    let next = target
        .iter()
        .zip(&start)
        .map(|(t, p)| Weight {
            region: t.region.clone(),
            weight: (p + alpha * (t.weight - p)).max(0.0),
            reason: t.reason,
        })
        .collect();
    (next, true)
}

/// Whether `weights` are within the hysteresis band of `goal`, region by
/// region: where [`smooth`] would take them the rest of the way in one
/// step, or leave them be.
pub fn settled(weights: &[Weight], goal: &[Weight], s: &EngineSettings) -> bool {
    weights.len() == goal.len()
        && goal.iter().all(|g| {
            weights
                .iter()
                .any(|w| w.region == g.region && (w.weight - g.weight).abs() < s.hysteresis)
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use spillway_core::model::RouteDestination;

    /// A route table of profile `p` for source `a`; (region, weight,
    /// priority) per destination.
    pub(crate) fn table(d: &[(&str, f64, u32)]) -> RouteTable {
        RouteTable {
            profile: "p".into(),
            source_region: "a".into(),
            destinations: d
                .iter()
                .map(|(r, w, p)| RouteDestination {
                    region: r.to_string(),
                    weight: *w,
                    priority: *p,
                })
                .collect(),
            ttft_objective_ms: None,
            revision: 0,
        }
    }

    fn load(capacity: f64, in_flight: f64) -> RegionLoad {
        RegionLoad {
            capacity,
            in_flight,
            error_rate: 0.0,
            fresh: true,
        }
    }

    fn w<'a>(ws: &'a [Weight], r: &str) -> &'a Weight {
        ws.iter().find(|x| x.region == r).unwrap()
    }

    fn source_first() -> RouteTable {
        table(&[("a", 1.0, 0), ("b", 1.0, 1), ("c", 1.0, 1)])
    }

    #[test]
    fn the_source_keeps_everything_under_the_target() {
        let loads = BTreeMap::from([
            ("a".into(), load(10.0, 5.0)),
            ("b".into(), load(10.0, 0.0)),
            ("c".into(), load(10.0, 0.0)),
        ]);
        let t = target(&source_first(), &loads, &[], &EngineSettings::default());
        assert_eq!(
            (w(&t, "a").weight, w(&t, "a").reason),
            (1.0, Reason::Headroom)
        );
        assert_eq!(w(&t, "b").weight, 0.0);
    }

    #[test]
    fn the_excess_spills_by_spare_capacity() {
        // a at 100% of capacity: 20% of its traffic spills; b has three
        // times c's spare capacity.
        let loads = BTreeMap::from([
            ("a".into(), load(10.0, 10.0)),
            ("b".into(), load(10.0, 2.0)),
            ("c".into(), load(10.0, 6.0)),
        ]);
        let t = target(&source_first(), &loads, &[], &EngineSettings::default());
        assert!((w(&t, "a").weight - 0.8).abs() < 1e-9);
        assert!((w(&t, "b").weight - 0.15).abs() < 1e-9, "{t:?}");
        assert!((w(&t, "c").weight - 0.05).abs() < 1e-9, "{t:?}");
        assert_eq!(w(&t, "b").reason, Reason::Spill);
    }

    #[test]
    fn failing_and_silent_regions_are_drained_and_too_few_panics() {
        let mut loads = BTreeMap::from([
            ("a".into(), load(10.0, 1.0)),
            ("b".into(), load(10.0, 0.0)),
            ("c".into(), load(10.0, 0.0)),
        ]);
        loads.get_mut("a").unwrap().error_rate = 0.9;
        let t = target(&source_first(), &loads, &[], &EngineSettings::default());
        assert_eq!(
            (w(&t, "a").weight, w(&t, "a").reason),
            (0.0, Reason::Drained)
        );
        assert!((w(&t, "b").weight - 0.5).abs() < 1e-9);
        loads.get_mut("b").unwrap().fresh = false;
        loads.get_mut("c").unwrap().fresh = false;
        let t = target(&source_first(), &loads, &[], &EngineSettings::default());
        assert!(t.iter().all(|x| x.reason == Reason::Panic), "{t:?}");
    }

    #[test]
    fn without_load_figures_the_operator_decides() {
        let t = target(
            &table(&[("a", 3.0, 0), ("b", 1.0, 0), ("c", 5.0, 1)]),
            &BTreeMap::new(),
            &[],
            &EngineSettings::default(),
        );
        assert_eq!(
            (w(&t, "a").weight, w(&t, "a").reason),
            (0.75, Reason::Override)
        );
        assert_eq!(w(&t, "c").weight, 0.0, "lower levels wait behind the first");
    }

    #[test]
    fn a_region_that_never_reported_is_not_drained() {
        // b's agents send no reports (an older build): it keeps its place.
        let loads = BTreeMap::from([("a".to_string(), load(10.0, 1.0))]);
        let t = target(
            &table(&[("a", 1.0, 0), ("b", 1.0, 0)]),
            &loads,
            &[],
            &EngineSettings::default(),
        );
        assert!(
            w(&t, "b").weight > 0.0 && w(&t, "b").reason != Reason::Drained,
            "{t:?}"
        );
    }

    #[test]
    fn a_small_remainder_does_not_stay_behind() {
        let s = EngineSettings::default();
        let at = |east: f64, west: f64| {
            vec![
                Weight {
                    region: "east".into(),
                    weight: east,
                    reason: Reason::Headroom,
                },
                Weight {
                    region: "west".into(),
                    weight: west,
                    reason: Reason::Spill,
                },
            ]
        };
        // 0.26 to 0 in steps of 0.25 would leave 0.01, under the
        // hysteresis: the step goes all the way instead.
        let (next, changed) = smooth(&at(0.74, 0.26), &at(1.0, 0.0), &s);
        assert!(changed);
        assert_eq!((next[0].weight, next[1].weight), (1.0, 0.0));
        // A remainder left by an older engine goes on the next update.
        let (next, changed) = smooth(&at(0.99, 0.01), &at(1.0, 0.0), &s);
        assert!(changed);
        assert_eq!(next[1].weight, 0.0);
        // Small moves between regions that both keep weight are held.
        let (next, changed) = smooth(&at(0.5, 0.5), &at(0.51, 0.49), &s);
        assert!(!changed);
        assert_eq!(next[0].weight, 0.5);
        // So is a sliver of spill for a source just over its target, and
        // the goal going back and forth around it moves nothing.
        let mut cur = at(1.0, 0.0);
        for goal in [at(0.985, 0.015), at(1.0, 0.0), at(0.99, 0.01), at(1.0, 0.0)] {
            let (next, changed) = smooth(&cur, &goal, &s);
            assert!(!changed, "{cur:?} -> {next:?} for {goal:?}");
            cur = next;
        }
        assert_eq!((cur[0].weight, cur[1].weight), (1.0, 0.0));
    }

    #[test]
    fn the_basis_names_regions_weights_and_priorities() {
        let a = table(&[("east", 1.0, 0), ("west", 1.0, 1)]);
        assert_eq!(basis(&a), "east=1@0,west=1@1");
        // The order of the destinations does not matter.
        assert_eq!(
            basis(&a),
            basis(&table(&[("west", 1.0, 1), ("east", 1.0, 0)]))
        );
        assert_ne!(
            basis(&a),
            basis(&table(&[("east", 1.0, 1), ("west", 1.0, 0)]))
        );
        assert_ne!(
            basis(&a),
            basis(&table(&[("east", 2.0, 0), ("west", 1.0, 1)]))
        );
        assert_ne!(basis(&a), basis(&table(&[("east", 1.0, 0)])));
    }

    #[test]
    fn a_steady_overload_settles_instead_of_swinging() {
        // Demand is 1.1 x the source's capacity; what the source sees
        // depends on the share it is given (the feedback the leader lives
        // with). The share must settle near 0.8 / 1.1 and stay.
        let s = EngineSettings::default();
        let t = source_first();
        let mut current: Vec<Weight> = Vec::new();
        let mut shares = Vec::new();
        for _ in 0..30 {
            let share = if current.is_empty() {
                1.0
            } else {
                w(&current, "a").weight
            };
            let loads = BTreeMap::from([
                ("a".to_string(), load(10.0, 11.0 * share)),
                ("b".to_string(), load(10.0, 0.0)),
                ("c".to_string(), load(10.0, 0.0)),
            ]);
            let goal = target(&t, &loads, &current, &s);
            let (next, _) = smooth(&current, &goal, &s);
            current = next;
            shares.push(w(&current, "a").weight);
        }
        let settled = &shares[10..];
        let (lo, hi) = settled
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        assert!(hi - lo < s.hysteresis, "still swinging: {shares:?}");
        assert!(
            (settled[0] - 0.8 / 1.1).abs() < 0.05,
            "settled at {}",
            settled[0]
        );
    }

    fn arb_load() -> impl Strategy<Value = RegionLoad> {
        (0.0f64..100.0, 0.0f64..150.0, 0.0f64..1.0, any::<bool>()).prop_map(
            |(capacity, in_flight, error_rate, fresh)| RegionLoad {
                capacity,
                in_flight,
                error_rate,
                fresh,
            },
        )
    }

    fn arb_case() -> impl Strategy<Value = (RouteTable, BTreeMap<String, RegionLoad>)> {
        let regions = ["a", "b", "c", "d"];
        (
            proptest::collection::vec((0.0f64..10.0, 0u32..3), 4),
            proptest::collection::vec(proptest::option::of(arb_load()), 4),
        )
            .prop_map(move |(dests, loads)| {
                let mut d: Vec<(&str, f64, u32)> = regions
                    .iter()
                    .zip(dests)
                    .map(|(r, (w, p))| (*r, w, p))
                    .collect();
                // At least one positive weight, as validation guarantees.
                d[0].1 += 0.5;
                let loads = regions
                    .iter()
                    .zip(loads)
                    .filter_map(|(r, l)| l.map(|l| (r.to_string(), l)))
                    .collect();
                (table(&d), loads)
            })
    }

    proptest! {
        #[test]
        fn weights_are_finite_non_negative_and_sum_to_one((t, loads) in arb_case()) {
            let s = EngineSettings::default();
            let out = target(&t, &loads, &[], &s);
            prop_assert_eq!(out.len(), t.destinations.len());
            let sum: f64 = out.iter().map(|x| x.weight).sum();
            prop_assert!(out.iter().all(|x| x.weight.is_finite() && x.weight >= 0.0), "{:?}", out);
            prop_assert!((sum - 1.0).abs() < 1e-9, "sum {} of {:?}", sum, out);
        }

        #[test]
        fn unhealthy_regions_get_nothing_unless_in_panic((t, loads) in arb_case()) {
            let s = EngineSettings::default();
            let out = target(&t, &loads, &[], &s);
            let panic = out.iter().any(|x| x.reason == Reason::Panic);
            let any_data = t.destinations.iter().any(|d| loads.contains_key(&d.region));
            if !panic && any_data {
                for x in &out {
                    if !healthy(loads.get(&x.region), &s) {
                        prop_assert_eq!(x.weight, 0.0, "{:?}", out);
                    }
                }
            }
        }

        #[test]
        fn a_healthy_source_under_the_target_keeps_full_share(cap in 1.0f64..100.0, u in 0.0f64..0.8, others in proptest::collection::vec(arb_load(), 2)) {
            let s = EngineSettings::default();
            let mut loads = BTreeMap::from([("a".to_string(), load(cap, cap * u))]);
            loads.insert("b".into(), others[0].clone());
            loads.insert("c".into(), others[1].clone());
            let out = target(&source_first(), &loads, &[], &s);
            if !out.iter().any(|x| x.reason == Reason::Panic) {
                prop_assert_eq!(w(&out, "a").weight, 1.0, "{:?}", out);
            }
        }

        #[test]
        fn each_update_moves_by_a_bounded_step((t, before) in arb_case(), (_, after) in arb_case()) {
            let s = EngineSettings::default();
            let prev = target(&t, &before, &[], &s);
            let goal = target(&t, &after, &[], &s);
            let (next, _) = smooth(&prev, &goal, &s);
            let sum: f64 = next.iter().map(|x| x.weight).sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "{:?}", next);
            for (n, p) in next.iter().zip(&prev) {
                if n.reason != Reason::Drained {
                    // Draining others may raise a weight by their share too;
                    // beyond that, the step bound holds.
                    let drained: f64 = prev.iter().zip(&goal).filter(|(_, g)| g.reason == Reason::Drained).map(|(p, _)| p.weight).sum();
                    // (A step that lands within the hysteresis of the goal
                    // goes all the way.)
                    let step = s.max_step + s.hysteresis;
                    prop_assert!(n.weight - p.weight <= step + drained + 1e-9, "{:?} -> {:?}", prev, next);
                    prop_assert!(p.weight - n.weight <= step + 1e-9, "{:?} -> {:?}", prev, next);
                } else {
                    prop_assert_eq!(n.weight, 0.0);
                }
            }
        }

        #[test]
        fn a_steady_load_settles_and_stays((t, loads) in arb_case()) {
            let s = EngineSettings::default();
            let goal = target(&t, &loads, &[], &s);
            let start: Vec<Weight> = goal.iter().map(|g| Weight { weight: 1.0 / goal.len() as f64, ..g.clone() }).collect();
            let mut cur = start;
            let mut changes = 0;
            for _ in 0..50 {
                let (next, changed) = smooth(&cur, &goal, &s);
                changes += usize::from(changed);
                cur = next;
            }
            // It converges within a few steps and then never moves again.
            let (_, changed) = smooth(&cur, &goal, &s);
            prop_assert!(!changed, "still moving after 50 updates: {:?}", cur);
            // Where it settles, a region the goal gives nothing has nothing.
            for (c, g) in cur.iter().zip(&goal) {
                if g.weight <= 0.0 {
                    prop_assert_eq!(c.weight, 0.0, "{:?} settled for {:?}", cur, goal);
                }
            }
            prop_assert!(changes <= 1 + (1.0 / s.max_step).ceil() as usize + 2, "{} changes", changes);
        }
    }
}
