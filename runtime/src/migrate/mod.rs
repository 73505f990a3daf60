//! Migration: a deleted pod's container state handed on to its replacement, on any node.
//!
//! Only the policy that says who is whose replacement is here so far ([`owner`]); the
//! claim that lets exactly one replacement restore a checkpoint is the `claims` crate.
//! The checkpoint on `StopContainer`, the restore at `CreateContainer` and the store's
//! transport to an OCI registry are still to come.

pub mod owner;
