//! Whether a node hosts what the placement gives it, re-checked on every connection. A node
//! restarted with fewer experts (another `--experts`, a failed load) comes back on the same
//! address; without a check, every request for an expert it lost reaches it, is answered with
//! an in-band error and fails over (2,443 failovers for 32 requests in the fault sweep). Here
//! the client asks the node's `Info` each time its stream comes up and compares the hosted set
//! with the experts the current placement assigns it; a node that lacks some is *mismatched*:
//! planning skips it while another replica is usable (like a quarantined node), and the check
//! is repeated every [`RECHECK`] until the node hosts them (it may still be loading).
//!
//! The required set is replaced with each placement. A coordinated placement reaches routers
//! only after its nodes acknowledged loading it, so a change of placement alone does not trigger
//! a check; a reconnect (a restarted node) does.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_meta::placement::Placement;
use moe_proto::pb::InfoResponse;

/// How often a mismatched node is asked again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The (layer, expert) pairs a node must host.
pub type Required = Arc<BTreeSet<(u32, u32)>>;

/// The pairs `placement` gives each of its `nodes` node indices (one pass over the table).
pub fn required(placement: &Placement, nodes: usize) -> Vec<Required> {
    let mut sets = vec![BTreeSet::new(); nodes];
    for (l, e, replicas) in placement.experts() {
        for &n in replicas {
            if let Some(s) = sets.get_mut(n) {
                s.insert((l as u32, e as u32));
            }
        }
    }
    sets.into_iter().map(Arc::new).collect()
}

/// The (layer, expert) pairs `info` says the node hosts.
pub fn hosted(info: &InfoResponse) -> BTreeSet<(u32, u32)> {
    info.hosted
        .iter()
        .flat_map(|r| r.experts.iter().map(move |&e| (r.layer, e)))
        .collect()
}

/// Why `hosted` does not cover `required`, or `None` when it does.
pub fn mismatch(hosted: &BTreeSet<(u32, u32)>, required: &BTreeSet<(u32, u32)>) -> Option<String> {
    let missing: Vec<&(u32, u32)> = required.difference(hosted).collect();
    let first = missing.first()?;
    Some(format!(
        "it does not host {} of the {} experts the placement gives it (first: expert {} of layer {})",
        missing.len(),
        required.len(),
        first.1,
        first.0
    ))
}

/// A client's view of its node's hosting: what it must host and what the last check found.
#[derive(Debug, Default)]
pub struct Hosting {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    required: Option<Required>,
    /// What the node said it hosts at the last check.
    hosted: Option<BTreeSet<(u32, u32)>>,
    /// Why the check on the current connection failed; `None`: it passed or has not run yet
    /// (a node is trusted until its check says otherwise).
    mismatch: Option<String>,
}

impl Hosting {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the pairs the node must host (a new placement). A mismatched node is judged again
    /// against them (a placement that moved its missing experts elsewhere clears it); a node
    /// that passed stays trusted, since its last answer may predate what it loaded for this
    /// placement.
    pub fn set_required(&self, required: Required) {
        let mut s = self.lock();
        if s.mismatch.is_some()
            && let Some(h) = &s.hosted
        {
            s.mismatch = mismatch(h, &required);
        }
        s.required = Some(required);
    }

    /// Records what the node said it hosts; the verdict against the required pairs (none
    /// required yet: no verdict). Returns the mismatch, if any.
    pub fn record(&self, hosted: BTreeSet<(u32, u32)>) -> Option<String> {
        let mut s = self.lock();
        s.mismatch = s.required.as_ref().and_then(|r| mismatch(&hosted, r));
        s.hosted = Some(hosted);
        s.mismatch.clone()
    }

    /// Forgets the verdict (a connection ended: the next one is checked afresh).
    pub fn reset(&self) {
        let mut s = self.lock();
        s.mismatch = None;
        s.hosted = None;
    }

    /// Why the node is mismatched now, if it is.
    pub fn mismatched(&self) -> Option<String> {
        self.lock().mismatch.clone()
    }

    /// Whether the node is mismatched now (planning asks this per node and layer: no clone).
    pub fn is_mismatched(&self) -> bool {
        self.lock().mismatch.is_some()
    }
}

#[cfg(test)]
mod tests {
    use moe_meta::placement::NodeEntry;
    use moe_proto::pb::ExpertRange;

    use super::*;

    fn info(pairs: &[(u32, &[u32])]) -> InfoResponse {
        InfoResponse {
            hosted: pairs
                .iter()
                .map(|(l, e)| ExpertRange {
                    layer: *l,
                    experts: e.to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn set(pairs: &[(u32, u32)]) -> BTreeSet<(u32, u32)> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_node_lacking_an_assigned_expert_is_a_mismatch_naming_it() {
        let nodes = ["1:0-3", "1:2-7"]
            .iter()
            .enumerate()
            .map(|(i, s)| NodeEntry {
                id: format!("n{i}"),
                address: None,
                experts: s.to_string(),
            });
        let p = Placement::new(1, nodes.collect(), &[1], 8).expect("placement");
        let need = required(&p, 2)[1].clone();
        assert_eq!(need.len(), 6);
        let hosts = |e: &[u32]| hosted(&info(&[(1, e)]));
        assert_eq!(mismatch(&hosts(&[2, 3, 4, 5, 6, 7]), &need), None);
        // A superset is fine (a node still holding experts of an older placement).
        assert_eq!(mismatch(&hosts(&[0, 1, 2, 3, 4, 5, 6, 7]), &need), None);
        let why = mismatch(&hosts(&[2, 3, 4]), &need).expect("mismatch");
        assert!(why.contains("3 of the 6"), "{why}");
        assert!(why.contains("expert 5 of layer 1"), "{why}");
    }

    #[test]
    fn a_mismatch_is_judged_again_by_each_placement_and_forgotten_on_reconnect() {
        let h = Hosting::default();
        assert_eq!(h.record(set(&[(1, 1)])), None, "nothing required yet");
        h.set_required(Arc::new(set(&[(1, 1), (1, 2)])));
        assert_eq!(h.mismatched(), None, "a passed node stays trusted");
        assert!(h.record(set(&[(1, 1)])).is_some());
        h.set_required(Arc::new(set(&[(1, 2), (1, 3)])));
        assert!(h.mismatched().is_some(), "still lacks (1, 2)");
        h.set_required(Arc::new(set(&[(1, 1)])));
        assert_eq!(h.mismatched(), None, "what it lacks moved elsewhere");
        assert!(h.record(set(&[])).is_some());
        h.reset();
        assert_eq!(h.mismatched(), None);
    }
}
