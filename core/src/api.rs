//! The inference APIs a model server can serve and a client can call. A
//! model server says which it serves (`apis=` on `--model-server`); a call
//! is routed only to servers, and regions, that serve its API.

use std::fmt;
use std::str::FromStr;

/// One inference API, by the path engines serve it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Api {
    /// OpenAI chat completions: `POST /v1/chat/completions`.
    Chat,
    /// OpenAI (legacy) completions: `POST /v1/completions`.
    Completions,
    /// OpenAI embeddings: `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI Responses: `POST /v1/responses`.
    Responses,
    /// Anthropic Messages: `POST /v1/messages`.
    Messages,
}

impl Api {
    pub const ALL: [Api; 5] = [
        Api::Chat,
        Api::Completions,
        Api::Embeddings,
        Api::Responses,
        Api::Messages,
    ];

    /// What a model server serves when it does not say: chat and
    /// completions, which every OpenAI-compatible engine serves.
    pub const DEFAULT: [Api; 2] = [Api::Chat, Api::Completions];

    /// The name used in flags, the relay and the snapshot.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }

    /// The path engines serve it on.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
            Api::Embeddings => "/v1/embeddings",
            Api::Responses => "/v1/responses",
            Api::Messages => "/v1/messages",
        }
    }

    /// `gen_ai.operation.name` in OpenTelemetry's GenAI conventions.
    pub fn operation_name(self) -> &'static str {
        match self {
            Api::Chat | Api::Responses | Api::Messages => "chat",
            Api::Completions => "text_completion",
            Api::Embeddings => "embeddings",
        }
    }

    /// Its position in [`Api::ALL`], for tables indexed by API.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The API a relayed call names; an empty name is chat (agents of
    /// older builds relay chat completions only).
    pub fn from_wire(name: &str) -> Result<Api, UnknownApi> {
        if name.is_empty() {
            Ok(Api::Chat)
        } else {
            name.parse()
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown API `{0}`: one of chat, completions, embeddings, responses, messages")]
pub struct UnknownApi(pub String);

impl FromStr for Api {
    type Err = UnknownApi;

    fn from_str(s: &str) -> Result<Api, UnknownApi> {
        Api::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownApi(s.to_string()))
    }
}

/// A set of APIs (a model server's, an agent's, a region's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ApiSet(u8);

impl ApiSet {
    pub fn of(apis: impl IntoIterator<Item = Api>) -> ApiSet {
        ApiSet(apis.into_iter().fold(0, |bits, a| bits | 1 << a.index()))
    }

    pub fn contains(self, api: Api) -> bool {
        self.0 & (1 << api.index()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: ApiSet) -> ApiSet {
        ApiSet(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Api> {
        Api::ALL.into_iter().filter(move |a| self.contains(*a))
    }

    /// The set an agent announced by name; names this build does not know
    /// are left out, and an empty list (an older agent) is the default.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> ApiSet {
        let mut any = false;
        let set = ApiSet::of(names.into_iter().filter_map(|n| {
            any = true;
            n.parse().ok()
        }));
        if any { set } else { ApiSet::of(Api::DEFAULT) }
    }

    pub fn names(self) -> Vec<String> {
        self.iter().map(|a| a.as_str().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_sets() {
        for a in Api::ALL {
            assert_eq!(a.as_str().parse::<Api>().unwrap(), a);
            assert!(a.path().starts_with("/v1/"));
        }
        assert_eq!(
            "bogus".parse::<Api>().unwrap_err().to_string(),
            "unknown API `bogus`: one of chat, completions, embeddings, responses, messages"
        );
        assert_eq!(Api::from_wire("").unwrap(), Api::Chat);
        let set = ApiSet::of([Api::Embeddings, Api::Messages]);
        assert!(set.contains(Api::Messages) && !set.contains(Api::Chat));
        assert_eq!(set.names(), ["embeddings", "messages"]);
        assert_eq!(ApiSet::from_names([]), ApiSet::of(Api::DEFAULT));
        assert_eq!(
            ApiSet::from_names(["embeddings", "later-api"]),
            ApiSet::of([Api::Embeddings])
        );
    }
}
