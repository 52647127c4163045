//! The routers' load records as published: a compact summary of the window, format 3.
//!
//! Per MoE layer the tokens the window counted (exact) and each expert's count relative to the
//! layer's hottest, as a 16-bit level (2 bytes an expert, little-endian, in one byte string), so
//! a record at 58 layers × 256 experts is ~30 KiB rather than ~44 KiB of varint counts; the
//! counts it resolves to are within 1/65,535 of the layer's hottest expert of what the router
//! counted. Readers take both this and the full counts of format 2 (what routers before it
//! publish), so routers can be upgraded before or after the coordinator.

use serde::{Deserialize, Serialize};

use super::{FORMAT, LoadRecord, decode_as, encode_as};
use crate::store::StoreError;

/// Format byte of a load summary.
pub const LOAD_FORMAT: u8 = 3;

/// Largest level: the layer's hottest expert.
const TOP: u32 = u16::MAX as u32;

/// One layer of a [`LoadSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerLoad {
    pub layer: u16,
    /// Tokens counted over the window (every expert of the layer).
    pub total: u64,
    /// Count of the hottest expert.
    pub max: u32,
    /// Per expert, its count over `max` in 1/65,535ths, 2 bytes little-endian each.
    pub levels: Vec<u8>,
}

/// What a router publishes under `load/<router>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSummary {
    pub router: String,
    pub window_ms: u64,
    pub layers: Vec<LayerLoad>,
}

impl LoadSummary {
    /// The summary of `rec`.
    pub fn of(rec: &LoadRecord) -> LoadSummary {
        let layers = rec
            .layers
            .iter()
            .map(|(layer, counts)| {
                let max = counts.iter().copied().max().unwrap_or(0);
                let levels = counts
                    .iter()
                    .flat_map(|&c| {
                        let level = match max {
                            0 => 0,
                            m => (u64::from(c) * u64::from(TOP) + u64::from(m) / 2) / u64::from(m),
                        };
                        (level as u16).to_le_bytes()
                    })
                    .collect();
                LayerLoad {
                    layer: *layer,
                    total: counts.iter().map(|&c| u64::from(c)).sum(),
                    max,
                    levels,
                }
            })
            .collect();
        LoadSummary {
            router: rec.router.clone(),
            window_ms: rec.window_ms,
            layers,
        }
    }

    /// The counts the summary stands for (each within `max / 65,535` of the router's).
    pub fn counts(&self) -> LoadRecord {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let counts = l
                    .levels
                    .chunks_exact(2)
                    .map(|b| {
                        let level = u64::from(u16::from_le_bytes([b[0], b[1]]));
                        ((level * u64::from(l.max) + u64::from(TOP) / 2) / u64::from(TOP)) as u32
                    })
                    .collect();
                (l.layer, counts)
            })
            .collect();
        LoadRecord {
            router: self.router.clone(),
            window_ms: self.window_ms,
            layers,
        }
    }
}

/// The encoded summary of `rec` (what a router puts under `load/<router>`).
pub fn encode_load(rec: &LoadRecord) -> Vec<u8> {
    encode_as(LOAD_FORMAT, &LoadSummary::of(rec))
}

/// A load record stored at `key`: a summary (format 3) or full counts (format 2).
pub fn decode_load(key: &str, bytes: &[u8]) -> Result<LoadRecord, StoreError> {
    match bytes.first() {
        Some(&LOAD_FORMAT) => decode_as::<LoadSummary>(LOAD_FORMAT, key, bytes).map(|s| s.counts()),
        _ => decode_as::<LoadRecord>(FORMAT, key, bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_resolve_within_a_level_of_the_hottest_and_keep_totals() {
        let counts: Vec<u32> = (0..256u32).map(|e| (e * 7919) % 100_003).collect();
        let rec = LoadRecord {
            router: "r".into(),
            window_ms: 60_000,
            layers: vec![(3, counts.clone()), (4, vec![0; 256])],
        };
        let bytes = encode_load(&rec);
        assert_eq!(bytes[0], LOAD_FORMAT);
        let back = decode_load("k", &bytes).expect("decodes");
        assert_eq!((back.router.as_str(), back.window_ms), ("r", 60_000));
        let max = f64::from(*counts.iter().max().expect("some"));
        for (&a, &b) in counts.iter().zip(&back.layers[0].1) {
            assert!(
                (f64::from(a) - f64::from(b)).abs() <= max / 65_535.0 + 1.0,
                "{a} {b}"
            );
        }
        assert_eq!(back.layers[1], (4, vec![0; 256]));
        let summary: LoadSummary = decode_as(LOAD_FORMAT, "k", &bytes).expect("summary");
        assert_eq!(
            summary.layers[0].total,
            counts.iter().map(|&c| u64::from(c)).sum::<u64>()
        );
        // Two bytes an expert: well under the varint counts.
        assert!(bytes.len() < super::super::encode(&rec).len());
        // A router of the previous format is still read.
        let old = super::super::encode(&rec);
        assert_eq!(decode_load("k", &old).expect("format 2"), rec);
    }
}
