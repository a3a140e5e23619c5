//! Converse beyond text, end to end through an agent to the simulated
//! engines: tool use (the tool configuration, the model's tool call, the
//! client's tool result and the final answer, unary and streamed), images
//! and system prompts as the engine receives them, a spilled call that
//! keeps its tools, and bad input refused before any engine sees it.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use spillway_proto::pb::{
    self, content_block::Block, converse_stream_event::Event,
    inference_service_client::InferenceServiceClient, tool_choice::Choice,
    tool_result_content::Content as ResultContent,
};
use spillway_tests::cluster::{Cluster, ClusterSpec, US};
use spillway_tests::sim::{SIM_TOOL_ARGUMENTS, SIM_TOOL_CALL_ID, token};
use tonic::transport::Channel;

const SCHEMA: &str = r#"{"type":"object","properties":{"q":{"type":"string"}},"required":["q"]}"#;

async fn client(cluster: &Cluster, region: &str) -> InferenceServiceClient<Channel> {
    let addr = cluster.region(region).agent.addr;
    InferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn text(t: &str) -> pb::ContentBlock {
    pb::ContentBlock {
        block: Some(Block::Text(t.into())),
    }
}

fn user(content: Vec<pb::ContentBlock>) -> pb::Message {
    pb::Message {
        role: pb::Role::User.into(),
        content,
    }
}

fn tool_config() -> pb::ToolConfiguration {
    pb::ToolConfiguration {
        tools: vec![pb::Tool {
            tool: Some(pb::tool::Tool::ToolSpec(pb::ToolSpecification {
                name: "search".into(),
                description: "searches the tokens".into(),
                input_schema: SCHEMA.into(),
            })),
        }],
        tool_choice: Some(pb::ToolChoice {
            choice: Some(Choice::Any(pb::AnyToolChoice {})),
        }),
    }
}

/// A question with the search tool offered.
fn question() -> pb::ConverseRequest {
    pb::ConverseRequest {
        model_id: US.into(),
        messages: vec![user(vec![text("where is tok0?")])],
        tool_config: Some(tool_config()),
        ..Default::default()
    }
}

/// The request that answers the model's tool call: the conversation so
/// far, the model's message, and the tool's result.
fn with_result(mut req: pb::ConverseRequest, output: pb::Message) -> pb::ConverseRequest {
    let result = pb::ToolResultBlock {
        tool_use_id: SIM_TOOL_CALL_ID.into(),
        content: vec![pb::ToolResultContent {
            content: Some(ResultContent::Json(r#"{"hits":1}"#.into())),
        }],
        status: pb::ToolResultStatus::Success.into(),
    };
    req.messages.push(output);
    req.messages.push(user(vec![pb::ContentBlock {
        block: Some(Block::ToolResult(result)),
    }]));
    req
}

/// The path and body of the call a region's model servers received last,
/// cleared so that the next call's is read next.
fn take_last(cluster: &Cluster, region: &str) -> Option<(String, Value)> {
    let mut found = None;
    for sim in &cluster.region(region).sims {
        if let Some(last) = sim.state.last.lock().unwrap().take() {
            assert!(found.is_none(), "two model servers got a call");
            found = Some(last);
        }
    }
    found
}

fn all_tokens() -> String {
    (0..16).map(token).collect()
}

#[tokio::test]
async fn a_tool_call_and_its_result_round_trip_over_converse() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut client = client(&cluster, "us-east").await;

    let resp = client.converse(question()).await.unwrap().into_inner();
    assert_eq!(resp.inference_region, "us-east");
    assert_eq!(resp.stop_reason, pb::StopReason::ToolUse as i32);
    let output = resp.output.unwrap();
    assert_eq!(output.role, pb::Role::Assistant as i32);
    assert_eq!(
        output.content,
        vec![pb::ContentBlock {
            block: Some(Block::ToolUse(pb::ToolUseBlock {
                tool_use_id: SIM_TOOL_CALL_ID.into(),
                name: "search".into(),
                input: SIM_TOOL_ARGUMENTS.into(),
            })),
        }]
    );
    let (path, body) = take_last(&cluster, "us-east").expect("the engine got the call");
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(
        body["tools"],
        json!([{"type": "function", "function": {"name": "search",
            "description": "searches the tokens",
            "parameters": serde_json::from_str::<Value>(SCHEMA).unwrap()}}])
    );
    assert_eq!(body["tool_choice"], "required");

    // The client runs the tool and sends its result back.
    let resp = client
        .converse(with_result(question(), output))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.stop_reason, pb::StopReason::EndTurn as i32);
    assert_eq!(resp.output.unwrap().content, vec![text(&all_tokens())]);
    let (_, body) = take_last(&cluster, "us-east").expect("the engine got the result");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(
        messages[1..],
        [
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": SIM_TOOL_CALL_ID, "type": "function",
                "function": {"name": "search", "arguments": SIM_TOOL_ARGUMENTS}}]}),
            json!({"role": "tool", "tool_call_id": SIM_TOOL_CALL_ID, "content": r#"{"hits":1}"#}),
        ]
    );
    assert_eq!(body["tools"][0]["function"]["name"], "search");
}

/// What a client rebuilds of a Converse stream.
#[derive(Default, Debug)]
struct Streamed {
    text: String,
    /// Tool uses by block: id, name, the input pieces joined.
    tools: Vec<(u32, String, String, String)>,
    stopped_blocks: Vec<u32>,
    stop: Option<i32>,
    region: String,
}

async fn stream(
    client: &mut InferenceServiceClient<Channel>,
    req: pb::ConverseRequest,
) -> Streamed {
    let mut events = client.converse_stream(req).await.unwrap().into_inner();
    let mut s = Streamed::default();
    while let Some(e) = events.message().await.unwrap() {
        match e.event.unwrap() {
            Event::MessageStart(m) => s.region = m.inference_region,
            Event::ContentBlockStart(b) => {
                let t = b.tool_use.expect("a tool use starts");
                s.tools
                    .push((b.content_block_index, t.tool_use_id, t.name, String::new()));
            }
            Event::ContentDelta(d) if d.tool_use_input.is_empty() => {
                assert_eq!(d.content_block_index, 0, "text is block 0");
                s.text.push_str(&d.text);
            }
            Event::ContentDelta(d) => {
                let tool = s
                    .tools
                    .iter_mut()
                    .find(|t| t.0 == d.content_block_index)
                    .expect("a tool delta follows its block's start");
                tool.3.push_str(&d.tool_use_input);
            }
            Event::ContentBlockStop(b) => s.stopped_blocks.push(b.content_block_index),
            Event::MessageStop(m) => s.stop = Some(m.stop_reason),
            Event::Metadata(_) => {}
        }
    }
    s
}

#[tokio::test]
async fn tool_calls_stream_as_block_starts_input_deltas_and_stops() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut client = client(&cluster, "us-east").await;

    let s = stream(&mut client, question()).await;
    assert_eq!(s.region, "us-east");
    assert_eq!(s.text, "");
    assert_eq!(
        s.tools,
        [(
            1,
            SIM_TOOL_CALL_ID.to_string(),
            "search".to_string(),
            SIM_TOOL_ARGUMENTS.to_string()
        )]
    );
    assert_eq!(s.stopped_blocks, [1]);
    assert_eq!(s.stop, Some(pb::StopReason::ToolUse as i32));
    let (_, body) = take_last(&cluster, "us-east").unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["tools"][0]["function"]["name"], "search");

    // The rebuilt tool use goes back with its result; the answer is text.
    let (_, id, name, input) = s.tools[0].clone();
    let output = pb::Message {
        role: pb::Role::Assistant.into(),
        content: vec![pb::ContentBlock {
            block: Some(Block::ToolUse(pb::ToolUseBlock {
                tool_use_id: id,
                name,
                input,
            })),
        }],
    };
    let s = stream(&mut client, with_result(question(), output)).await;
    assert_eq!(s.text, all_tokens());
    assert!(s.tools.is_empty());
    assert_eq!(s.stopped_blocks, [0]);
    assert_eq!(s.stop, Some(pb::StopReason::EndTurn as i32));
    let (_, body) = take_last(&cluster, "us-east").unwrap();
    assert_eq!(
        body["messages"][2],
        json!({"role": "tool", "tool_call_id": SIM_TOOL_CALL_ID, "content": r#"{"hits":1}"#})
    );
}

#[tokio::test]
async fn images_and_the_system_prompt_reach_the_engine_as_chat_parts() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut client = client(&cluster, "us-east").await;
    let png = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    let image = |format: pb::ImageFormat, bytes: &[u8]| pb::ContentBlock {
        block: Some(Block::Image(pb::ImageBlock {
            format: format.into(),
            bytes: bytes.to_vec().into(),
        })),
    };
    let req = pb::ConverseRequest {
        model_id: US.into(),
        system: vec![text("answer in one word")],
        messages: vec![user(vec![
            text("what are these?"),
            image(pb::ImageFormat::Png, &png),
            image(pb::ImageFormat::Webp, b"foo"),
        ])],
        ..Default::default()
    };
    let resp = client.converse(req).await.unwrap().into_inner();
    assert_eq!(resp.output.unwrap().content, vec![text(&all_tokens())]);
    let (_, body) = take_last(&cluster, "us-east").unwrap();
    let url = |u: &str| json!({"type": "image_url", "image_url": {"url": u}});
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "answer in one word"},
            {"role": "user", "content": [
                {"type": "text", "text": "what are these?"},
                url("data:image/png;base64,iVBORw0KGgo="),
                url("data:image/webp;base64,Zm9v"),
            ]},
        ])
    );
    assert!(body.get("tools").is_none(), "{body}");
}

#[tokio::test]
async fn a_spilled_call_keeps_its_tools() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let mut client = client(&cluster, "us-east").await;
    let resp = client.converse(question()).await.unwrap().into_inner();
    assert_eq!(resp.inference_region, "us-west");
    assert_eq!(resp.stop_reason, pb::StopReason::ToolUse as i32);
    assert!(take_last(&cluster, "us-east").is_none());
    let (_, body) = take_last(&cluster, "us-west").expect("us-west's engine got the call");
    assert_eq!(body["tools"][0]["function"]["name"], "search");
    assert_eq!(body["tool_choice"], "required");

    let s = stream(&mut client, question()).await;
    assert_eq!(s.region, "us-west");
    assert_eq!(s.tools.len(), 1);
    assert_eq!(s.tools[0].3, SIM_TOOL_ARGUMENTS);
    assert_eq!(s.stop, Some(pb::StopReason::ToolUse as i32));
}

#[tokio::test]
async fn bad_input_is_refused_naming_its_field_and_reaches_no_engine() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut client = client(&cluster, "us-east").await;
    let block = |b: Block| pb::ContentBlock { block: Some(b) };
    let image = |format: pb::ImageFormat, bytes: Vec<u8>| {
        block(Block::Image(pb::ImageBlock {
            format: format.into(),
            bytes: bytes.into(),
        }))
    };
    let tool_use = |id: &str, name: &str, input: &str| {
        block(Block::ToolUse(pb::ToolUseBlock {
            tool_use_id: id.into(),
            name: name.into(),
            input: input.into(),
        }))
    };
    let second = |role: pb::Role, content: Vec<pb::ContentBlock>| {
        let mut r = question();
        r.messages.push(pb::Message {
            role: role.into(),
            content,
        });
        r
    };
    let tools = |change: &dyn Fn(&mut pb::ToolConfiguration)| {
        let mut r = question();
        change(r.tool_config.as_mut().unwrap());
        r
    };
    let with_spec = |change: &dyn Fn(&mut pb::ToolSpecification)| {
        tools(&|c| {
            if let Some(pb::tool::Tool::ToolSpec(s)) = &mut c.tools[0].tool {
                change(s);
            }
        })
    };
    let cases = [
        (
            second(pb::Role::User, vec![image(pb::ImageFormat::Png, vec![])]),
            "messages[1].content[0].image.bytes",
        ),
        (
            second(
                pb::Role::User,
                vec![image(pb::ImageFormat::Unspecified, vec![1])],
            ),
            "messages[1].content[0].image.format",
        ),
        (
            second(
                pb::Role::User,
                vec![
                    text("look"),
                    image(pb::ImageFormat::Jpeg, vec![0; 3_750_001]),
                ],
            ),
            "messages[1].content[1].image.bytes",
        ),
        (
            second(pb::Role::Assistant, vec![tool_use("", "search", "{}")]),
            "messages[1].content[0].tool_use.tool_use_id",
        ),
        (
            second(pb::Role::Assistant, vec![tool_use("c", "", "{}")]),
            "messages[1].content[0].tool_use.name",
        ),
        (
            second(pb::Role::Assistant, vec![tool_use("c", "search", "\"q\"")]),
            "messages[1].content[0].tool_use.input",
        ),
        (
            second(
                pb::Role::User,
                vec![block(Block::ToolResult(pb::ToolResultBlock::default()))],
            ),
            "messages[1].content[0].tool_result.tool_use_id",
        ),
        (
            with_spec(&|s| s.name = "no spaces".into()),
            "tool_config.tools[0].tool_spec.name",
        ),
        (
            with_spec(&|s| s.name = "a".repeat(65)),
            "tool_config.tools[0].tool_spec.name",
        ),
        (
            with_spec(&|s| s.input_schema = "[]".into()),
            "tool_config.tools[0].tool_spec.input_schema",
        ),
        (
            tools(&|c| {
                c.tool_choice = Some(pb::ToolChoice {
                    choice: Some(Choice::Tool(pb::SpecificToolChoice {
                        name: "lookup".into(),
                    })),
                })
            }),
            "tool_config.tool_choice.tool.name",
        ),
        (tools(&|c| c.tools.clear()), "tool_config.tools"),
    ];
    for (req, field) in cases {
        for streamed in [false, true] {
            let status = if streamed {
                client.converse_stream(req.clone()).await.err()
            } else {
                client.converse(req.clone()).await.err()
            };
            let status = status.unwrap_or_else(|| panic!("{field} was accepted"));
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{field}: {}",
                status.message()
            );
            assert!(
                status.message().contains(&format!("invalid {field}: ")),
                "{field}: {}",
                status.message()
            );
        }
    }
    let received: u64 = cluster
        .regions
        .values()
        .flat_map(|r| r.sims.iter())
        .map(|s| s.state.received.load(Ordering::Relaxed))
        .sum();
    assert_eq!(received, 0);
}

#[tokio::test]
async fn an_image_is_not_counted_as_input_tokens_by_its_bytes() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    // 60,000 tokens a minute for the profile in us-east: a 1 MB image read
    // as text (about 350,000 tokens of base64) would be refused outright.
    cluster
        .cp
        .admin()
        .await
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    profile: US.into(),
                    source_region: "us-east".into(),
                    ..Default::default()
                }),
                tokens_per_minute: Some(60_000),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    cluster
        .region("us-east")
        .agent
        .wait_for("the quota", |c| !c.quotas.is_empty())
        .await;
    let mut client = client(&cluster, "us-east").await;
    let req = pb::ConverseRequest {
        model_id: US.into(),
        messages: vec![user(vec![
            text("what is this?"),
            pb::ContentBlock {
                block: Some(Block::Image(pb::ImageBlock {
                    format: pb::ImageFormat::Png.into(),
                    bytes: vec![7u8; 1_000_000].into(),
                })),
            },
        ])],
        inference_config: Some(pb::InferenceConfig {
            max_tokens: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = client.converse(req).await.expect("admitted").into_inner();
    assert_eq!(resp.inference_region, "us-east");
    let (_, body) = take_last(&cluster, "us-east").unwrap();
    let url = body["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(url.starts_with("data:image/png;base64,") && url.len() > 1_300_000);
}
