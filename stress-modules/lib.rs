//! A temporary crate that builds and tests three modules of `pagewire-stress`
//! (`stress/src/{link,bisect,chart}.rs`) on their own, so they can move into the
//! stress crate unchanged.

#[path = "../stress/src/bisect.rs"]
pub mod bisect;
#[path = "../stress/src/chart.rs"]
pub mod chart;
#[path = "../stress/src/link.rs"]
pub mod link;
