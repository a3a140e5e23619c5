//! Keeps the last applied resource set on disk (`applied-set.pb`), so that
//! an agent restarted while no control plane answers boots with the
//! configuration it had, and tells the control plane what it holds. The
//! full snapshot that agents of older builds kept (`last-good-config.pb`)
//! is not read any more: an agent that finds only that boots with no
//! config, as a new one does, until a control plane answers.

use std::path::{Path, PathBuf};

use prost::Message;
use spillway_proto::pb;

const FILE: &str = "applied-set.pb";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Writes the set atomically: a crash leaves the old file or the new one,
/// never half of one.
pub async fn save(state_dir: &Path, set: &pb::AppliedSet) -> std::io::Result<()> {
    tokio::fs::create_dir_all(state_dir).await?;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let bytes = set.encode_to_vec();
    let file = tmp.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })
    .await
    .map_err(std::io::Error::other)??;
    tokio::fs::rename(&tmp, path(state_dir)).await
}

/// The persisted set, if there is a readable one.
pub async fn load(state_dir: &Path) -> Option<pb::AppliedSet> {
    let bytes = match tokio::fs::read(path(state_dir)).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the persisted resource set");
            return None;
        }
    };
    match pb::AppliedSet::decode(bytes.as_slice()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "the persisted resource set is unreadable; ignoring it");
            None
        }
    }
}
