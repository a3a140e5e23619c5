//! The doors beyond chat completions, end to end: OpenAI's legacy
//! completions, embeddings and Responses, and Anthropic's Messages. Each is
//! served in its source region, spills through the relay, is throttled with
//! its API's own headers, never reaches a region its tenant's policy
//! denies, is audited once in its source region only, and answers bad
//! input in its API's own error shape naming the field. Model servers say
//! which APIs they serve, and calls go only where they are served.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use spillway_core::api::{Api, ApiSet};
use spillway_proto::pb;
use spillway_tests::cluster::{Cluster, ClusterSpec, EU, Http, HttpAnswer, US};
use spillway_tests::sim::token;

/// The four APIs under test, with a valid body of each for `model`.
fn body(api: Api, model: &str, stream: bool) -> String {
    match api {
        Api::Completions => {
            json!({"model": model, "prompt": "hello", "max_tokens": 4, "stream": stream})
        }
        Api::Embeddings => json!({"model": model, "input": ["hello", "world"]}),
        Api::Responses => {
            json!({"model": model, "input": "hello", "max_output_tokens": 4, "stream": stream})
        }
        Api::Messages => json!({
            "model": model, "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        }),
        Api::Chat => json!({
            "model": model, "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        }),
    }
    .to_string()
}

const DOORS: [Api; 4] = [
    Api::Completions,
    Api::Embeddings,
    Api::Responses,
    Api::Messages,
];

/// The headers a client of `api` sends with `key`: the Anthropic SDK's
/// for Messages (`x-api-key`, `anthropic-version`), a bearer key for the
/// rest.
fn headers(api: Api, key: &str) -> Vec<(String, String)> {
    if api == Api::Messages {
        vec![
            ("x-api-key".into(), key.into()),
            ("anthropic-version".into(), "2023-06-01".into()),
            ("x-stainless-lang".into(), "python".into()),
        ]
    } else {
        vec![("authorization".into(), format!("Bearer {key}"))]
    }
}

async fn call(
    http: &Http,
    cluster: &Cluster,
    region: &str,
    api: Api,
    key: &str,
    body: String,
) -> HttpAnswer {
    let h = headers(api, key);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    http.post_with(cluster.region(region).agent.http, api.path(), &h, body)
        .await
}

/// The text of a unary answer of `api`, read in that API's shape.
fn unary_text(api: Api, v: &Value) -> String {
    match api {
        Api::Completions => v["choices"][0]["text"].as_str().unwrap().to_string(),
        Api::Responses => v["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_string(),
        Api::Messages => v["content"][0]["text"].as_str().unwrap().to_string(),
        Api::Embeddings => panic!("embeddings have no text"),
        Api::Chat => v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

/// The text of a streamed answer of `api`, from its events in order.
fn streamed_text(api: Api, sse: &str) -> String {
    let mut text = String::new();
    let mut events = Vec::new();
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            events.push("[DONE]".to_string());
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        events.push(v["type"].as_str().unwrap_or("chunk").to_string());
        match api {
            Api::Completions => text += v["choices"][0]["text"].as_str().unwrap_or(""),
            Api::Responses if v["type"] == "response.output_text.delta" => {
                text += v["delta"].as_str().unwrap()
            }
            Api::Messages if v["type"] == "content_block_delta" => {
                text += v["delta"]["text"].as_str().unwrap()
            }
            _ => {}
        }
    }
    // Each stream ends the way its API ends one.
    let last = events.last().map(String::as_str);
    match api {
        Api::Completions => assert_eq!(last, Some("[DONE]"), "{events:?}"),
        Api::Responses => assert_eq!(last, Some("response.completed"), "{events:?}"),
        Api::Messages => {
            assert_eq!(events.first().map(String::as_str), Some("message_start"));
            assert_eq!(last, Some("message_stop"), "{events:?}");
        }
        _ => {}
    }
    text
}

/// The field an error answer of `api` names, checking the API's shape.
fn error_of(api: Api, a: &HttpAnswer) -> (String, String) {
    let v = a.json();
    if api == Api::Messages {
        assert_eq!(v["type"], "error", "{v}");
        (
            v["error"]["type"].as_str().unwrap().to_string(),
            v["error"]["message"].as_str().unwrap().to_string(),
        )
    } else {
        (
            v["error"]["type"].as_str().unwrap().to_string(),
            v["error"]["param"].as_str().unwrap_or("").to_string(),
        )
    }
}

#[tokio::test]
async fn every_door_serves_spills_throttles_meets_policy_and_audits_at_the_source() {
    let cluster = Cluster::start(ClusterSpec {
        anonymous: false,
        audit: true,
        ..ClusterSpec::default()
    })
    .await;
    let cp = &cluster.cp;
    cp.create_tenant("open", &["*"], Default::default()).await;
    cp.create_tenant(
        "east-only",
        &["*"],
        pb::RegionPolicy {
            deny_regions: vec!["us-west".into()],
            ..Default::default()
        },
    )
    .await;
    cp.create_tenant("small", &["*"], Default::default()).await;
    cp.admin()
        .await
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    tenant: "small".into(),
                    ..Default::default()
                }),
                requests_per_minute: Some(6),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let open = cp.create_key("open").await.1;
    let east_only = cp.create_key("east-only").await.1;
    let small = cp.create_key("small").await.1;
    cluster
        .region("us-east")
        .agent
        .wait_for("the keys and the quota", |c| {
            c.keys.len() == 3 && !c.quotas.is_empty()
        })
        .await;
    let http = Http::default();
    let mut expected_audit: BTreeMap<&str, usize> = BTreeMap::new();

    for api in DOORS {
        // Served in the source region, unary and streamed.
        let a = call(&http, &cluster, "us-east", api, &open, body(api, US, false)).await;
        assert_eq!(a.status, 200, "{api}: {}", a.text());
        assert_eq!(a.region(), Some("us-east"), "{api}");
        assert!(a.headers.contains_key("x-request-id"), "{api}");
        let v = a.json();
        if api == Api::Embeddings {
            assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
        } else {
            assert_eq!(
                unary_text(api, &v),
                (0..4).map(token).collect::<String>(),
                "{api}"
            );
            let s = call(&http, &cluster, "us-east", api, &open, body(api, US, true)).await;
            assert_eq!(s.status, 200, "{api}: {}", s.text());
            assert_eq!(s.headers["content-type"], "text/event-stream", "{api}");
            assert_eq!(
                streamed_text(api, &s.text()),
                (0..4).map(token).collect::<String>(),
                "{api}"
            );
            *expected_audit.entry(api.as_str()).or_default() += 1;
        }
        *expected_audit.entry(api.as_str()).or_default() += 1;
        if api == Api::Messages {
            assert!(a.headers.contains_key("request-id"));
        }

        // Bad input: the API's own error shape, naming the field.
        let bad = match api {
            Api::Completions => json!({"model": US}),
            Api::Embeddings => json!({"model": US, "input": 5}),
            Api::Responses => json!({"model": US, "input": "x", "store": true}),
            Api::Messages => json!({"model": US, "messages": [{"role": "user", "content": "x"}]}),
            Api::Chat => unreachable!(),
        };
        let a = call(&http, &cluster, "us-east", api, &open, bad.to_string()).await;
        assert_eq!(a.status, 400, "{api}: {}", a.text());
        let (kind, named) = error_of(api, &a);
        assert_eq!(kind, "invalid_request_error", "{api}");
        let field = match api {
            Api::Completions => "prompt",
            Api::Embeddings => "input",
            Api::Responses => "store",
            _ => "max_tokens",
        };
        assert!(named.contains(field), "{api}: {named}");
        *expected_audit.entry(api.as_str()).or_default() += 1;

        // Throttled by a quota: 429 with the API's rate-limit headers.
        let mut throttled = None;
        for _ in 0..10 {
            let a = call(
                &http,
                &cluster,
                "us-east",
                api,
                &small,
                body(api, US, false),
            )
            .await;
            *expected_audit.entry(api.as_str()).or_default() += 1;
            if a.status == 429 {
                throttled = Some(a);
                break;
            }
            assert_eq!(a.status, 200, "{api}: {}", a.text());
        }
        let t = throttled.expect("6 a minute: ten calls in a row are not all admitted");
        assert!(t.headers.contains_key("retry-after"), "{api}");
        assert_eq!(t.headers["x-spillway-throttle"], "quota");
        if api == Api::Messages {
            assert_eq!(error_of(api, &t).0, "rate_limit_error");
            assert_eq!(t.headers["anthropic-ratelimit-requests-limit"], "6");
            let reset = t.headers["anthropic-ratelimit-requests-reset"]
                .to_str()
                .unwrap();
            assert!(reset.ends_with('Z') && reset.contains('T'), "{reset}");
        } else {
            assert_eq!(t.json()["error"]["code"], "quota_exceeded");
            assert_eq!(t.headers["x-ratelimit-limit-requests"], "6");
        }
    }

    // us-east now sends every call of the US profile to us-west.
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let west_before = cluster.region("us-west").served();
    for api in DOORS {
        // Spilled through the relay, unary and streamed.
        let a = call(&http, &cluster, "us-east", api, &open, body(api, US, false)).await;
        assert_eq!(a.status, 200, "{api}: {}", a.text());
        assert_eq!(a.region(), Some("us-west"), "{api}");
        *expected_audit.entry(api.as_str()).or_default() += 1;
        if api != Api::Embeddings {
            let s = call(&http, &cluster, "us-east", api, &open, body(api, US, true)).await;
            assert_eq!(s.region(), Some("us-west"), "{api}");
            assert_eq!(
                streamed_text(api, &s.text()),
                (0..4).map(token).collect::<String>(),
                "{api}"
            );
            *expected_audit.entry(api.as_str()).or_default() += 1;
        }
        // A tenant whose policy denies us-west: refused, never sent there.
        let served = cluster.region("us-west").served();
        let a = call(
            &http,
            &cluster,
            "us-east",
            api,
            &east_only,
            body(api, US, false),
        )
        .await;
        assert_eq!(a.status, 403, "{api}: {}", a.text());
        let (kind, _) = error_of(api, &a);
        assert_eq!(kind, "permission_error", "{api}");
        assert!(a.text().contains("region policy"), "{}", a.text());
        assert_eq!(cluster.region("us-west").served(), served, "{api}");
        *expected_audit.entry(api.as_str()).or_default() += 1;
    }
    assert_eq!(cluster.region("us-west").served(), west_before + 7);

    // One audit record per call, in the source region only, naming its
    // API; the spilled ones name us-west as where they were served.
    let east = &cluster.region("us-east");
    spillway_tests::wait_until(
        "every call's audit record",
        std::time::Duration::from_secs(10),
        || async {
            let n: usize = expected_audit.values().sum();
            east.audit().len() >= n
        },
    )
    .await;
    let records = east.audit();
    let mut by_api: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *by_api
            .entry(r["api"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = expected_audit
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    assert_eq!(by_api, expected);
    let spilled = records
        .iter()
        .filter(|r| r["inference_region"] == "us-west")
        .count();
    assert_eq!(
        spilled, 7,
        "four unary and three streamed calls were relayed"
    );
    for quiet in ["us-west", "eu-west"] {
        assert!(
            cluster.region(quiet).audit().is_empty(),
            "{quiet} keeps no record of calls it served for us-east"
        );
    }
    // Embeddings count input tokens only.
    let embedded = records
        .iter()
        .find(|r| r["api"] == "embeddings" && r["status"] == 200)
        .unwrap();
    assert_eq!(embedded["output_tokens"], 0, "{embedded}");
    assert!(embedded["input_tokens"].as_u64().unwrap() > 0, "{embedded}");
}

#[tokio::test]
async fn calls_go_only_where_their_api_is_served() {
    // us-east and eu-west serve chat and completions; us-west every API.
    let chat_only = ApiSet::of(Api::DEFAULT);
    let mut spec = ClusterSpec::default();
    spec.apis.insert("us-east", chat_only);
    spec.apis.insert("eu-west", chat_only);
    let cluster = Cluster::start(spec).await;
    let http = Http::default();
    let east = cluster.region("us-east");
    // us-west's agent announced what it serves.
    east.agent
        .wait_for("us-west's APIs", |c| {
            c.relays
                .get("us-west")
                .is_some_and(|a| a.iter().any(|e| e.apis.contains(Api::Messages)))
        })
        .await;

    // Chat stays at the source; embeddings and messages go where they are
    // served, though the source has headroom.
    let a = http
        .post(
            east.agent.http,
            "/v1/completions",
            body(Api::Completions, US, false),
        )
        .await;
    assert_eq!(a.region(), Some("us-east"), "{}", a.text());
    for api in [Api::Embeddings, Api::Responses, Api::Messages] {
        let a = http
            .post(east.agent.http, api.path(), body(api, US, false))
            .await;
        assert_eq!(a.status, 200, "{api}: {}", a.text());
        assert_eq!(a.region(), Some("us-west"), "{api}");
    }
    assert_eq!(
        east.sims
            .iter()
            .map(|s| s.state.received.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>(),
        1
    );

    // No region of the EU profile serves embeddings or messages: a clear
    // 400 naming the API, in the API's own shape, and nothing was sent.
    let eu = cluster.region("eu-west");
    let a = http
        .post(
            eu.agent.http,
            "/v1/embeddings",
            body(Api::Embeddings, EU, false),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text());
    let e = a.json();
    assert_eq!(e["error"]["code"], "api_not_supported", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embeddings API (POST /v1/embeddings)"),
        "{e}"
    );
    let a = http
        .post(
            eu.agent.http,
            "/v1/messages",
            body(Api::Messages, EU, false),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text());
    assert_eq!(a.json()["type"], "error");
    assert!(a.text().contains("messages API"), "{}", a.text());
    assert_eq!(eu.served(), 0);
}

#[tokio::test]
async fn a_broken_messages_stream_ends_with_an_anthropic_error_event_and_is_charged_what_it_streamed()
 {
    let cluster = Cluster::start(ClusterSpec {
        audit: true,
        ..ClusterSpec::default()
    })
    .await;
    let east = cluster.region("us-east");
    for sim in &east.sims {
        sim.state.set(|c| c.break_after = Some(3));
    }
    let http = Http::default();
    let a = http
        .post(
            east.agent.http,
            "/v1/messages",
            body(Api::Messages, US, true),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let text = a.text();
    // The tokens before the break, then an error event the Anthropic SDK
    // raises: `event: error` with Anthropic's error object.
    assert!(text.contains("tok2 "), "{text}");
    let error = text
        .split("event: error\ndata: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let error: Value = serde_json::from_str(error.lines().next().unwrap()).unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    // Unknown paths and wrong methods under /v1/messages answer in
    // Anthropic's shape too.
    let a = http.get(east.agent.http, "/v1/messages").await;
    assert_eq!(a.status, 405);
    assert_eq!(a.json()["type"], "error");
    // The call is charged the three tokens it streamed, not the one that
    // `message_start` announced.
    spillway_tests::wait_until(
        "the broken call's audit record",
        std::time::Duration::from_secs(10),
        || async { !east.audit().is_empty() },
    )
    .await;
    let record = &east.audit()[0];
    assert_eq!(record["outcome"], "incomplete", "{record}");
    assert!(record["output_tokens"].as_u64().unwrap() >= 3, "{record}");
}

#[tokio::test]
async fn a_region_that_serves_the_model_but_not_over_the_api_is_passed_over_not_ejected() {
    use spillway_tests::cluster::MODEL;
    use spillway_tests::sim::SimConfig;
    use spillway_tests::{AgentOptions, ControlPlane, TestAgent, TestSim, model_server};

    let cp = ControlPlane::start_with(None, "cp", &["--weights-interval-ms", "60000"]).await;
    for r in ["us-east", "us-west"] {
        cp.create_region(r, "us").await;
    }
    cp.admin()
        .await
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: US.into(),
                destinations: vec!["us-east".into(), "us-west".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let planes = [cp.url()];
    // us-west serves the model over chat only; its other server makes
    // embeddings of another model, so its agent announces embeddings too.
    let (chat_sim, other_sim, east_sim) = (
        TestSim::start(SimConfig::default()).await,
        TestSim::start(SimConfig::default()).await,
        TestSim::start(SimConfig::default()).await,
    );
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut west = AgentOptions::new("w", "us-west", &planes, d1.path());
    let mut chat_only = model_server(chat_sim.addr, &[MODEL], 64);
    chat_only.apis = ApiSet::of([Api::Chat]);
    let mut embedder = model_server(other_sim.addr, &["bge-small"], 64);
    embedder.apis = ApiSet::of([Api::Embeddings]);
    west.model_servers = vec![chat_only, embedder];
    let west = TestAgent::start_with(west).await;
    let mut east = AgentOptions::new("e", "us-east", &planes, d2.path());
    let mut east_chat = model_server(east_sim.addr, &[MODEL], 64);
    east_chat.apis = ApiSet::of([Api::Chat]);
    east.model_servers = vec![east_chat];
    let east = TestAgent::start_with(east).await;
    east.wait_for("us-west's agent and the profile", |c| {
        c.routes.contains_key(US)
            && c.relays
                .get("us-west")
                .is_some_and(|a| a.iter().any(|e| e.apis.contains(Api::Embeddings)))
    })
    .await;
    west.wait_for("us-east's agent", |c| c.relays.contains_key("us-east"))
        .await;

    let http = Http::default();
    for _ in 0..3 {
        let a = http
            .post(
                east.http,
                "/v1/embeddings",
                body(Api::Embeddings, US, false),
            )
            .await;
        assert_eq!(a.status, 400, "{}", a.text());
        assert_eq!(
            a.json()["error"]["code"],
            "api_not_supported",
            "{}",
            a.text()
        );
    }
    let received = |s: &TestSim| s.state.received.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        received(&chat_sim) + received(&other_sim) + received(&east_sim),
        0
    );
    // us-west was not ejected for it: with us-east's server down, chat
    // calls still fail over to us-west.
    east_sim
        .state
        .down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        let a = http
            .post(
                east.http,
                "/v1/chat/completions",
                body(Api::Chat, US, false),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.region(), Some("us-west"));
    }
    let metrics = http.get(east.http, "/metrics").await.text();
    assert!(
        !metrics.contains("spillway_agent_ejections_total{region=\"us-west\"}"),
        "{metrics}"
    );
}
