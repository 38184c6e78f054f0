//! Test doubles, behind the `testing` feature (and always in this crate's own tests):
//! an in-memory backend and a minimal model, so the engine can be tested where it lives
//! without `reflex-storage` or `reflex-models`.
//!
//! Layout:
//! - [`MemoryStore`] (`store.rs`): the event log with its dedupe window, profiles with
//!   checkpoints, the catalog, model versions and leases, all behind one mutex, with the
//!   semantics of the embedded backend; [`MemoryStore::reopen`] plays a restart after a
//!   crash
//! - [`CountingModel`] and [`ScanRetriever`] (`model.rs`): an [`OnlineModel`] whose
//!   item "vector" is the summed weight learnt on the item, and an exact scan over it
//! - [`RecallSignals`] (`signals.rs`): a `SignalModel` proposing what each user bought
//!
//! None of this is for production: simplicity over speed.
//!
//! [`OnlineModel`]: crate::OnlineModel

mod model;
mod signals;
mod store;

pub use self::model::{CountingModel, ScanRetriever};
pub use self::signals::RecallSignals;
pub use self::store::MemoryStore;
