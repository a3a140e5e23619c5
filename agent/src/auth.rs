//! Who is calling: the API key a call presents is found by its id among
//! the hashes the snapshot brought, and its hash compared in constant time;
//! no call to the control plane is made. Then whether that tenant may call
//! the profile it named.

use spillway_proto::tenant::{key_hash, key_id, same_hash};

use crate::error::CallError;
use crate::snapshot::AgentConfig;

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

/// Finds the tenant of a presented key. Every refusal says the same about
/// the key, so that nothing tells a guessed id from a guessed secret.
pub fn authenticate(
    cfg: &AgentConfig,
    presented: Option<&str>,
    allow_anonymous: bool,
) -> Result<Caller, CallError> {
    let Some(key) = presented.filter(|k| !k.is_empty()) else {
        if allow_anonymous {
            return Ok(Caller::default());
        }
        return Err(CallError::Unauthenticated(
            "no API key: send `Authorization: Bearer <key>` (spillctl keys create makes one)"
                .into(),
        ));
    };
    let invalid = || CallError::Unauthenticated("invalid API key".into());
    let id = key_id(key).ok_or_else(invalid)?;
    let stored = cfg.keys.get(id).ok_or_else(invalid)?;
    if !same_hash(key_hash(key).as_bytes(), stored.hash.as_bytes()) {
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
    }
}
