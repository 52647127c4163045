//! `moe-meta`: what routers, expert nodes and coordinators share. For now: expert specs
//! (`1-3:0-127`), the placement table (layer, expert) → replicas on nodes with its JSON file
//! form, and tracing setup with W3C trace-context propagation. The metadata-store trait and the etcd records join it with the coordinator.

pub mod memory;
pub mod placement;
pub mod records;
pub mod spec;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod tls;

pub use placement::{NodeEntry, Placement, PlacementError, balancedness};
pub use spec::ExpertSpec;

/// An error and every cause under it, each once ("transport error: connection refused";
/// transport errors alone say only "transport error").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        cur = s.source();
    }
    text
}
