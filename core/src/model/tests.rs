//! Unit tests of the domain rules.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

pub(crate) fn region(name: &str, geo: &str) -> Region {
    Region {
        name: name.into(),
        geography: geo.into(),
        description: String::new(),
        revision: 0,
    }
}

pub(crate) fn profile(id: &str, dest: &[&str]) -> Profile {
    Profile {
        id: id.into(),
        kind: ProfileKind::from_id(id),
        model: String::new(),
        destinations: dest.iter().map(|s| s.to_string()).collect(),
        base_profile: None,
        base_region: None,
        tags: BTreeMap::new(),
        description: String::new(),
        revision: 0,
    }
}

fn app(id: &str, base: &str) -> Profile {
    Profile {
        base_profile: Some(base.into()),
        ..profile(id, &[])
    }
}

fn route(p: &str, src: &str, d: &[(&str, f64)]) -> RouteTable {
    RouteTable {
        profile: p.into(),
        source_region: src.into(),
        destinations: d
            .iter()
            .map(|(r, w)| RouteDestination {
                region: r.to_string(),
                weight: *w,
                priority: 0,
            })
            .collect(),
        ttft_objective_ms: None,
        revision: 0,
    }
}

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.create_region(region("us-east", "us")).unwrap();
    c.create_region(region("us-west", "us")).unwrap();
    c.create_region(region("eu-west", "eu")).unwrap();
    c.create_profile(profile("us.llama-3.1-8b", &["us-east", "us-west"]))
        .unwrap();
    c.create_profile(profile(
        "global.llama-3.1-8b",
        &["us-east", "us-west", "eu-west"],
    ))
    .unwrap();
    c
}

fn field_of(e: ModelError) -> String {
    match e {
        ModelError::Invalid { field, .. } => field,
        other => panic!("expected an invalid-field error, got {other:?}"),
    }
}

#[test]
fn rejects_malformed_region_names() {
    for bad in ["", "US-East", "us_east", "-us", "us-", "1us"] {
        let e = Catalog::default()
            .create_region(region(bad, "us"))
            .unwrap_err();
        assert_eq!(field_of(e), "region.name", "{bad:?}");
    }
    let e = Catalog::default()
        .create_region(region("x", "global"))
        .unwrap_err();
    assert_eq!(field_of(e), "region.geography");
}

#[test]
fn derives_model_from_id() {
    let c = catalog();
    assert_eq!(c.profiles["us.llama-3.1-8b"].model, "llama-3.1-8b");
}

#[test]
fn rejects_malformed_profile_ids() {
    let mut c = catalog();
    for (id, kind) in [
        ("", ProfileKind::Application),
        ("us.", ProfileKind::Geographic),
        ("US.llama", ProfileKind::Geographic),
        ("us.llama", ProfileKind::Global),
        ("my.app", ProfileKind::Application),
        ("global. x", ProfileKind::Global),
    ] {
        let p = Profile {
            kind,
            ..profile(id, &["us-east"])
        };
        let e = c.create_profile(p).unwrap_err();
        assert_eq!(field_of(e), "profile.id", "{id:?}");
    }
}

#[test]
fn rejects_unknown_and_out_of_geography_destinations() {
    let mut c = catalog();
    let e = c
        .create_profile(profile("us.m", &["us-east", "ap-south"]))
        .unwrap_err();
    assert!(e.to_string().contains("profile.destinations[1]"), "{e}");
    assert!(e.to_string().contains("unknown region `ap-south`"), "{e}");
    let e = c.create_profile(profile("us.m", &["eu-west"])).unwrap_err();
    assert!(e.to_string().contains("outside `us`"), "{e}");
    let e = c.create_profile(profile("ap.m", &["us-east"])).unwrap_err();
    assert!(
        e.to_string().contains("no region is in geography `ap`"),
        "{e}"
    );
    let before = catalog();
    assert_eq!(c, before, "a rejected write changes nothing");
}

#[test]
fn application_profiles_resolve_and_block_deletion_of_their_base() {
    let mut c = catalog();
    let e = c.create_profile(app("team-a", "us.nope")).unwrap_err();
    assert_eq!(field_of(e), "profile.base_profile");
    c.create_profile(app("team-a", "us.llama-3.1-8b")).unwrap();
    let e = c.create_profile(app("team-b", "team-a")).unwrap_err();
    assert_eq!(field_of(e), "profile.base_profile");
    let r = c.resolve("team-a").unwrap();
    assert_eq!(r.model, "llama-3.1-8b");
    assert_eq!(r.destinations, ["us-east", "us-west"]);
    let e = c.delete_profile("us.llama-3.1-8b", 0).unwrap_err();
    assert!(matches!(e, ModelError::InUse(_)), "{e:?}");
    assert!(c.profiles.contains_key("us.llama-3.1-8b"));
    c.delete_profile("team-a", 0).unwrap();
    c.delete_profile("us.llama-3.1-8b", 0).unwrap();
}

#[test]
fn single_region_application_profile() {
    let mut c = catalog();
    let p = Profile {
        base_region: Some("eu-west".into()),
        model: "mistral-7b".into(),
        ..profile("eu-batch", &[])
    };
    c.create_profile(p).unwrap();
    let r = c.resolve("eu-batch").unwrap();
    assert_eq!(
        (r.model.as_str(), r.destinations.as_slice()),
        ("mistral-7b", &["eu-west".to_string()][..])
    );
    assert!(c.callable_from(&c.profiles["eu-batch"], &c.regions["eu-west"]));
    assert!(!c.callable_from(&c.profiles["eu-batch"], &c.regions["us-east"]));
    let e = c.delete_region("eu-west", 0).unwrap_err();
    assert!(matches!(e, ModelError::InUse(_)));
}

#[test]
fn rejects_bad_weights() {
    let mut c = catalog();
    for (w, needle) in [
        (-1.0, "weight"),
        (f64::NAN, "weight"),
        (f64::INFINITY, "weight"),
    ] {
        let e = c
            .create_route(route("us.llama-3.1-8b", "us-east", &[("us-east", w)]))
            .unwrap_err();
        assert!(field_of(e).ends_with(needle));
    }
    let e = c
        .create_route(route(
            "us.llama-3.1-8b",
            "us-east",
            &[("us-east", 0.0), ("us-west", 0.0)],
        ))
        .unwrap_err();
    assert!(e.to_string().contains("every weight is zero"), "{e}");
    let e = c
        .create_route(route("us.llama-3.1-8b", "eu-west", &[("us-east", 1.0)]))
        .unwrap_err();
    assert_eq!(field_of(e), "route_table.source_region");
    let e = c
        .create_route(route("us.llama-3.1-8b", "us-east", &[("eu-west", 1.0)]))
        .unwrap_err();
    assert_eq!(field_of(e), "route_table.destinations[0].region");
    assert!(c.routes.is_empty());
}

#[test]
fn updates_need_the_current_revision() {
    let mut c = catalog();
    c.regions.get_mut("us-east").unwrap().revision = 7;
    let mut r = region("us-east", "us");
    r.description = "new".into();
    let e = c.update_region(r.clone()).unwrap_err();
    assert_eq!(field_of(e), "region.revision");
    r.revision = 6;
    assert!(matches!(
        c.update_region(r.clone()),
        Err(ModelError::Conflict { actual: 7, .. })
    ));
    r.revision = 7;
    c.update_region(r).unwrap();
    assert_eq!(c.regions["us-east"].description, "new");
}

#[test]
fn moving_a_region_out_of_a_geography_in_use_is_refused() {
    let mut c = catalog();
    let mut r = region("us-west", "eu");
    r.revision = 0;
    c.regions.get_mut("us-west").unwrap().revision = 3;
    r.revision = 3;
    let e = c.update_region(r).unwrap_err();
    assert!(e.to_string().contains("profile `us.llama-3.1-8b`"), "{e}");
}

#[test]
fn default_route_puts_the_source_first() {
    let c = catalog();
    let r = c.resolve("global.llama-3.1-8b").unwrap();
    let t = c.route_for(&r, "us-west");
    let by_region: BTreeMap<_, _> = t
        .destinations
        .iter()
        .map(|d| (d.region.as_str(), d.priority))
        .collect();
    assert_eq!(by_region["us-west"], 0);
    assert_eq!(by_region["us-east"], 1);
    assert_eq!(by_region["eu-west"], 1);
}

#[test]
fn deleting_a_profile_deletes_its_route_tables() {
    let mut c = catalog();
    c.create_route(route(
        "us.llama-3.1-8b",
        "us-east",
        &[("us-east", 3.0), ("us-west", 1.0)],
    ))
    .unwrap();
    c.delete_profile("us.llama-3.1-8b", 0).unwrap();
    assert!(c.routes.is_empty());
}

/// A change is checked against what refers to it, not only itself: a
/// profile update that drops a destination its route table uses, or that
/// would leave a quota on a copy of it uncallable, is refused, and a
/// refused change leaves the catalog exactly as it was.
#[test]
fn changes_are_checked_against_what_refers_to_them_and_undone_when_refused() {
    let mut c = catalog();
    c.create_route(route("us.llama-3.1-8b", "us-east", &[("us-west", 1.0)]))
        .unwrap();
    c.create_profile(app("team-chat", "us.llama-3.1-8b"))
        .unwrap();
    c.create_quota(Quota {
        scope: QuotaScope::ProfileInRegion {
            profile: "team-chat".into(),
            source_region: "us-east".into(),
        },
        requests_per_minute: Some(10),
        tokens_per_minute: None,
        tokens_per_day: None,
        output_burndown: 1.0,
        revision: 0,
    })
    .unwrap();
    stamp(&mut c);
    let before = c.clone();
    let rev = c.profiles["us.llama-3.1-8b"].revision;
    // us-west is in the route table of us-east: it may not go.
    let e = c
        .update_profile(Profile {
            revision: rev,
            ..profile("us.llama-3.1-8b", &["us-east"])
        })
        .unwrap_err();
    assert!(e.to_string().contains("route table"), "{e}");
    assert_eq!(c, before);
    // A route table for a destination the profile lacks, an unknown
    // tenant's key, a tenant policy naming an unknown region: refused,
    // nothing changed.
    assert!(
        c.create_route(route(
            "global.llama-3.1-8b",
            "us-east",
            &[("ap-south", 1.0)]
        ))
        .is_err()
    );
    assert_eq!(c, before);
    // A valid change elsewhere is not held up by anything unrelated, and
    // the catalog stays valid as a whole.
    c.create_profile(profile("us.mistral-7b", &["us-west"]))
        .unwrap();
    c.validate().unwrap();
    // Moving a region's geography checks everything: us-west is used by
    // US profiles.
    let e = c
        .update_region(Region {
            revision: c.regions["us-west"].revision,
            ..region("us-west", "eu")
        })
        .unwrap_err();
    assert!(matches!(e, ModelError::Invalid { .. }), "{e}");
    c.validate().unwrap();
}

/// Random sequences of creates and updates: every accepted change leaves
/// a catalog that passes the whole check, every refused one leaves it as
/// it was.
#[test]
fn random_changes_keep_the_catalog_valid() {
    let regions = ["us-east", "us-west", "eu-west"];
    let ids = ["us.m1", "us.m2", "global.m1", "eu.m1", "team-a", "team-b"];
    let mut accepted = 0;
    for seed in 0..40 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut c = catalog();
        for _ in 0..200 {
            stamp(&mut c);
            let before = c.clone();
            c.start_journal();
            let pick =
                |rng: &mut fastrand::Rng, from: &[&str]| from[rng.usize(..from.len())].to_string();
            let result = match rng.u8(..5) {
                0 | 1 => {
                    let id = pick(&mut rng, &ids);
                    let mut p = if !id.contains('.') {
                        app(&id, &pick(&mut rng, &ids))
                    } else {
                        let n = rng.usize(1..=3);
                        let dest: Vec<&str> = (0..n).map(|_| regions[rng.usize(..3)]).collect();
                        profile(&id, &dest)
                    };
                    match c.profiles.get(&id) {
                        Some(old) => {
                            p.revision = old.revision;
                            c.update_profile(p)
                        }
                        None => c.create_profile(p),
                    }
                }
                2 => {
                    let p = pick(&mut rng, &ids);
                    let src = pick(&mut rng, &regions);
                    let mut r = route(&p, &src, &[(regions[rng.usize(..3)], 1.0)]);
                    match c.routes.get(&(p.clone(), src.clone())) {
                        Some(old) => {
                            r.revision = old.revision;
                            c.update_route(r)
                        }
                        None => c.create_route(r),
                    }
                }
                3 => {
                    let q = Quota {
                        scope: QuotaScope::ProfileInRegion {
                            profile: pick(&mut rng, &ids),
                            source_region: pick(&mut rng, &regions),
                        },
                        requests_per_minute: Some(5),
                        tokens_per_minute: None,
                        tokens_per_day: None,
                        output_burndown: 1.0,
                        revision: 0,
                    };
                    match c.quotas.get(&q.scope.id()) {
                        Some(old) => {
                            let q = Quota {
                                revision: old.revision,
                                ..q
                            };
                            c.update_quota(q)
                        }
                        None => c.create_quota(q),
                    }
                }
                _ => {
                    let id = pick(&mut rng, &ids);
                    match c.profiles.get(&id) {
                        Some(p) => {
                            let rev = p.revision;
                            c.delete_profile(&id, rev)
                        }
                        None => Ok(()),
                    }
                }
            };
            // The journal names every object that changed (and perhaps
            // one put back as it was), nothing of a refused change.
            let touched = c.take_journal().unwrap();
            let changed = differing(&before, &c);
            assert!(
                changed.is_subset(&touched),
                "seed {seed}: changed {changed:?}, journaled {touched:?}"
            );
            match result {
                Ok(()) => {
                    accepted += 1;
                    c.validate().unwrap_or_else(|e| {
                        panic!("seed {seed}: accepted into an invalid catalog: {e}")
                    })
                }
                Err(_) => {
                    assert_eq!(c, before, "seed {seed}: a refused change left traces");
                    assert!(touched.is_empty(), "seed {seed}: journaled {touched:?}");
                }
            }
        }
    }
    // Both outcomes were exercised.
    assert!(
        accepted > 1000 && accepted < 40 * 200,
        "{accepted} accepted"
    );
}

/// Gives every object a revision, as the store does when it writes them
/// (updates must name one).
fn stamp(c: &mut Catalog) {
    for r in c.regions.values_mut() {
        r.revision = r.revision.max(1);
    }
    for p in c.profiles.values_mut() {
        p.revision = p.revision.max(1);
    }
    for r in c.routes.values_mut() {
        r.revision = r.revision.max(1);
    }
    for q in c.quotas.values_mut() {
        q.revision = q.revision.max(1);
    }
    for t in c.tenants.values_mut() {
        t.revision = t.revision.max(1);
    }
    for k in c.keys.values_mut() {
        k.revision = k.revision.max(1);
    }
}

fn tenant(name: &str) -> Tenant {
    Tenant {
        name: name.into(),
        description: String::new(),
        profiles: vec!["*".into()],
        policy: RegionPolicy::default(),
        revision: 0,
    }
}

fn api_key(id: &str, tenant: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        tenant: tenant.into(),
        hash: "0".repeat(64),
        description: String::new(),
        created_at_unix: 0,
        revision: 0,
    }
}

fn quota_on(profile: &str, source: &str) -> Quota {
    Quota {
        scope: QuotaScope::ProfileInRegion {
            profile: profile.into(),
            source_region: source.into(),
        },
        requests_per_minute: Some(5),
        tokens_per_minute: None,
        tokens_per_day: None,
        output_burndown: 1.0,
        revision: 0,
    }
}

/// The objects that differ between two catalogs, found by comparing them
/// whole: what a journal must name.
fn differing(before: &Catalog, after: &Catalog) -> BTreeSet<Touched> {
    fn kind<K: Ord + Clone, V: PartialEq>(
        before: &BTreeMap<K, V>,
        after: &BTreeMap<K, V>,
        name: impl Fn(&K) -> Touched,
        out: &mut BTreeSet<Touched>,
    ) {
        for k in before.keys().chain(after.keys()) {
            if before.get(k) != after.get(k) {
                out.insert(name(k));
            }
        }
    }
    let mut out = BTreeSet::new();
    kind(
        &before.regions,
        &after.regions,
        |k| Touched::Region(k.clone()),
        &mut out,
    );
    kind(
        &before.profiles,
        &after.profiles,
        |k| Touched::Profile(k.clone()),
        &mut out,
    );
    kind(
        &before.routes,
        &after.routes,
        |(p, s)| Touched::Route(p.clone(), s.clone()),
        &mut out,
    );
    kind(
        &before.quotas,
        &after.quotas,
        |k| Touched::Quota(k.clone()),
        &mut out,
    );
    kind(
        &before.tenants,
        &after.tenants,
        |k| Touched::Tenant(k.clone()),
        &mut out,
    );
    kind(
        &before.keys,
        &after.keys,
        |k| Touched::Key(k.clone()),
        &mut out,
    );
    out
}

/// Runs `op` with a journal; returns its result and what was journaled.
fn journaled<R>(
    c: &mut Catalog,
    op: impl FnOnce(&mut Catalog) -> Result<R, ModelError>,
) -> (Result<R, ModelError>, BTreeSet<Touched>) {
    c.start_journal();
    let result = op(c);
    let touched = c.take_journal().expect("a journal was kept");
    (result, touched)
}

/// Each operation journals exactly the objects it put or removed, the
/// ones it removes along with another (a profile's route tables, a
/// tenant's keys) included; a catalog compared whole agrees.
#[test]
fn every_operation_journals_exactly_what_it_touched() {
    use Touched as T;
    fn s(v: &str) -> String {
        v.to_string()
    }
    let mut c = catalog();
    assert_eq!(c.take_journal(), None, "no journal unless started");
    type Op = Box<dyn FnOnce(&mut Catalog) -> Result<(), ModelError>>;
    let us = "us.llama-3.1-8b";
    let steps: Vec<(&str, Op, Vec<Touched>)> = vec![
        (
            "create a region",
            Box::new(|c| c.create_region(region("eu-north", "eu"))),
            vec![T::Region(s("eu-north"))],
        ),
        (
            "update a region",
            Box::new(|c| {
                let rev = c.regions["eu-north"].revision;
                c.update_region(Region {
                    description: s("changed"),
                    revision: rev,
                    ..region("eu-north", "eu")
                })
            }),
            vec![T::Region(s("eu-north"))],
        ),
        (
            "delete a region",
            Box::new(|c| c.delete_region("eu-north", 0)),
            vec![T::Region(s("eu-north"))],
        ),
        (
            "create a profile",
            Box::new(|c| c.create_profile(profile("us.m2", &["us-east"]))),
            vec![T::Profile(s("us.m2"))],
        ),
        (
            "update a profile",
            Box::new(|c| {
                let rev = c.profiles["us.m2"].revision;
                c.update_profile(Profile {
                    revision: rev,
                    ..profile("us.m2", &["us-east", "us-west"])
                })
            }),
            vec![T::Profile(s("us.m2"))],
        ),
        (
            "create an application profile",
            Box::new(move |c| c.create_profile(app("team-a", us))),
            vec![T::Profile(s("team-a"))],
        ),
        (
            "create a route table",
            Box::new(|c| c.create_route(route("us.m2", "us-east", &[("us-west", 1.0)]))),
            vec![T::Route(s("us.m2"), s("us-east"))],
        ),
        (
            "create another",
            Box::new(|c| c.create_route(route("us.m2", "us-west", &[("us-west", 1.0)]))),
            vec![T::Route(s("us.m2"), s("us-west"))],
        ),
        (
            "create one of another profile",
            Box::new(move |c| c.create_route(route(us, "us-east", &[("us-east", 1.0)]))),
            vec![T::Route(s(us), s("us-east"))],
        ),
        (
            "update a route table",
            Box::new(|c| {
                let rev = c.routes[&(s("us.m2"), s("us-east"))].revision;
                c.update_route(RouteTable {
                    revision: rev,
                    ..route("us.m2", "us-east", &[("us-east", 1.0), ("us-west", 1.0)])
                })
            }),
            vec![T::Route(s("us.m2"), s("us-east"))],
        ),
        (
            "delete a route table",
            Box::new(|c| c.delete_route("us.m2", "us-west", 0)),
            vec![T::Route(s("us.m2"), s("us-west"))],
        ),
        (
            "create a quota",
            Box::new(|c| c.create_quota(quota_on("us.m2", "us-east"))),
            vec![T::Quota(s("profile/us.m2@us-east"))],
        ),
        (
            "update a quota",
            Box::new(|c| {
                let rev = c.quotas["profile/us.m2@us-east"].revision;
                c.update_quota(Quota {
                    requests_per_minute: Some(7),
                    revision: rev,
                    ..quota_on("us.m2", "us-east")
                })
            }),
            vec![T::Quota(s("profile/us.m2@us-east"))],
        ),
        (
            "delete a quota",
            Box::new(|c| c.delete_quota("profile/us.m2@us-east", 0)),
            vec![T::Quota(s("profile/us.m2@us-east"))],
        ),
        (
            "delete a profile with its route tables",
            Box::new(|c| c.delete_profile("us.m2", 0)),
            vec![T::Profile(s("us.m2")), T::Route(s("us.m2"), s("us-east"))],
        ),
        (
            "create a tenant",
            Box::new(|c| c.create_tenant(tenant("acme"))),
            vec![T::Tenant(s("acme"))],
        ),
        (
            "update a tenant",
            Box::new(|c| {
                let rev = c.tenants["acme"].revision;
                c.update_tenant(Tenant {
                    description: s("changed"),
                    revision: rev,
                    ..tenant("acme")
                })
            }),
            vec![T::Tenant(s("acme"))],
        ),
        (
            "create a key",
            Box::new(|c| c.create_key(api_key("k1", "acme"))),
            vec![T::Key(s("k1"))],
        ),
        (
            "create another",
            Box::new(|c| c.create_key(api_key("k2", "acme"))),
            vec![T::Key(s("k2"))],
        ),
        (
            "delete a key",
            Box::new(|c| c.delete_key("k1").map(drop)),
            vec![T::Key(s("k1"))],
        ),
        (
            "delete a tenant with its keys",
            Box::new(|c| c.delete_tenant("acme", 0)),
            vec![T::Tenant(s("acme")), T::Key(s("k2"))],
        ),
    ];
    for (what, op, want) in steps {
        let before = c.clone();
        let (result, touched) = journaled(&mut c, op);
        result.unwrap_or_else(|e| panic!("{what}: {e}"));
        let want: BTreeSet<Touched> = want.into_iter().collect();
        assert_eq!(touched, want, "{what}");
        assert_eq!(differing(&before, &c), want, "{what}: compared whole");
        stamp(&mut c);
    }
}

/// A refused operation journals nothing (what it put is undone, journal
/// included), and does not drop what earlier operations journaled.
#[test]
fn a_refused_operation_journals_nothing() {
    let mut c = catalog();
    c.create_route(route("us.llama-3.1-8b", "us-east", &[("us-west", 1.0)]))
        .unwrap();
    c.create_profile(app("team-a", "us.llama-3.1-8b")).unwrap();
    c.create_tenant(tenant("acme")).unwrap();
    stamp(&mut c);
    let rev = c.profiles["us.llama-3.1-8b"].revision;
    type Op = Box<dyn FnOnce(&mut Catalog) -> Result<(), ModelError>>;
    let refused: Vec<(&str, Op)> = vec![
        // Refused before anything is put.
        (
            "an invalid region",
            Box::new(|c| c.create_region(region("US", "us"))),
        ),
        (
            "a duplicate",
            Box::new(|c| c.create_region(region("us-east", "us"))),
        ),
        (
            "a stale revision",
            Box::new(move |c| {
                c.update_profile(Profile {
                    revision: rev + 1,
                    ..profile("us.llama-3.1-8b", &["us-east"])
                })
            }),
        ),
        (
            "a region in use",
            Box::new(|c| c.delete_region("us-west", 0)),
        ),
        (
            "a base profile in use",
            Box::new(|c| c.delete_profile("us.llama-3.1-8b", 0)),
        ),
        (
            "an unknown key",
            Box::new(|c| c.delete_key("nope").map(drop)),
        ),
        // Put, checked against what refers to it, refused and undone.
        (
            "a destination a route table uses",
            Box::new(move |c| {
                c.update_profile(Profile {
                    revision: rev,
                    ..profile("us.llama-3.1-8b", &["us-east"])
                })
            }),
        ),
        (
            "a route table outside the profile",
            Box::new(|c| c.create_route(route("us.llama-3.1-8b", "us-west", &[("eu-west", 1.0)]))),
        ),
        (
            "a key of an unknown tenant",
            Box::new(|c| c.create_key(api_key("k1", "nobody"))),
        ),
        (
            "a geography move",
            Box::new(|c| {
                let rev = c.regions["us-west"].revision;
                c.update_region(Region {
                    revision: rev,
                    ..region("us-west", "eu")
                })
            }),
        ),
    ];
    for (what, op) in refused {
        let before = c.clone();
        let (result, touched) = journaled(&mut c, op);
        assert!(result.is_err(), "{what}: accepted");
        assert_eq!(touched, BTreeSet::new(), "{what}");
        assert_eq!(c, before, "{what}");
    }
    // Within one journal, a refusal keeps what came before it.
    c.start_journal();
    c.create_profile(profile("us.m2", &["us-east"])).unwrap();
    c.create_key(api_key("k1", "nobody")).unwrap_err();
    assert_eq!(
        c.take_journal(),
        Some(BTreeSet::from([Touched::Profile("us.m2".into())]))
    );
}
