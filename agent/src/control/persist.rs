//! Keeps the last applied update on disk, so that an agent restarted while
//! no control plane answers boots with the configuration it had.

use std::path::{Path, PathBuf};

use prost::Message;
use spillway_proto::pb;

const FILE: &str = "last-good-config.pb";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Writes the update atomically: a crash leaves the old file or the new
/// one, never half of one.
pub async fn save(state_dir: &Path, update: &pb::ConfigUpdate) -> std::io::Result<()> {
    tokio::fs::create_dir_all(state_dir).await?;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let bytes = update.encode_to_vec();
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

/// The persisted update, if there is a readable one.
pub async fn load(state_dir: &Path) -> Option<pb::ConfigUpdate> {
    let bytes = match tokio::fs::read(path(state_dir)).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the persisted config");
            return None;
        }
    };
    match pb::ConfigUpdate::decode(bytes.as_slice()) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = %e, "the persisted config is unreadable; ignoring it");
            None
        }
    }
}
