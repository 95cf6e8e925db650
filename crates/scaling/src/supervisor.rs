//! The single-machine autoscaler: see `Supervisor`.
