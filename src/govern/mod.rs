//! Governance: who is calling, and what they may call. No HTTP in here: the relay asks.

pub mod assertion;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod policy;

pub use identity::{Identity, Keyring, SecretHash};
pub use policy::{Decision, Policy};
