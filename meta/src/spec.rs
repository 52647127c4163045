//! Expert specs: which (layer, expert) pairs a node hosts, as text.
//!
//! Grammar: `GROUP[;GROUP...]`, `GROUP = LAYERS:EXPERTS`, each side a comma list of `N` or `A-B`
//! (inclusive), or `*` for all. Examples: `1-3:0-127`, `1:0-63;2,3:64-127`, `*:*`.

use std::collections::BTreeSet;

use crate::placement::PlacementError;

/// A parsed expert spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSpec {
    groups: Vec<(Sel, Sel)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sel {
    All,
    Some(BTreeSet<usize>),
}

impl Sel {
    fn parse(s: &str, spec: &str) -> Result<Sel, PlacementError> {
        let bad = |why: String| PlacementError::Spec {
            spec: spec.to_string(),
            why,
        };
        if s.trim() == "*" {
            return Ok(Sel::All);
        }
        let mut set = BTreeSet::new();
        for part in s.split(',') {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let a: usize = a
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{part}` is not a number or range")))?;
            let b: usize = b
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{part}` is not a number or range")))?;
            if a > b {
                return Err(bad(format!("range `{part}` is empty")));
            }
            set.extend(a..=b);
        }
        Ok(Sel::Some(set))
    }

    fn iter(&self, all: &[usize]) -> Vec<usize> {
        match self {
            Sel::All => all.to_vec(),
            Sel::Some(s) => s.iter().copied().collect(),
        }
    }
}

impl std::str::FromStr for ExpertSpec {
    type Err = PlacementError;
    fn from_str(spec: &str) -> Result<Self, PlacementError> {
        let mut groups = Vec::new();
        for group in spec.split(';').filter(|g| !g.trim().is_empty()) {
            let (l, e) = group.split_once(':').ok_or_else(|| PlacementError::Spec {
                spec: spec.to_string(),
                why: format!("`{group}` needs LAYERS:EXPERTS"),
            })?;
            groups.push((Sel::parse(l, spec)?, Sel::parse(e, spec)?));
        }
        if groups.is_empty() {
            return Err(PlacementError::Spec {
                spec: spec.to_string(),
                why: "empty".into(),
            });
        }
        Ok(ExpertSpec { groups })
    }
}

impl ExpertSpec {
    /// The (layer, expert) pairs selected, given the model's MoE layers and expert count; pairs
    /// outside the model are an error.
    pub fn pairs(
        &self,
        moe_layers: &[usize],
        n_experts: usize,
    ) -> Result<Vec<(usize, usize)>, PlacementError> {
        let all_experts: Vec<usize> = (0..n_experts).collect();
        let mut out = BTreeSet::new();
        for (l, e) in &self.groups {
            for layer in l.iter(moe_layers) {
                if !moe_layers.contains(&layer) {
                    return Err(PlacementError::OutOfModel {
                        layer,
                        expert: None,
                    });
                }
                for expert in e.iter(&all_experts) {
                    if expert >= n_experts {
                        return Err(PlacementError::OutOfModel {
                            layer,
                            expert: Some(expert),
                        });
                    }
                    out.insert((layer, expert));
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_lists_and_stars() {
        let s: ExpertSpec = "1-2:0-2;3:5,7".parse().expect("valid");
        let pairs = s.pairs(&[1, 2, 3], 8).expect("in model");
        assert_eq!(
            pairs,
            vec![
                (1, 0),
                (1, 1),
                (1, 2),
                (2, 0),
                (2, 1),
                (2, 2),
                (3, 5),
                (3, 7)
            ]
        );
        let all: ExpertSpec = "*:*".parse().expect("valid");
        assert_eq!(all.pairs(&[1, 2], 3).expect("ok").len(), 6);
    }

    #[test]
    fn rejects_nonsense_and_out_of_model_pairs() {
        for bad in ["", "1-3", "a:1", "3-1:0", "1:0-x"] {
            assert!(bad.parse::<ExpertSpec>().is_err(), "{bad}");
        }
        let s: ExpertSpec = "0:0".parse().expect("valid");
        assert!(
            s.pairs(&[1, 2, 3], 8)
                .expect_err("must fail")
                .to_string()
                .contains("layer 0")
        );
        let s: ExpertSpec = "1:8".parse().expect("valid");
        assert!(
            s.pairs(&[1], 8)
                .expect_err("must fail")
                .to_string()
                .contains("expert 8")
        );
    }
}
