//! Pure authorization decisions (docs/RULES.md R2): the data plane (access policies, RBAC) and the
//! control plane (ARM roles). No I/O; callers pass in the state they decide on.

pub mod control;
pub mod data;
pub mod network;
