//! Publishing the router's load window (token counts per (layer, expert) over the last minute)
//! under `load/<router id>`, on the router's lease, and the load gauges of `/metrics`.
//!
//! The window is checked every `load_publish` and published (as a compact summary,
//! [`records::LoadSummary`]) only when the coordinator's view of it would be off: some expert's
//! rate moved by more than [`RATE_DRIFT`] of its layer's hottest expert, or a layer's token count
//! by more than [`TOTAL_DRIFT`], or [`REFRESH_INTERVALS`] intervals passed. The stored record
//! stays on the router's lease, so between publications the coordinator keeps reading the last
//! one, which is within those bounds of the window. A steady load is then one record per
//! router a minute, not one every 5 s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use moe_meta::records::{self, LoadRecord};
use moe_meta::store::{LeaseId, MetaStore};
use tokio::time::Instant;

use super::FollowConfig;
use crate::RemoteExperts;

/// Largest move of one expert's rate, as a share of its layer's hottest expert's, that the
/// coordinator is not told of at once.
pub const RATE_DRIFT: f64 = 0.02;
/// Largest relative change of a layer's token count not published at once.
pub const TOTAL_DRIFT: f64 = 0.05;
/// Publish intervals after which the window is published whatever it holds.
pub const REFRESH_INTERVALS: u32 = 12;

/// What was published last: when, and per layer each expert's rate and the token count.
#[derive(Debug, Clone, Default)]
pub struct Published {
    at: Option<Instant>,
    layers: BTreeMap<usize, (Vec<f64>, u64)>,
}

/// Per layer the rates (tokens per second of the window) and the token count.
fn rates(
    covered: Duration,
    layers: &BTreeMap<usize, Vec<u32>>,
) -> BTreeMap<usize, (Vec<f64>, u64)> {
    let secs = covered.as_secs_f64().max(1e-3);
    layers
        .iter()
        .map(|(&l, c)| {
            let r = c.iter().map(|&x| f64::from(x) / secs).collect();
            (l, (r, c.iter().map(|&x| u64::from(x)).sum()))
        })
        .collect()
}

impl Published {
    /// Whether a window of `now` must be published at `at` (see the module's rule), given
    /// `refresh`, the longest time between publications.
    pub fn due(
        &self,
        at: Instant,
        refresh: Duration,
        now: &BTreeMap<usize, (Vec<f64>, u64)>,
    ) -> bool {
        let Some(last) = self.at else { return true };
        if at >= last + refresh || self.layers.len() != now.len() {
            return true;
        }
        now.iter().any(|(l, (r, total))| {
            let Some((r0, t0)) = self.layers.get(l) else {
                return true;
            };
            let moved = (*total as f64 - *t0 as f64).abs();
            if moved > TOTAL_DRIFT * (*t0).max(1) as f64 {
                return true;
            }
            let top = r.iter().chain(r0).copied().fold(0.0, f64::max);
            r.len() != r0.len()
                || r.iter()
                    .zip(r0)
                    .any(|(a, b)| (a - b).abs() > RATE_DRIFT * top)
        })
    }
}

/// Sets the load gauges and publishes the router's load window when [`Published::due`].
pub async fn publish_loads(
    store: &Arc<dyn MetaStore>,
    cfg: &FollowConfig,
    experts: &RemoteExperts,
    lease: LeaseId,
    published: &mut Published,
) {
    let (covered, layers) = experts.loads.snapshot(cfg.n_experts);
    let routes = experts.routes();
    for (&layer, counts) in &layers {
        let loads: Vec<f64> = counts.iter().map(|&c| f64::from(c)).collect();
        let total: f64 = loads.iter().sum();
        let hottest = loads.iter().copied().fold(0.0, f64::max);
        let label = layer.to_string();
        metrics::gauge!(crate::metrics::HOTTEST_SHARE, "layer" => label.clone())
            .set(if total > 0.0 { hottest / total } else { 0.0 });
        if let Some(p) = &routes.placement {
            let b = moe_meta::balancedness(&p.node_loads(layer, &loads));
            metrics::gauge!(crate::metrics::LAYER_BALANCEDNESS, "layer" => label).set(b);
        }
    }
    let now = rates(covered, &layers);
    let at = Instant::now();
    if !published.due(at, cfg.load_publish * REFRESH_INTERVALS, &now) {
        return;
    }
    let rec = LoadRecord {
        router: cfg.id.clone(),
        window_ms: covered.as_millis() as u64,
        layers: layers.into_iter().map(|(l, c)| (l as u16, c)).collect(),
    };
    match store
        .put(
            &cfg.keys.load(&cfg.id),
            records::encode_load(&rec),
            Some(lease),
        )
        .await
    {
        Ok(_) => {
            *published = Published {
                at: Some(at),
                layers: now,
            }
        }
        Err(e) => tracing::warn!(router = %cfg.id, error = %e, "cannot publish load counts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_published_when_the_coordinators_view_would_drift() {
        let window = |c: Vec<u32>| rates(Duration::from_secs(60), &BTreeMap::from([(3, c)]));
        let t0 = Instant::now();
        let refresh = Duration::from_secs(60);
        let first = window(vec![6000, 600, 60, 0]);
        assert!(
            Published::default().due(t0, refresh, &first),
            "nothing published yet"
        );
        let p = Published {
            at: Some(t0),
            layers: first.clone(),
        };
        let soon = t0 + Duration::from_secs(5);
        assert!(!p.due(soon, refresh, &first), "unchanged");
        // A cold expert moving by 1% of the hottest, the count by 1%: not yet.
        assert!(!p.due(soon, refresh, &window(vec![6000, 600, 0, 60])));
        // Moving by 3% of the hottest: due.
        assert!(p.due(soon, refresh, &window(vec![6000, 420, 240, 0])));
        // The count by 10% at the same shares: due.
        assert!(p.due(soon, refresh, &window(vec![6600, 660, 66, 0])));
        // A layer appearing: due; and everything after the refresh time.
        let mut more = first.clone();
        more.insert(4, (vec![1.0; 4], 240));
        assert!(p.due(soon, refresh, &more));
        assert!(p.due(t0 + refresh, refresh, &first));
    }
}
