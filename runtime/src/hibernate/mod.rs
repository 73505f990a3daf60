//! Hibernation: idle containers frozen, then checkpointed into the store with their memory
//! freed, and woken by the next connection or exec (see the design in the module docs, to
//! come with the driver).

pub mod driver;
pub mod net;
pub mod policy;
pub mod tree;
