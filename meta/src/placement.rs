//! The placement: which nodes serve each (layer, expert), and its JSON file form.
//!
//! File form (what `--placement FILE` reads and `moe placement` will print):
//! ```json
//! {"version": 1,
//!  "nodes": [{"id": "node-0", "address": "127.0.0.1:7001", "experts": "1-3:0-127"},
//!            {"id": "node-1", "address": "127.0.0.1:7002", "experts": "1-3:128-255"}]}
//! ```
//! `address` is optional (routers may be given addresses separately); an expert listed on
//! several nodes has that many replicas.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::ExpertSpec;

/// Placement and spec errors.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("expert spec `{spec}`: {why}")]
    Spec { spec: String, why: String },
    #[error("{}", match expert { Some(e) => format!("expert {e} of layer {layer} is not in the model"), None => format!("layer {layer} is not an MoE layer of the model") })]
    OutOfModel { layer: usize, expert: Option<usize> },
    #[error(
        "placement does not cover {count} (layer, expert) pairs, e.g. layer {layer} expert {expert}"
    )]
    Uncovered {
        count: usize,
        layer: usize,
        expert: usize,
    },
    #[error("placement file {path}: {why}")]
    File { path: String, why: String },
    #[error("node `{0}` is not in the placement")]
    UnknownNode(String),
}

/// One node of a placement file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Expert spec of the node (see [`ExpertSpec`]).
    pub experts: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlacementFile {
    version: u64,
    nodes: Vec<NodeEntry>,
}

/// A versioned placement resolved against a model: (layer, expert) → node indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub version: u64,
    pub nodes: Vec<NodeEntry>,
    table: BTreeMap<usize, Vec<Vec<usize>>>,
    /// Replica shares (parts per million, parallel to the replicas) where they are uneven.
    shares: BTreeMap<(usize, usize), Vec<u32>>,
}

impl Placement {
    /// Resolves node entries against the model's MoE layers and expert count; every
    /// (layer, expert) must have at least one replica.
    pub fn new(
        version: u64,
        nodes: Vec<NodeEntry>,
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Result<Placement, PlacementError> {
        let mut pairs = Vec::with_capacity(nodes.len());
        for node in &nodes {
            if node.experts.trim().is_empty() {
                pairs.push(Vec::new()); // a node that holds nothing (yet)
                continue;
            }
            let spec: ExpertSpec = node.experts.parse()?;
            pairs.push(spec.pairs(moe_layers, n_experts)?);
        }
        Placement::with_pairs(version, nodes, &pairs, moe_layers, n_experts)
    }

    /// [`Placement::new`] with each node's (layer, expert) pairs given (`pairs[i]` for
    /// `nodes[i]`, whose spec should list the same), not parsed from the specs: what a
    /// placement record already holds, so a router following a thousand-node record does not
    /// format and re-parse every node's spec.
    pub fn with_pairs(
        version: u64,
        nodes: Vec<NodeEntry>,
        pairs: &[Vec<(usize, usize)>],
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Result<Placement, PlacementError> {
        let mut table: BTreeMap<usize, Vec<Vec<usize>>> = moe_layers
            .iter()
            .map(|&l| (l, vec![Vec::new(); n_experts]))
            .collect();
        for (ni, node_pairs) in pairs.iter().enumerate().take(nodes.len()) {
            for &(layer, expert) in node_pairs {
                let Some(replicas) = table.get_mut(&layer) else {
                    return Err(PlacementError::OutOfModel {
                        layer,
                        expert: None,
                    });
                };
                let Some(r) = replicas.get_mut(expert) else {
                    return Err(PlacementError::OutOfModel {
                        layer,
                        expert: Some(expert),
                    });
                };
                // A pair listed twice is one replica (as a spec's pairs are a set).
                if r.last() != Some(&ni) {
                    r.push(ni);
                }
            }
        }
        let uncovered: Vec<(usize, usize)> = table
            .iter()
            .flat_map(|(&l, experts)| {
                experts
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_empty())
                    .map(move |(e, _)| (l, e))
            })
            .collect();
        if let Some(&(layer, expert)) = uncovered.first() {
            return Err(PlacementError::Uncovered {
                count: uncovered.len(),
                layer,
                expert,
            });
        }
        Ok(Placement {
            version,
            nodes,
            table,
            shares: BTreeMap::new(),
        })
    }

    /// Reads a placement file and resolves it.
    pub fn from_file(
        path: &Path,
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Result<Placement, PlacementError> {
        let ferr = |why: String| PlacementError::File {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| ferr(e.to_string()))?;
        let f: PlacementFile = serde_json::from_str(&text).map_err(|e| ferr(e.to_string()))?;
        Placement::new(f.version, f.nodes, moe_layers, n_experts)
    }

    /// The file form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&PlacementFile {
            version: self.version,
            nodes: self.nodes.clone(),
        })
        .unwrap_or_default()
    }

    /// Every (layer, expert) of the model with its replicas' node indices.
    pub fn experts(&self) -> impl Iterator<Item = (usize, usize, &[usize])> + '_ {
        self.table.iter().flat_map(|(&l, es)| {
            es.iter()
                .enumerate()
                .map(move |(e, r)| (l, e, r.as_slice()))
        })
    }

    /// Node indices serving (layer, expert); empty if the layer is not an MoE layer.
    pub fn replicas(&self, layer: usize, expert: usize) -> &[usize] {
        self.table
            .get(&layer)
            .and_then(|e| e.get(expert))
            .map_or(&[], Vec::as_slice)
    }

    /// Sets replica shares from (layer, expert, node index, parts per million). An expert keeps
    /// shares only when every replica of it has a positive one; otherwise it splits evenly.
    pub fn set_shares(&mut self, shares: impl IntoIterator<Item = (usize, usize, usize, u32)>) {
        let mut by_pair: BTreeMap<(usize, usize), Vec<(usize, u32)>> = BTreeMap::new();
        for (l, e, n, s) in shares {
            by_pair.entry((l, e)).or_default().push((n, s));
        }
        self.shares = by_pair
            .into_iter()
            .filter_map(|((l, e), given)| {
                let replicas = self.replicas(l, e);
                let out: Option<Vec<u32>> = replicas
                    .iter()
                    .map(|n| {
                        given
                            .iter()
                            .find(|g| g.0 == *n)
                            .map(|g| g.1)
                            .filter(|&s| s > 0)
                    })
                    .collect();
                out.filter(|v| v.len() > 1).map(|v| ((l, e), v))
            })
            .collect();
    }

    /// The shares of (layer, expert)'s replicas, parallel to [`Placement::replicas`]; `None`
    /// when they split evenly.
    pub fn shares(&self, layer: usize, expert: usize) -> Option<&[u32]> {
        self.shares.get(&(layer, expert)).map(Vec::as_slice)
    }

    /// Each node's load in `layer` when expert `e` gets `loads[e]` tokens, split over its
    /// replicas by their shares (evenly without).
    pub fn node_loads(&self, layer: usize, loads: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.nodes.len()];
        for (e, &l) in loads.iter().enumerate() {
            let replicas = self.replicas(layer, e);
            match self.shares(layer, e) {
                Some(shares) => {
                    let total: f64 = shares.iter().map(|&s| f64::from(s)).sum();
                    for (&n, &s) in replicas.iter().zip(shares) {
                        out[n] += l * f64::from(s) / total;
                    }
                }
                None => {
                    for &n in replicas {
                        out[n] += l / replicas.len() as f64;
                    }
                }
            }
        }
        out
    }

    /// The entry of the node named `id`.
    pub fn node(&self, id: &str) -> Result<&NodeEntry, PlacementError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| PlacementError::UnknownNode(id.to_string()))
    }

    /// Splits the experts of `moe_layers` evenly over `nodes` (contiguous ranges per layer),
    /// with `replicas` copies each on distinct nodes.
    pub fn even(
        nodes: usize,
        replicas: usize,
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Placement {
        let mut specs: Vec<Vec<String>> = vec![Vec::new(); nodes];
        for r in 0..replicas.min(nodes) {
            for n in 0..nodes {
                let target = (n + r) % nodes;
                let (a, b) = (n_experts * n / nodes, n_experts * (n + 1) / nodes);
                if a < b {
                    let layers: Vec<String> = moe_layers.iter().map(|l| l.to_string()).collect();
                    specs[target].push(format!("{}:{}-{}", layers.join(","), a, b - 1));
                }
            }
        }
        let entries = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| NodeEntry {
                id: format!("node-{i}"),
                address: None,
                experts: s.join(";"),
            })
            .collect();
        Placement::new(1, entries, moe_layers, n_experts)
            .unwrap_or_else(|e| unreachable!("even placement: {e}"))
    }
}

/// DeepSeek's balancedness of per-node loads: mean / max (1 when there is no load to speak
/// of: a largest load of 1e-12 or less).
pub fn balancedness(node_loads: &[f64]) -> f64 {
    let max = node_loads.iter().copied().fold(0.0, f64::max);
    if max <= 1e-12 {
        return 1.0;
    }
    node_loads.iter().sum::<f64>() / node_loads.len() as f64 / max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, experts: &str) -> NodeEntry {
        NodeEntry {
            id: id.into(),
            address: None,
            experts: experts.into(),
        }
    }

    #[test]
    fn resolves_replicas_and_checks_coverage() {
        let p = Placement::new(
            3,
            vec![node("a", "1-2:0-3"), node("b", "1-2:2-5")],
            &[1, 2],
            6,
        )
        .expect("covers");
        assert_eq!(p.replicas(1, 0), &[0]);
        assert_eq!(p.replicas(2, 3), &[0, 1]);
        assert_eq!(p.replicas(2, 5), &[1]);
        assert!(p.replicas(0, 0).is_empty());
        let err = Placement::new(1, vec![node("a", "1:0-3")], &[1, 2], 6).expect_err("must fail");
        assert_eq!(
            err.to_string(),
            "placement does not cover 8 (layer, expert) pairs, e.g. layer 1 expert 4"
        );
    }

    #[test]
    fn shares_hold_only_where_every_replica_has_one() {
        let mut p = Placement::new(1, vec![node("a", "1:0-3"), node("b", "1:2-3")], &[1], 4)
            .expect("covers");
        p.set_shares([(1, 2, 0, 700_000), (1, 2, 1, 300_000), (1, 3, 1, 500_000)]);
        assert_eq!(p.shares(1, 2), Some(&[700_000, 300_000][..]));
        assert_eq!(p.shares(1, 3), None, "node a has no share of expert 3");
        assert_eq!(p.shares(1, 0), None);
        let loads = p.node_loads(1, &[1.0, 1.0, 10.0, 4.0]);
        assert_eq!(loads, vec![2.0 + 7.0 + 2.0, 3.0 + 2.0]);
        assert!((balancedness(&loads) - 8.0 / 11.0).abs() < 1e-12);
        assert_eq!(balancedness(&[0.0, 0.0]), 1.0);
    }

    #[test]
    fn file_round_trip() {
        let p =
            Placement::new(7, vec![node("a", "1:0-1"), node("b", "1:1-3")], &[1], 4).expect("ok");
        let dir = std::env::temp_dir().join(format!("moe-placement-{}", std::process::id()));
        std::fs::write(&dir, p.to_json()).expect("write");
        let q = Placement::from_file(&dir, &[1], 4).expect("read");
        std::fs::remove_file(&dir).ok();
        assert_eq!(p, q);
    }

    #[test]
    fn even_split_with_replicas() {
        let p = Placement::even(3, 2, &[1, 2, 3], 256);
        for l in [1, 2, 3] {
            for e in 0..256 {
                let r = p.replicas(l, e);
                assert_eq!(r.len(), 2, "({l}, {e})");
                assert_ne!(r[0], r[1]);
            }
        }
        let single = Placement::even(3, 1, &[1], 256);
        assert_eq!(single.replicas(1, 0), &[0]);
        assert_eq!(single.replicas(1, 255), &[2]);
    }
}
