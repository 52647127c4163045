//! The key space under `/moe/<cluster>/` and its records: compact bincode with a format byte
//! first, so a future format can be told apart (and refused clearly) rather than misread.
//!
//! | key | written by | record |
//! | --- | --- | --- |
//! | `nodes/<id>` | expert node, under its lease | [`NodeRecord`] |
//! | `routers/<id>` | router, under its lease | [`RouterRecord`] (watched by the coordinator only) |
//! | `router-versions` | coordinator, fenced, no lease | [`RouterVersions`]: the oldest placement version a live router routes with, what nodes watch instead of every router's record |
//! | `placement/pending`, `placement/active` | coordinator, fenced | [`wire::PlacementWire`] (format 3): the record, or a delta against the one watchers hold |
//! | `placement-full/pending`, `placement-full/active` | coordinator, with the above | [`PlacementRecord`]: the whole record, read (never watched) by a process that lacks a delta's base |
//! | `acks/<node>` | expert node, under its lease | [`AckRecord`] (outside `placement/`: only the coordinator watches acks) |
//! | `load/<router>` | router, under its lease | [`LoadSummary`] (format 3; format 2 [`LoadRecord`]s are read too) |
//! | `election/coordinator` | coordinators | the leader's id (plain text) |

mod load;
pub mod wire;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use load::{LOAD_FORMAT, LayerLoad, LoadSummary, decode_load, encode_load};

use crate::placement::{NodeEntry, Placement, PlacementError};
use crate::store::StoreError;

/// Current record format.
pub const FORMAT: u8 = 2;

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys under `/moe/<cluster>/`.
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/moe/{cluster}/"),
        }
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }
    pub fn routers(&self) -> String {
        format!("{}routers/", self.root)
    }
    pub fn router(&self, id: &str) -> String {
        format!("{}routers/{id}", self.root)
    }
    /// The oldest version routers use ([`RouterVersions`]), one key.
    pub fn router_versions(&self) -> String {
        format!("{}router-versions", self.root)
    }
    pub fn placement(&self) -> String {
        format!("{}placement/", self.root)
    }
    pub fn pending(&self) -> String {
        format!("{}placement/pending", self.root)
    }
    pub fn active(&self) -> String {
        format!("{}placement/active", self.root)
    }
    /// The whole pending record (not watched; see [`wire`]).
    pub fn full_pending(&self) -> String {
        format!("{}placement-full/pending", self.root)
    }
    /// The whole active record (not watched; see [`wire`]).
    pub fn full_active(&self) -> String {
        format!("{}placement-full/active", self.root)
    }
    pub fn acks(&self) -> String {
        format!("{}acks/", self.root)
    }
    pub fn ack(&self, node: &str) -> String {
        format!("{}acks/{node}", self.root)
    }
    /// Where nodes acknowledged records of the previous format (a coordinator of that format
    /// reads acks there): under the watched `placement/` prefix.
    pub fn legacy_ack(&self, node: &str) -> String {
        format!("{}placement/acks/{node}", self.root)
    }
    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }
    pub fn load(&self, router: &str) -> String {
        format!("{}load/{router}", self.root)
    }
    pub fn election(&self) -> String {
        format!("{}election/coordinator", self.root)
    }
}

/// An expert node's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// gRPC address routers dial.
    pub addr: String,
    /// How many (layer, expert) pairs it can hold.
    pub capacity: u32,
    pub backend: String,
    pub version: String,
}

/// A router's registration and the placement version it routes with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    pub id: String,
    pub addr: String,
    pub placement_version: u64,
}

/// What the live routers route with, summarised by the coordinator from `routers/`: an expert
/// node keeps serving every version from `oldest` up, and unloads what the active placement no
/// longer gives it only once `oldest` reaches the active version. One key that changes about
/// once per rollout, rather than every router's record reaching every node (at 1,000 nodes and
/// 64 routers, 64,000 of a rollout's 68,000 watch events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterVersions {
    /// Live routers.
    pub routers: u32,
    /// The lowest placement version they report (None: no router).
    pub oldest: Option<u64>,
}

impl RouterVersions {
    /// The summary of the `RouterRecord`s in `records`.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a RouterRecord>) -> RouterVersions {
        let (mut routers, mut oldest) = (0u32, None::<u64>);
        for r in records {
            routers += 1;
            oldest = Some(oldest.map_or(r.placement_version, |o| o.min(r.placement_version)));
        }
        RouterVersions { routers, oldest }
    }
}

/// A placement: version, and per node its address and (layer, expert) pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub version: u64,
    pub nodes: Vec<PlacedNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedNode {
    pub id: String,
    pub addr: String,
    pub experts: Vec<(u16, u16)>,
    /// Share of each pair's tokens this replica should take, in parts per million, parallel to
    /// `experts`; empty when every expert here is split evenly over its replicas.
    #[serde(default)]
    pub shares: Vec<u32>,
}

/// Parts per million: the unit of replica shares.
pub const SHARE_UNIT: u32 = 1_000_000;

/// Tokens a router routed per (layer, expert) over its sliding window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRecord {
    pub router: String,
    /// Length of the window the counts cover, milliseconds.
    pub window_ms: u64,
    /// Per MoE layer, token count per logical expert.
    pub layers: Vec<(u16, Vec<u32>)>,
}

/// A node's answer to a placement record: it has loaded everything the record gives it, or it
/// cannot (`error` says why). The record is named by its version and [`PlacementRecord::digest`],
/// so an ack for another record that happens to carry the same version never counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    pub version: u64,
    pub digest: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl AckRecord {
    /// A successful ack of `rec`.
    pub fn loaded(rec: &PlacementRecord) -> AckRecord {
        AckRecord {
            version: rec.version,
            digest: rec.digest(),
            error: None,
        }
    }

    /// The ack of a record whose version and digest are known (a [`wire::Resolved`] carries
    /// its digest: no re-encoding of the whole record per ack).
    pub fn of(version: u64, digest: u64) -> AckRecord {
        AckRecord {
            version,
            digest,
            error: None,
        }
    }

    /// Whether this ack names `rec`.
    pub fn names(&self, rec: &PlacementRecord) -> bool {
        self.names_digest(rec.version, rec.digest())
    }

    /// Whether this ack names the record of `version` and `digest` (the digest computed once,
    /// not per ack: at 1,000 nodes re-encoding the record for every ack on every ack event was
    /// half of a rollout's coordinator time).
    pub fn names_digest(&self, version: u64, digest: u64) -> bool {
        self.version == version && self.digest == digest
    }
}

/// Encodes a record (format byte + bincode).
pub fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    encode_as(FORMAT, rec)
}

/// Encodes a record under format byte `format`.
pub fn encode_as<T: Serialize>(format: u8, rec: &T) -> Vec<u8> {
    let mut out = vec![format];
    out.extend(bincode::serde::encode_to_vec(rec, bincode::config::standard()).unwrap_or_default());
    out
}

/// Decodes a record stored at `key`.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_as(FORMAT, key, bytes)
}

/// Decodes a record of format byte `format` stored at `key`.
pub fn decode_as<T: DeserializeOwned>(
    format: u8,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let bad = |why: String| StoreError::Decode {
        key: key.to_string(),
        why,
    };
    match bytes.split_first() {
        Some((&f, rest)) if f == format => {
            bincode::serde::decode_from_slice(rest, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|e| bad(e.to_string()))
        }
        Some((f, _)) => Err(bad(format!(
            "record format {f} is not {format}: a newer or older process wrote it"
        ))),
        None => Err(bad("empty record".into())),
    }
}

/// Decodes a record stored at `key`, or logs why it cannot and skips it: a process must not stop
/// over a record another version wrote.
pub fn decode_or_skip<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Option<T> {
    decode(key, bytes)
        .map_err(|e| tracing::warn!(error = %e, "skipping a record"))
        .ok()
}

/// 64-bit FNV-1a.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl PlacementRecord {
    /// A 64-bit digest (FNV-1a) of the record's encoding: what acks name besides the version.
    pub fn digest(&self) -> u64 {
        fnv(&encode(self))
    }

    /// Resolves the record into a routable placement (checks coverage of the model).
    pub fn to_placement(
        &self,
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Result<Placement, PlacementError> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeEntry {
                id: n.id.clone(),
                address: Some(n.addr.clone()),
                experts: spec_of(&n.experts),
            })
            .collect();
        let pairs: Vec<Vec<(usize, usize)>> = self
            .nodes
            .iter()
            .map(|n| {
                n.experts
                    .iter()
                    .map(|&(l, e)| (l as usize, e as usize))
                    .collect()
            })
            .collect();
        let mut p = Placement::with_pairs(self.version, nodes, &pairs, moe_layers, n_experts)?;
        p.set_shares(self.nodes.iter().enumerate().flat_map(|(ni, n)| {
            n.experts
                .iter()
                .zip(&n.shares)
                .map(move |(&(l, e), &s)| (l as usize, e as usize, ni, s))
        }));
        Ok(p)
    }

    /// The pairs of node `id` (empty if absent).
    pub fn pairs_of(&self, id: &str) -> Vec<(usize, usize)> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| {
                n.experts
                    .iter()
                    .map(|&(l, e)| (l as usize, e as usize))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// An expert spec listing exactly `pairs` (layer by layer).
pub fn spec_of(pairs: &[(u16, u16)]) -> String {
    let mut by_layer: std::collections::BTreeMap<u16, Vec<u16>> = Default::default();
    for &(l, e) in pairs {
        by_layer.entry(l).or_default().push(e);
    }
    by_layer
        .into_iter()
        .map(|(l, es)| {
            format!(
                "{l}:{}",
                es.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_other_formats() {
        let p = PlacementRecord {
            version: 3,
            nodes: vec![PlacedNode {
                id: "a".into(),
                addr: "127.0.0.1:1".into(),
                experts: vec![(1, 0), (1, 1), (2, 5)],
                shares: vec![],
            }],
        };
        let bytes = encode(&p);
        assert_eq!(decode::<PlacementRecord>("k", &bytes).expect("decodes"), p);
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(
            decode::<PlacementRecord>("k", &other)
                .expect_err("format")
                .to_string()
                .contains("format 9")
        );
        assert_eq!(spec_of(&p.nodes[0].experts), "1:0,1;2:5");
        let placement = p.to_placement(&[1, 2], 6);
        assert!(placement.is_err(), "does not cover");
        // Acks name the record: same version, other contents → not acknowledged.
        let ack = AckRecord::loaded(&p);
        assert!(ack.names(&p));
        let mut other = p.clone();
        other.nodes[0].experts.pop();
        assert_eq!(other.version, p.version);
        assert!(!ack.names(&other));
    }
}
