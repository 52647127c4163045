//! The placement as watchers receive it: `placement/pending` and `placement/active` hold a
//! [`PlacementWire`] (format 3), either the whole record or a byte delta against a record every
//! watcher holds already (the pending's against the active; the active's against the pending it
//! promotes, a few bytes). The whole record is kept beside it under `placement-full/` (format 2,
//! a [`PlacementRecord`]), which nobody watches: a process that lacks the delta's base (it just
//! started, or re-listed) reads it once. So a rollout delivers to each of the thousand-odd
//! watchers what changed (a node death: a few KiB) rather than the whole record twice.
//!
//! The delta is over the record's encoding (format byte + bincode), found by matching 8-byte
//! blocks of the base (rsync's idea without the rolling hash); applying it is checked against
//! the record's digest, so a wrong base can never yield a wrong placement.
//! Readers take a format-2 record at the watched keys as the whole record (what coordinators
//! before this format write), so nodes and routers can be upgraded before the coordinator.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{FORMAT, PlacementRecord, decode_as, encode_as, fnv};
use crate::store::StoreError;

/// Format byte of a [`PlacementWire`].
pub const WIRE_FORMAT: u8 = 3;

/// Block the delta matches on.
const BLOCK: usize = 8;

/// One step of a delta: bytes copied from the base, or new bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Edit {
    Copy { from: u32, len: u32 },
    Insert(Vec<u8>),
}

/// A record as edits of a base record (both named by version and digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementDelta {
    pub version: u64,
    pub digest: u64,
    pub base_version: u64,
    pub base_digest: u64,
    pub edits: Vec<Edit>,
}

/// What `placement/pending` and `placement/active` hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementWire {
    Full(PlacementRecord),
    Delta(PlacementDelta),
}

/// A placement record with its encoding and digest (what deltas are made against).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub record: Arc<PlacementRecord>,
    pub bytes: Arc<Vec<u8>>,
    pub digest: u64,
    /// It came as a format-2 record at the watched key: a coordinator of the previous format
    /// wrote it (and reads acks where that format kept them).
    pub legacy: bool,
}

impl Resolved {
    pub fn new(record: PlacementRecord) -> Resolved {
        let bytes = super::encode(&record);
        Resolved {
            digest: fnv(&bytes),
            record: Arc::new(record),
            bytes: Arc::new(bytes),
            legacy: false,
        }
    }

    fn names(&self, version: u64, digest: u64) -> bool {
        self.record.version == version && self.digest == digest
    }
}

/// The edits that turn `base` into `next`.
pub fn diff(base: &[u8], next: &[u8]) -> Vec<Edit> {
    let mut index: HashMap<&[u8], usize> = HashMap::with_capacity(base.len() / BLOCK + 1);
    for (k, block) in base.chunks_exact(BLOCK).enumerate() {
        index.entry(block).or_insert(k * BLOCK);
    }
    let mut edits = Vec::new();
    let mut lit: Vec<u8> = Vec::new();
    // Where the last copy ended in the base: the likeliest place for the next match.
    let mut expect = 0usize;
    let mut i = 0;
    while i < next.len() {
        let here = next.get(i..i + BLOCK);
        let at = here.and_then(|w| {
            let fits = base.get(expect..expect + BLOCK) == Some(w);
            if fits {
                Some(expect)
            } else {
                index.get(w).copied()
            }
        });
        match at {
            Some(from) => {
                let mut len = BLOCK;
                while i + len < next.len()
                    && from + len < base.len()
                    && next[i + len] == base[from + len]
                {
                    len += 1;
                }
                if !lit.is_empty() {
                    edits.push(Edit::Insert(std::mem::take(&mut lit)));
                }
                edits.push(Edit::Copy {
                    from: from as u32,
                    len: len as u32,
                });
                i += len;
                expect = from + len;
            }
            None => {
                lit.push(next[i]);
                i += 1;
                expect += 1;
            }
        }
    }
    if !lit.is_empty() {
        edits.push(Edit::Insert(lit));
    }
    edits
}

/// `base` with `edits` applied; `None` if an edit reaches outside it.
pub fn patch(base: &[u8], edits: &[Edit]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(base.len());
    for e in edits {
        match e {
            Edit::Copy { from, len } => {
                let (from, len) = (*from as usize, *len as usize);
                out.extend_from_slice(base.get(from..from.checked_add(len)?)?);
            }
            Edit::Insert(b) => out.extend_from_slice(b),
        }
    }
    Some(out)
}

/// The watched value for `next`: a delta against `base` when that is under half the record,
/// else the record itself.
pub fn encode_wire(next: &Resolved, base: Option<&Resolved>) -> Vec<u8> {
    if let Some(b) = base {
        let edits = diff(&b.bytes, &next.bytes);
        let delta = PlacementDelta {
            version: next.record.version,
            digest: next.digest,
            base_version: b.record.version,
            base_digest: b.digest,
            edits,
        };
        let wire = encode_as(WIRE_FORMAT, &PlacementWire::Delta(delta));
        if wire.len() < next.bytes.len() / 2 {
            return wire;
        }
    }
    encode_as(WIRE_FORMAT, &PlacementWire::Full((*next.record).clone()))
}

/// The watched value at `key`: format 3, or a whole format-2 record (a previous coordinator's).
pub fn decode_wire(key: &str, bytes: &[u8]) -> Result<PlacementWire, StoreError> {
    match bytes.first() {
        Some(&FORMAT) => decode_as(FORMAT, key, bytes).map(PlacementWire::Full),
        _ => decode_as(WIRE_FORMAT, key, bytes),
    }
}

impl PlacementDelta {
    /// Whether `base` is the record this delta edits.
    pub fn edits(&self, base: &Resolved) -> bool {
        base.names(self.base_version, self.base_digest)
    }

    /// The record, from `base`; `None` unless `base` is this delta's and the result has the
    /// digest the delta names.
    pub fn apply(&self, base: &Resolved) -> Option<Resolved> {
        if !self.edits(base) {
            return None;
        }
        // A promotion (the active naming the pending it was): the base itself, shared, with no
        // copy, hash or decode of the record (half of what a rollout cost each follower).
        let whole = [Edit::Copy {
            from: 0,
            len: base.bytes.len() as u32,
        }];
        if self.edits == whole && self.digest == base.digest && self.version == base.record.version
        {
            return Some(Resolved {
                legacy: false,
                ..base.clone()
            });
        }
        let bytes = patch(&base.bytes, &self.edits)?;
        if fnv(&bytes) != self.digest {
            return None;
        }
        let record: PlacementRecord = super::decode("placement delta", &bytes).ok()?;
        (record.version == self.version).then(|| Resolved {
            record: Arc::new(record),
            bytes: Arc::new(bytes),
            digest: self.digest,
            legacy: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::PlacedNode;
    use super::*;

    fn record(version: u64, nodes: usize, skip: Option<usize>, extra: Option<usize>) -> Resolved {
        let nodes = (0..nodes)
            .filter(|&i| Some(i) != skip)
            .map(|i| {
                let mut experts: Vec<(u16, u16)> = (0..58u16)
                    .map(|l| (l + 3, (i as u16 * 7 + l) % 256))
                    .collect();
                if Some(i) == extra {
                    experts.push((61, 0));
                }
                PlacedNode {
                    id: format!("n{i:04}"),
                    addr: format!("10.0.{}.{}:50051", i / 256, i % 256),
                    shares: vec![],
                    experts,
                }
            })
            .collect();
        Resolved::new(PlacementRecord { version, nodes })
    }

    #[test]
    fn a_small_change_is_a_small_delta_that_applies_only_to_its_base() {
        let base = record(7, 300, None, None);
        // A node dies and another takes one more pair.
        let next = record(8, 300, Some(120), Some(200));
        let wire = encode_wire(&next, Some(&base));
        assert!(
            wire.len() * 50 < next.bytes.len(),
            "{} vs {}",
            wire.len(),
            next.bytes.len()
        );
        let PlacementWire::Delta(d) = decode_wire("k", &wire).expect("decodes") else {
            panic!("a delta");
        };
        let got = d.apply(&base).expect("applies");
        assert_eq!(*got.record, *next.record);
        assert_eq!(got.digest, next.record.digest());
        // Not against another record, even of the same version.
        let other = record(7, 301, None, None);
        assert!(d.apply(&other).is_none());
        // Promoting the pending: a few bytes, applied by sharing the base.
        let same = encode_wire(&next, Some(&next));
        assert!(same.len() < 64, "{}", same.len());
        let PlacementWire::Delta(p) = decode_wire("k", &same).expect("decodes") else {
            panic!("a delta");
        };
        let promoted = p.apply(&got).expect("applies");
        assert!(Arc::ptr_eq(&promoted.record, &got.record));
        assert_eq!(promoted.digest, got.digest);
        // A whole-copy delta naming another digest is refused.
        let wrong = PlacementDelta {
            digest: got.digest ^ 1,
            ..p.clone()
        };
        assert!(wrong.apply(&got).is_none());
    }

    #[test]
    fn unrelated_records_go_whole_and_old_records_read_as_whole() {
        let a = record(1, 10, None, None);
        let b = Resolved::new(PlacementRecord {
            version: 2,
            nodes: vec![],
        });
        let wire = encode_wire(&a, Some(&b));
        assert_eq!(
            decode_wire("k", &wire).expect("decodes"),
            PlacementWire::Full((*a.record).clone())
        );
        let old = super::super::encode(&*a.record);
        assert_eq!(
            decode_wire("k", &old).expect("format 2"),
            PlacementWire::Full((*a.record).clone())
        );
        // Edits outside the base are refused, not panicked on.
        assert!(patch(b"abc", &[Edit::Copy { from: 2, len: 5 }]).is_none());
        assert_eq!(
            patch(
                b"abc",
                &[Edit::Copy { from: 1, len: 2 }, Edit::Insert(b"x".to_vec())]
            )
            .as_deref(),
            Some(&b"bcx"[..])
        );
    }
}
