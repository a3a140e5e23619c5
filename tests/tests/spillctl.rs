//! spillctl as a user runs it: tables by default, `-o json`, and one clear
//! line with a non-zero exit on any error.

use spillway_tests::{ControlPlane, bin};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn spillctl(cp: &ControlPlane, args: &[&str]) -> Run {
    let (ok, stdout, stderr) = cp.spillctl(args).await;
    Run { ok, stdout, stderr }
}

#[track_caller]
fn ok(r: &Run) -> &str {
    assert!(r.ok, "spillctl failed: {}", r.stderr);
    &r.stdout
}

#[tokio::test]
async fn manages_the_catalog_from_the_command_line() {
    let cp = ControlPlane::start(None, "cp").await;
    ok(&spillctl(&cp, &["regions", "create", "us-east", "--geography", "us"]).await);
    ok(&spillctl(&cp, &["regions", "create", "us-west", "-g", "us"]).await);
    ok(&spillctl(
        &cp,
        &[
            "profiles",
            "create",
            "us.llama-3.1-8b",
            "--destinations",
            "us-east,us-west",
        ],
    )
    .await);
    ok(&spillctl(
        &cp,
        &[
            "profiles",
            "create",
            "team-search",
            "--base-profile",
            "us.llama-3.1-8b",
            "--tag",
            "cost-center=search",
        ],
    )
    .await);
    ok(&spillctl(
        &cp,
        &[
            "routes",
            "set",
            "us.llama-3.1-8b",
            "--source",
            "us-east",
            "--dest",
            "us-east=3",
            "--dest",
            "us-west=1:1",
        ],
    )
    .await);
    // Setting again updates in place (spillctl sends the revision it read).
    ok(&spillctl(
        &cp,
        &[
            "routes",
            "set",
            "us.llama-3.1-8b",
            "--source",
            "us-east",
            "--dest",
            "us-east=1",
        ],
    )
    .await);

    let table = spillctl(&cp, &["profiles", "list"]).await;
    let lines: Vec<&str> = ok(&table).lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("DESTINATIONS"),
        "{}",
        lines[0]
    );
    assert!(
        lines.iter().any(|l| l.starts_with("team-search")
            && l.contains("application")
            && l.contains("cost-center=search")),
        "{table:?}",
        table = lines
    );

    let json = spillctl(
        &cp,
        &[
            "routes",
            "get",
            "us.llama-3.1-8b",
            "--source",
            "us-east",
            "-o",
            "json",
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(ok(&json)).expect("-o json prints JSON");
    assert_eq!(
        v["destinations"],
        serde_json::json!([{"region": "us-east", "weight": 1.0, "priority": 0}])
    );

    let list = spillctl(&cp, &["regions", "list", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(ok(&list)).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn errors_are_one_clear_line_and_a_non_zero_exit() {
    let cp = ControlPlane::start(None, "cp").await;
    ok(&spillctl(&cp, &["regions", "create", "us-east", "-g", "us"]).await);
    let before = spillctl(&cp, &["profiles", "list", "-o", "json"])
        .await
        .stdout;

    let bad = spillctl(
        &cp,
        &[
            "profiles",
            "create",
            "us.llama-3.1-8b",
            "--destinations",
            "us-east,nowhere",
        ],
    )
    .await;
    assert!(!bad.ok);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert!(
        bad.stderr
            .starts_with("error: invalid profile.destinations[1]: unknown region `nowhere`"),
        "{}",
        bad.stderr
    );
    assert_eq!(
        spillctl(&cp, &["profiles", "list", "-o", "json"])
            .await
            .stdout,
        before,
        "nothing was written"
    );

    let weight = spillctl(
        &cp,
        &[
            "routes",
            "set",
            "p",
            "--source",
            "us-east",
            "--dest",
            "us-east=heavy",
        ],
    )
    .await;
    assert!(
        !weight.ok && weight.stderr.contains("weight `heavy` is not a number"),
        "{}",
        weight.stderr
    );

    let missing = spillctl(&cp, &["regions", "get", "mars"]).await;
    assert!(!missing.ok);
    assert_eq!(
        missing.stderr.trim(),
        "error: region `mars` not found (not_found)"
    );

    let unreachable = tokio::process::Command::new(bin("spillctl"))
        .args(["--control-plane", "http://127.0.0.1:1", "regions", "list"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8(unreachable.stderr).unwrap();
    assert!(!unreachable.status.success());
    assert!(
        stderr.starts_with("error: cannot reach the control plane at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn help_reads_well() {
    let out = tokio::process::Command::new(bin("spillctl"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "regions",
        "profiles",
        "routes",
        "agents",
        "--control-plane",
        "Examples:",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// A list longer than one page (the control plane answers at most 1,000 a
/// page): spillctl follows the pages and shows every one, once.
#[tokio::test]
async fn lists_longer_than_a_page_are_shown_whole() {
    let cp = ControlPlane::start(None, "cp").await;
    let mut admin = cp.admin().await;
    for i in 0..1005 {
        admin
            .create_region(spillway_proto::pb::CreateRegionRequest {
                region: Some(spillway_proto::pb::Region {
                    name: format!("r-{i:04}"),
                    geography: "g".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let first = admin
        .list_regions(spillway_proto::pb::ListRegionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.regions.len(), 1000);
    assert!(!first.next_page_token.is_empty());
    let list = spillctl(&cp, &["regions", "list", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(ok(&list)).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..1005).map(|i| format!("r-{i:04}")).collect();
    assert_eq!(names, expected);
}
