//! Who is calling: the API key a call presents is found by its id among
//! the hashes the snapshot brought, and its hash compared in constant time;
//! no call to the control plane is made. Then whether that tenant may call
//! the profile it named.

use spillway_core::tenant::{key_digest, key_id, same_hash};

use crate::control::snapshot::AgentConfig;
use crate::error::CallError;

/// The caller of one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caller {
    /// `None` for an anonymous call (allowed only with `--allow-anonymous`).
    pub tenant: Option<String>,
    pub key_id: Option<String>,
}

/// The key in an `Authorization: Bearer <key>` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// What a call presents as its key, from its `authorization` header or
/// metadata: `None` only when there is none; a value that is not a bearer
/// key is presented as it is (and refused), never taken as no key.
pub fn presented(value: Option<Result<&str, ()>>) -> Option<&str> {
    match value? {
        Ok(v) => Some(bearer(v).unwrap_or(v)),
        Err(()) => Some(""),
    }
}

/// Finds the tenant of a presented key. Every refusal says the same about
/// the key, so that nothing tells a guessed id from a guessed secret.
pub fn authenticate(
    cfg: &AgentConfig,
    presented: Option<&str>,
    allow_anonymous: bool,
) -> Result<Caller, CallError> {
    let Some(key) = presented else {
        if allow_anonymous {
            return Ok(Caller::default());
        }
        return Err(CallError::Unauthenticated(
            "no API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`; spillctl keys create makes one)"
                .into(),
        ));
    };
    let invalid = || CallError::Unauthenticated("invalid API key".into());
    let id = key_id(key).ok_or_else(invalid)?;
    let (stored, digest) = cfg
        .keys
        .get(id)
        .zip(cfg.digests.get(id))
        .ok_or_else(invalid)?;
    if !same_hash(&key_digest(key), digest) {
        return Err(invalid());
    }
    Ok(Caller {
        tenant: Some(stored.tenant.clone()),
        key_id: Some(id.to_string()),
    })
}

/// Whether the caller may call `profile` (the id it named).
pub fn authorize(cfg: &AgentConfig, caller: &Caller, profile: &str) -> Result<(), CallError> {
    let Some(name) = &caller.tenant else {
        return Ok(());
    };
    let tenant = cfg
        .tenants
        .get(name)
        .ok_or_else(|| CallError::Unauthenticated("invalid API key".into()))?;
    if tenant.may_call(profile) {
        Ok(())
    } else {
        Err(CallError::PermissionDenied(format!(
            "tenant `{name}` may not call inference profile `{profile}` (its permissions: {})",
            tenant.profiles.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_parsed() {
        assert_eq!(bearer("Bearer spw_a_b"), Some("spw_a_b"));
        assert_eq!(bearer("bearer  spw_a_b "), Some("spw_a_b"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("spw_a_b"), None);
        assert_eq!(presented(None), None);
        assert_eq!(presented(Some(Ok("Token spw_a_b"))), Some("Token spw_a_b"));
        assert_eq!(presented(Some(Err(()))), Some(""));
    }

    #[test]
    fn a_malformed_key_is_refused_even_when_anonymous_calls_are_allowed() {
        let cfg = AgentConfig {
            version: 1,
            region: "r".into(),
            regions: Default::default(),
            relays: Default::default(),
            profiles: Default::default(),
            routes: Default::default(),
            profiles_elsewhere: Default::default(),
            quotas: Vec::new(),
            tenants: Default::default(),
            keys: Default::default(),
            digests: Default::default(),
        };
        assert_eq!(authenticate(&cfg, None, true).unwrap(), Caller::default());
        for bad in ["", "Token spw_a_b", "spw_a_b"] {
            assert!(matches!(
                authenticate(&cfg, Some(bad), true),
                Err(CallError::Unauthenticated(_))
            ));
        }
    }
}
