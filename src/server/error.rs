//! How service errors become gRPC statuses: one exhaustive mapping, no catch-all arm.

use tonic::{Code, Status};

use crate::encoder::{EncoderError, PreprocessError};
use crate::index::filter::FilterError;
use crate::index::{IndexError, WriterError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the index is empty: ingest a catalogue first (vitrine ingest)")]
    NoIndex,
    #[error("cannot decode the image")]
    BadImage(#[from] PreprocessError),
    #[error("invalid filter")]
    Filter(#[from] FilterError),
    #[error("encoder failed")]
    Encoder(#[from] EncoderError),
    #[error("index error")]
    Index(#[from] IndexError),
    #[error("write failed")]
    Writer(#[from] WriterError),
    #[error("internal error: {0}")]
    Internal(String),
    /// Shed by admission control: the client should back off and retry.
    #[error("{0}")]
    Overloaded(String),
}

impl ServiceError {
    /// Whether the caller caused it (a bad request, an unknown SKU) or the server shed it: such
    /// an answer says nothing about the model version that gave it, so a canary's guardrails
    /// leave it out.
    pub fn is_callers_or_load(&self) -> bool {
        matches!(
            self,
            ServiceError::InvalidArgument(_)
                | ServiceError::BadImage(_)
                | ServiceError::Filter(_)
                | ServiceError::NotFound(_)
                | ServiceError::Overloaded(_)
        )
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = match &e {
            ServiceError::InvalidArgument(_) | ServiceError::BadImage(_) | ServiceError::Filter(_) => {
                Code::InvalidArgument
            }
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::NoIndex | ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Encoder(_) | ServiceError::Internal(_) => Code::Internal,
            ServiceError::Index(ie) => match ie {
                IndexError::UnknownModel(_) => Code::NotFound,
                IndexError::QueryDim { .. } | IndexError::BadQuery(_) => Code::InvalidArgument,
                IndexError::Segment(_) | IndexError::DamagedSku { .. } => Code::Internal,
            },
            ServiceError::Writer(we) => match we {
                WriterError::Poisoned { .. } | WriterError::Closed => Code::Unavailable,
                WriterError::UnknownVersion(_) => Code::NotFound,
                WriterError::VersionConflict { .. } | WriterError::DropServing(_) => Code::FailedPrecondition,
                WriterError::Store(_)
                | WriterError::Manifest(_)
                | WriterError::Wal(_)
                | WriterError::Records(_)
                | WriterError::Deletes(_)
                | WriterError::Segment { .. }
                | WriterError::SegmentShape { .. }
                | WriterError::Replay { .. } => Code::Internal,
            },
        };
        Status::new(code, crate::report::chain(&e))
    }
}
