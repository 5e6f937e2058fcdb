//! What the app simulation and the chaos soak share: the simulated app's
//! pages, their queries and version counters, and its writes.

pub mod workload;
