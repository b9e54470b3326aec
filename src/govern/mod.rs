//! Governance: who is calling, what they may call, and the record of what they called. No HTTP in here: the relay asks.

pub mod assertion;
pub mod audit;
pub mod condition;
pub mod identity;
pub mod jwks;
pub mod jwt;
pub mod limits;
pub mod policy;

pub use identity::{Identity, Keyring, SecretHash};
pub use policy::{Decision, Policy};
