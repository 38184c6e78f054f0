//! The error of building or fitting a model: a setting out of range is refused by name,
//! never replaced by its default behind the caller's back.

/// Why a model could not be built or fitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A setting is out of range.
    #[error("invalid {section} config: {reason}")]
    InvalidConfig {
        /// Which settings: `model` ([`crate::MfConfig`]) or `als` ([`crate::AlsConfig`]).
        section: &'static str,
        /// What the settings' `validate` found, naming the field.
        reason: String,
    },
    /// A fit's numbers went wrong (a matrix that should be positive definite was not).
    #[error("numerical failure in the {fit} fit: {reason}")]
    Numerical {
        /// Which fit.
        fit: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl ModelError {
    /// Builds an [`ModelError::InvalidConfig`] of `section` from a `validate` message.
    pub fn invalid_config(section: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            section,
            reason: reason.into(),
        }
    }
}
