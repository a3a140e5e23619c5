//! The HTTP door driven by a real OpenAI client library (async-openai),
//! pointed at the agent with `api_base`, unchanged otherwise.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use futures_util::StreamExt;
use spillway_tests::cluster::{Cluster, ClusterSpec, GLOBAL, US};
use spillway_tests::sim::token;

/// A client with a tenant's API key, as a user would configure it.
async fn client(cluster: &Cluster, region: &str) -> Client<OpenAIConfig> {
    // The client is built with rustls; the calls here are plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cluster
        .cp
        .create_tenant("sdk", &["*"], Default::default())
        .await;
    let (id, secret) = cluster.cp.create_key("sdk").await;
    let agent = &cluster.region(region).agent;
    agent
        .wait_for("the key", |c| c.keys.contains_key(&id))
        .await;
    let base = format!("{}/v1", agent.base_url());
    Client::with_config(OpenAIConfig::new().with_api_base(base).with_api_key(secret))
}

#[tokio::test]
async fn the_openai_client_works_unchanged() {
    let cluster = Cluster::start(ClusterSpec {
        anonymous: false,
        ..ClusterSpec::default()
    })
    .await;
    let openai = client(&cluster, "us-east").await;

    let models = openai.models().list().await.expect("listing models");
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [GLOBAL, US]);

    let request = CreateChatCompletionRequestArgs::default()
        .model(US)
        .max_tokens(4u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hello")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let answer = openai
        .chat()
        .create(request.clone())
        .await
        .expect("a completion");
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some((0..4).map(token).collect::<String>().as_str())
    );
    assert_eq!(answer.usage.expect("usage").completion_tokens, 4);

    let mut stream = openai
        .chat()
        .create_stream(request)
        .await
        .expect("a stream");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("a chunk");
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(text, (0..4).map(token).collect::<String>());

    // An unknown profile comes back as an API error the client understands.
    let bad = CreateChatCompletionRequestArgs::default()
        .model("nope")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    match openai.chat().create(bad).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code, 404, "{e:?}");
            assert_eq!(
                e.api_error.code.as_deref(),
                Some("model_not_found"),
                "{e:?}"
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_openai_client_calls_completions_embeddings_and_responses() {
    use async_openai::types::completions::CreateCompletionRequestArgs;
    use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
    use async_openai::types::responses::{CreateResponseArgs, ResponseStreamEvent};

    let cluster = Cluster::start(ClusterSpec {
        anonymous: false,
        ..ClusterSpec::default()
    })
    .await;
    let openai = client(&cluster, "us-east").await;
    let four: String = (0..4).map(token).collect();

    // Legacy completions, unary and streamed.
    let request = CreateCompletionRequestArgs::default()
        .model(US)
        .prompt("hello")
        .max_tokens(4u32)
        .build()
        .unwrap();
    let answer = openai
        .completions()
        .create(request.clone())
        .await
        .expect("a completion");
    assert_eq!(answer.choices[0].text, four);
    let mut stream = openai
        .completions()
        .create_stream(request)
        .await
        .expect("a stream");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in chunk.expect("a chunk").choices {
            text.push_str(&choice.text);
        }
    }
    assert_eq!(text, four);

    // Embeddings: one vector per input, usage counting input only.
    let answer = openai
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model(US)
                .input(["hello", "world"])
                .build()
                .unwrap(),
        )
        .await
        .expect("embeddings");
    assert_eq!(answer.data.len(), 2);
    assert!(answer.usage.prompt_tokens > 0);

    // Responses, stateless: unary and streamed events.
    let request = CreateResponseArgs::default()
        .model(US)
        .input("hello")
        .max_output_tokens(4u32)
        .store(false)
        .build()
        .unwrap();
    let answer = openai
        .responses()
        .create(request.clone())
        .await
        .expect("a response");
    assert_eq!(answer.output_text().as_deref(), Some(four.as_str()));
    let mut stream = openai
        .responses()
        .create_stream(request)
        .await
        .expect("a stream");
    let (mut text, mut completed) = (String::new(), false);
    while let Some(event) = stream.next().await {
        match event.expect("an event") {
            ResponseStreamEvent::ResponseOutputTextDelta(d) => text.push_str(&d.delta),
            ResponseStreamEvent::ResponseCompleted(_) => completed = true,
            _ => {}
        }
    }
    assert_eq!(text, four);
    assert!(completed);

    // A stored response is refused, as an API error the client reads.
    let stored = CreateResponseArgs::default()
        .model(US)
        .input("hello")
        .store(true)
        .build()
        .unwrap();
    match openai.responses().create(stored).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code, 400, "{e:?}");
            assert_eq!(e.api_error.param.as_deref(), Some("store"), "{e:?}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}
