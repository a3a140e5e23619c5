//! The one place where control-plane errors become gRPC statuses.

use spillway_core::model::ModelError;
use tonic::Status;

use crate::catalog_store::WriteError;
use crate::store::StoreError;

pub fn model_status(e: ModelError) -> Status {
    let msg = e.to_string();
    match e {
        ModelError::Invalid { .. } => Status::invalid_argument(msg),
        ModelError::NotFound { .. } => Status::not_found(msg),
        ModelError::AlreadyExists { .. } => Status::already_exists(msg),
        ModelError::Conflict { .. } => Status::aborted(msg),
        ModelError::InUse(_) => Status::failed_precondition(msg),
    }
}

pub fn store_status(e: StoreError) -> Status {
    Status::unavailable(format!("store unavailable: {e}"))
}

impl From<WriteError> for Status {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Model(m) => model_status(m),
            // A write that timed out may still have been committed: say so
            // rather than suggest that nothing happened.
            WriteError::Store(StoreError::Timeout(after)) => Status::unknown(format!(
                "the store did not confirm the write within {after:?}; it may or may not have been applied, read the object back"
            )),
            WriteError::Store(s) => store_status(s),
            WriteError::Corrupt(msg) => Status::data_loss(msg),
            WriteError::Contention => Status::aborted(e.to_string()),
            WriteError::Behind { .. } => Status::unavailable(e.to_string()),
        }
    }
}

/// A required message field that the request left out.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("invalid {field}: required"))
}
