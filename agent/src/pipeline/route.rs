//! Which regions a call tries, in which order: pure, so that it is tested
//! without sockets.

use spillway_core::model::RouteTable;

/// The order in which a call tries the destinations of its route table:
/// priority levels ascending (the source region is alone at the first level
/// in the default table); within a level, a random order weighted by the
/// weights (drawn without replacement), so that traffic splits by weight and
/// each call still has the whole level to fail over to. Zero-weight
/// destinations are never tried. `random` yields numbers in [0, 1).
pub fn plan(table: &RouteTable, mut random: impl FnMut() -> f64) -> Vec<&str> {
    let mut levels: Vec<u32> = table.destinations.iter().map(|d| d.priority).collect();
    levels.sort_unstable();
    levels.dedup();
    let mut order = Vec::with_capacity(table.destinations.len());
    for level in levels {
        let mut pool: Vec<(&str, f64)> = table
            .destinations
            .iter()
            .filter(|d| d.priority == level && d.weight > 0.0)
            .map(|d| (d.region.as_str(), d.weight))
            .collect();
        while !pool.is_empty() {
            let total: f64 = pool.iter().map(|(_, w)| w).sum();
            let mut point = random() * total;
            let mut chosen = pool.len() - 1;
            for (i, (_, w)) in pool.iter().enumerate() {
                if point < *w {
                    chosen = i;
                    break;
                }
                point -= w;
            }
            order.push(pool.remove(chosen).0);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::model::RouteDestination;

    fn table(d: &[(&str, f64, u32)]) -> RouteTable {
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

    #[test]
    fn lower_priorities_come_first_and_zero_weights_never() {
        let t = table(&[("b", 1.0, 1), ("a", 1.0, 0), ("c", 0.0, 1), ("d", 5.0, 2)]);
        for _ in 0..50 {
            assert_eq!(plan(&t, fastrand::f64), ["a", "b", "d"]);
        }
    }

    #[test]
    fn a_level_splits_by_weight_and_keeps_every_member() {
        let t = table(&[("a", 3.0, 0), ("b", 1.0, 0)]);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 20_000;
        let mut first_a = 0;
        for _ in 0..n {
            let p = plan(&t, || rng.f64());
            assert_eq!(p.len(), 2);
            first_a += usize::from(p[0] == "a");
        }
        let share = first_a as f64 / n as f64;
        assert!(
            (share - 0.75).abs() < 0.02,
            "a went first {share:.3} of the time, expected 0.75"
        );
    }

    #[test]
    fn default_table_keeps_the_source_first() {
        let t = RouteTable::default_for(
            "p",
            "us-east",
            &["us-west".into(), "us-east".into(), "eu-west".into()],
        );
        for _ in 0..50 {
            assert_eq!(plan(&t, fastrand::f64)[0], "us-east");
        }
    }
}
