//! The readiness policy behind `/ready`: a router is ready when every expert of every MoE layer
//! has at least one replica on a node whose stream is up, not when every node is up (one dead
//! node of a thousand must not take every router out of its Service while the replicas of its
//! experts serve). When not ready, the answer says what is missing: the experts without a live
//! replica (counted, the first few named) and the nodes that are down.

use std::fmt::Write;

use crate::RemoteExperts;
use crate::dispatch::Routes;

/// Experts named in a not-ready answer (the rest are counted).
const NAMED: usize = 8;

/// Ready, or what is missing.
pub fn check_ready(experts: &RemoteExperts) -> Result<(), String> {
    check_routes(&experts.routes())
}

/// [`check_ready`] on a routes snapshot.
pub fn check_routes(routes: &Routes) -> Result<(), String> {
    let Some(p) = &routes.placement else {
        return Err("no placement yet".into());
    };
    let up: Vec<bool> = routes.clients.iter().map(|c| c.is_up()).collect();
    let missing: Vec<(usize, usize)> = p
        .experts()
        .filter(|(_, _, replicas)| {
            !replicas
                .iter()
                .any(|&n| up.get(n).copied().unwrap_or(false))
        })
        .map(|(l, e, _)| (l, e))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut why = format!("{} experts have no live replica:", missing.len());
    for (l, e) in missing.iter().take(NAMED) {
        let _ = write!(why, " {l}:{e}");
    }
    if missing.len() > NAMED {
        why.push_str(" ...");
    }
    let down = routes.down();
    if !down.is_empty() {
        let _ = write!(why, "; expert nodes down: {}", down.join(", "));
    }
    Err(why)
}
