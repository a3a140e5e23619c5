//! Tenants and their API keys: who may call which profiles, and where their
//! requests may go.
//!
//! An API key reads `spw_<id>_<secret>`. Only the SHA-256 of the whole key
//! is stored and sent to agents; an agent finds the key by its id and
//! compares the hashes in constant time. The secret is 256 random bits, so
//! a plain hash is enough (no salt or stretching: nothing to guess).

use serde::{Deserialize, Serialize};

use crate::model::ModelError;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where a tenant's requests may be served. A region is allowed when the
/// allow lists are both empty or one of them names it (or its geography),
/// and neither deny list does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_geographies: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_geographies: Vec<String>,
}

impl RegionPolicy {
    /// `Ok` when `region` (in `geography`) may serve; else which rule
    /// denies it.
    pub fn check(&self, region: &str, geography: &str) -> Result<(), String> {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == v);
        if has(&self.deny_regions, region) {
            return Err(format!("deny_regions names `{region}`"));
        }
        if has(&self.deny_geographies, geography) {
            return Err(format!("deny_geographies names `{geography}`"));
        }
        let open = self.allow_regions.is_empty() && self.allow_geographies.is_empty();
        if open || has(&self.allow_regions, region) || has(&self.allow_geographies, geography) {
            return Ok(());
        }
        Err(format!(
            "`{region}` is in neither allow_regions nor allow_geographies"
        ))
    }

    pub fn is_open(&self) -> bool {
        *self == RegionPolicy::default()
    }
}

/// An organization or team that calls with API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Profiles it may call: exact ids, or patterns where `*` stands for
    /// any run of characters (`us.*`, `*`).
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "RegionPolicy::is_open")]
    pub policy: RegionPolicy,
    #[serde(skip)]
    pub revision: i64,
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters (also none).
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

fn check_label(field: &str, value: &str) -> Result<(), ModelError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.as_bytes()[0].is_ascii_lowercase()
        && !value.ends_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{value}` must be 1 to 63 lower-case letters, digits or '-', starting with a letter"
            ),
        ))
    }
}

impl Tenant {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_label("tenant.name", &self.name)?;
        if self.profiles.is_empty() {
            return Err(invalid(
                "tenant.profiles",
                "name at least one profile or pattern (`*` for every profile)",
            ));
        }
        for (i, p) in self.profiles.iter().enumerate() {
            let ok = !p.is_empty()
                && p.len() <= 128
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-:*".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("tenant.profiles[{i}]"),
                    format!(
                        "`{p}` is not a profile id or a pattern (letters, digits, . _ - : and *)"
                    ),
                ));
            }
        }
        let lists = [
            ("allow_regions", &self.policy.allow_regions),
            ("deny_regions", &self.policy.deny_regions),
            ("allow_geographies", &self.policy.allow_geographies),
            ("deny_geographies", &self.policy.deny_geographies),
        ];
        for (name, list) in lists {
            for (i, v) in list.iter().enumerate() {
                check_label(&format!("tenant.policy.{name}[{i}]"), v)?;
            }
        }
        for r in &self.policy.allow_regions {
            if self.policy.deny_regions.contains(r) {
                return Err(invalid(
                    "tenant.policy.deny_regions",
                    format!("`{r}` is both allowed and denied"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the tenant may call `profile`.
    pub fn may_call(&self, profile: &str) -> bool {
        self.profiles.iter().any(|p| glob(p, profile))
    }
}

/// An API key as stored: its id, its tenant, and the hash of the whole key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    /// SHA-256 of the whole key, lower-case hex.
    pub hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub created_at_unix: i64,
    #[serde(skip)]
    pub revision: i64,
}

pub const KEY_PREFIX: &str = "spw_";

impl ApiKey {
    pub fn validate(&self) -> Result<(), ModelError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 32
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !id_ok {
            return Err(invalid(
                "key.id",
                format!("`{}` must be 1 to 32 lower-case letters or digits", self.id),
            ));
        }
        check_label("key.tenant", &self.tenant)?;
        if self.hash.len() != 64 || !self.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("key.hash", "must be a SHA-256 in hex (64 digits)"));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a whole key, in hex, as stored.
pub fn key_hash(key: &str) -> String {
    hex(&key_digest(key))
}

/// The SHA-256 of a whole key.
pub fn key_digest(key: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A stored hash (hex) as bytes; `None` if it is not 64 hex digits.
pub fn hash_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The id part of a presented key, if it has the key's shape.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// A new key for `tenant`: (the stored record, the key to hand out once).
pub fn new_key(tenant: &str, description: &str, now_unix: i64) -> (ApiKey, String) {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill(&mut id).expect("the system's random source works");
    rng.fill(&mut secret)
        .expect("the system's random source works");
    let (id, secret) = (hex(&id), hex(&secret));
    let key = format!("{KEY_PREFIX}{id}_{secret}");
    let record = ApiKey {
        id,
        tenant: tenant.to_string(),
        hash: key_hash(&key),
        description: description.to_string(),
        created_at_unix: now_unix,
        revision: 0,
    };
    (record, key)
}

/// Whether two equal-length hashes are equal, in time that does not depend
/// on where they differ.
pub fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("*", "anything"));
        assert!(glob("us.*", "us.llama-3.1-8b"));
        assert!(!glob("us.*", "eu.llama-3.1-8b"));
        assert!(glob("*.llama-*", "global.llama-3.1-8b"));
        assert!(glob("a*b*c", "abc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("ab*ab", "ab"), "prefix and suffix may not overlap");
    }

    #[test]
    fn policies_deny_before_they_allow() {
        let p = RegionPolicy {
            allow_geographies: vec!["us".into()],
            deny_regions: vec!["us-west".into()],
            ..RegionPolicy::default()
        };
        assert!(p.check("us-east", "us").is_ok());
        assert!(
            p.check("us-west", "us")
                .unwrap_err()
                .contains("deny_regions")
        );
        assert!(p.check("eu-west", "eu").unwrap_err().contains("allow"));
        assert!(RegionPolicy::default().check("anywhere", "x").is_ok());
    }

    #[test]
    fn keys_hash_and_parse() {
        let (record, key) = new_key("acme", "ci", 0);
        assert!(key.starts_with("spw_"));
        assert_eq!(key_id(&key), Some(record.id.as_str()));
        assert_eq!(key_hash(&key), record.hash);
        record.validate().unwrap();
        assert!(!key.contains(&record.hash), "the key is not its hash");
        let (other, _) = new_key("acme", "", 0);
        assert_ne!(other.id, record.id);
        assert_eq!(key_id("sk-123"), None);
        assert_eq!(key_id("spw__x"), None);
        assert!(same_hash(b"abc", b"abc") && !same_hash(b"abc", b"abd"));
    }

    #[test]
    fn tenants_name_the_wrong_field() {
        let t = Tenant {
            name: "acme".into(),
            description: String::new(),
            profiles: vec!["us.*".into()],
            policy: RegionPolicy::default(),
            revision: 0,
        };
        t.validate().unwrap();
        let field = |t: Tenant| match t.validate() {
            Err(ModelError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(Tenant {
                name: "Acme".into(),
                ..t.clone()
            }),
            "tenant.name"
        );
        assert_eq!(
            field(Tenant {
                profiles: vec![],
                ..t.clone()
            }),
            "tenant.profiles"
        );
        assert_eq!(
            field(Tenant {
                profiles: vec!["us/x".into()],
                ..t.clone()
            }),
            "tenant.profiles[0]"
        );
        let mut both = t.clone();
        both.policy.allow_regions = vec!["us-east".into()];
        both.policy.deny_regions = vec!["us-east".into()];
        assert_eq!(field(both), "tenant.policy.deny_regions");
    }
}
