//! Driving a shim binary directly (being written).
