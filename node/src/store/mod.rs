//! The durable log (being written).
