//! What the scheduler runs: the backbone plus an expert backend, local (`moe serve`) or remote
//! (`moe router`).

use moe_model::model::{Backbone, LogitsMode, Model, SeqInput};
use moe_model::{Config, ExpertBackend, Matrix, Overlap};

use crate::dispatch::RemoteExperts;

/// A loaded engine.
pub struct Engine {
    backbone: Backbone,
    experts: Box<dyn ExpertBackend>,
    /// Two-batch overlap of each step ([`moe_model::overlap`]).
    overlap: Overlap,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// Everything in this process.
    pub fn local(model: Model) -> Engine {
        Engine {
            backbone: model.backbone,
            experts: Box::new(model.experts),
            overlap: Overlap::default(),
        }
    }

    /// The backbone with any expert backend (tests inject failing ones).
    pub fn with_backend(backbone: Backbone, experts: Box<dyn ExpertBackend>) -> Engine {
        Engine {
            backbone,
            experts,
            overlap: Overlap::default(),
        }
    }

    /// The backbone here, routed experts on expert nodes.
    pub fn remote(backbone: Backbone, experts: std::sync::Arc<RemoteExperts>) -> Engine {
        Engine {
            backbone,
            experts: Box::new(experts),
            overlap: Overlap::default(),
        }
    }

    /// Sets two-batch overlap (`auto` by default: on for remote experts and batches big enough).
    pub fn with_overlap(mut self, overlap: Overlap) -> Engine {
        self.overlap = overlap;
        self
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        self.backbone.config()
    }

    /// One forward pass.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        mode: LogitsMode,
    ) -> moe_model::Result<Vec<Matrix>> {
        self.backbone
            .forward_with(seqs, self.experts.as_ref(), mode, None, self.overlap)
    }
}
