//! Helpers shared by the integration tests of `reflex-models`.

pub use reflex_models::eval::data_dir;
