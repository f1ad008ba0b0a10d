//! The pure domain: identifiers, vaults, keys, principals, changes and errors. No async, no I/O,
//! no clock: `now` is an argument (ARCHITECTURE.md invariant 1).

pub mod change;
pub mod error;
pub mod ids;
pub mod key;
pub mod principal;
pub mod role;
pub mod rotation;
pub mod server;
pub mod time;
pub mod vault;

pub use change::Change;
pub use error::{BrokerError, CallerDescription, ErrorClass};
pub use key::{
    Algorithm, CryptoOp, Curve, Deletion, Key, KeyAttributes, KeyOp, KeyType, KeyVersion, SignOp,
    SignatureAlgorithm,
};
pub use principal::{Caller, Principal, PrincipalKind};
pub use role::{Role, RoleAssignment};
pub use rotation::{KeyRotationPolicy, RotationPolicyError};
pub use vault::{KeyPermission, NetworkAcls, Vault};
