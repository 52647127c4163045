//! Which tensors a process loads: everything, everything except routed experts (a router), or a
//! set of (layer, expert) pairs (an expert node). MTP layers (`model.layers.{L}` with
//! `L >= num_hidden_layers`) are never selected.

use std::collections::HashSet;

/// What a tensor name is, as far as selection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// `model.layers.{layer}.mlp.experts.{expert}.*`
    RoutedExpert { layer: usize, expert: usize },
    /// A decoder-layer tensor outside the routed experts.
    Layer { layer: usize },
    /// Embeddings, final norm, LM head, anything else.
    Global,
}

/// Classifies a tensor name: V3 (`model.layers.L.mlp.experts.E.*`) and DeepSeek-V4, HF-saved
/// (`model.layers.L.ffn.experts.E.*`) or official (`layers.L.ffn.experts.E.*`). V4's official
/// MTP tensors (`mtp.*`) count as a layer past every model's last, so no filter selects them.
pub fn classify(name: &str) -> TensorKind {
    if name.starts_with("mtp.") {
        return TensorKind::Layer { layer: usize::MAX };
    }
    let Some(rest) = name
        .strip_prefix("model.layers.")
        .or_else(|| name.strip_prefix("layers."))
    else {
        return TensorKind::Global;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return TensorKind::Global;
    };
    let Ok(layer) = layer.parse() else {
        return TensorKind::Global;
    };
    if let Some(rest) = rest
        .strip_prefix("mlp.experts.")
        .or_else(|| rest.strip_prefix("ffn.experts."))
        && let Some((expert, _)) = rest.split_once('.')
        && let Ok(expert) = expert.parse()
    {
        return TensorKind::RoutedExpert { layer, expert };
    }
    TensorKind::Layer { layer }
}

/// A selection of checkpoint tensors.
#[derive(Debug, Clone)]
pub enum TensorFilter {
    /// Everything of the first `num_layers` layers and the globals.
    All { num_layers: usize },
    /// Everything except routed experts (what a router loads).
    Backbone { num_layers: usize },
    /// Only these routed experts (what an expert node loads).
    Experts(HashSet<(usize, usize)>),
}

impl TensorFilter {
    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        match (self, classify(name)) {
            (TensorFilter::Experts(set), TensorKind::RoutedExpert { layer, expert }) => {
                set.contains(&(layer, expert))
            }
            (TensorFilter::Experts(_), _) => false,
            (TensorFilter::All { num_layers }, TensorKind::RoutedExpert { layer, .. })
            | (TensorFilter::All { num_layers }, TensorKind::Layer { layer })
            | (TensorFilter::Backbone { num_layers }, TensorKind::Layer { layer }) => {
                layer < *num_layers
            }
            (TensorFilter::Backbone { .. }, TensorKind::RoutedExpert { .. }) => false,
            (_, TensorKind::Global) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        assert_eq!(
            classify("model.layers.3.mlp.experts.17.up_proj.weight"),
            TensorKind::RoutedExpert {
                layer: 3,
                expert: 17
            }
        );
        assert_eq!(
            classify("model.layers.3.mlp.shared_experts.up_proj.weight"),
            TensorKind::Layer { layer: 3 }
        );
        assert_eq!(
            classify("model.layers.0.self_attn.o_proj.weight"),
            TensorKind::Layer { layer: 0 }
        );
        assert_eq!(classify("lm_head.weight"), TensorKind::Global);
        for v4 in [
            "model.layers.2.ffn.experts.300.w1.weight",
            "layers.2.ffn.experts.300.w2.weight",
        ] {
            assert_eq!(
                classify(v4),
                TensorKind::RoutedExpert {
                    layer: 2,
                    expert: 300
                }
            );
        }
        assert_eq!(
            classify("layers.2.ffn.shared_experts.w1.weight"),
            TensorKind::Layer { layer: 2 }
        );
        assert!(!TensorFilter::All { num_layers: 61 }.matches("mtp.0.attn.wq_a.weight"));
    }

    #[test]
    fn filters_select_the_right_slices() {
        let expert = "model.layers.1.mlp.experts.5.down_proj.weight";
        let mtp = "model.layers.61.self_attn.o_proj.weight";
        let attn = "model.layers.1.self_attn.o_proj.weight";
        let backbone = TensorFilter::Backbone { num_layers: 61 };
        assert!(!backbone.matches(expert) && backbone.matches(attn) && !backbone.matches(mtp));
        let experts = TensorFilter::Experts([(1, 5)].into_iter().collect());
        assert!(experts.matches(expert) && !experts.matches(attn));
        assert!(!experts.matches("model.layers.1.mlp.experts.6.down_proj.weight"));
        let all = TensorFilter::All { num_layers: 61 };
        assert!(all.matches(expert) && all.matches(attn) && !all.matches(mtp));
    }
}
