//! The one error type of the Reflex libraries and its classification into [`ErrorCode`].

use std::fmt;

/// Result alias used across the Reflex crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Reflex's domain, engine and backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client sent something malformed; `field` names the offending field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field path, e.g. `events[3].user_id`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named entity does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A request is larger than the configured limits allow.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A backend could not be reached or refused the operation; retrying may succeed.
    #[error("unavailable: {context}: {source}")]
    Unavailable {
        /// What Reflex was doing.
        context: String,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// Stored data could not be decoded or a backend misbehaved in a way retrying will not fix.
    #[error("storage: {context}: {source}")]
    Storage {
        /// What Reflex was doing.
        context: String,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// An invariant of Reflex itself was broken.
    #[error("internal: {0}")]
    Internal(String),
}

/// A boxed error from a backend or a library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    /// Builds an [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Storage`] with context.
    pub fn storage(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Storage {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Builds an [`Error::Unavailable`] with context.
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The transport-neutral class of this error; the gRPC layer maps it in one place.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Self::Unavailable { .. } => ErrorCode::Unavailable,
            Self::Storage { .. } | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Transport-neutral error classes, one per client-visible reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Fix the request.
    InvalidArgument,
    /// The entity does not exist.
    NotFound,
    /// Send less.
    ResourceExhausted,
    /// Retry later.
    Unavailable,
    /// A bug or corrupt state; retrying will not help.
    Internal,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        };
        f.write_str(name)
    }
}
