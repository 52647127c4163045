//! What the scheduler runs: the backbone plus an expert backend, local (`moe serve`) or remote
//! (`moe router`).

use moe_model::model::{Backbone, LogitsMode, Model, SeqInput};
use moe_model::{Config, ExpertBackend, Matrix};

use crate::dispatch::RemoteExperts;

/// A loaded engine.
pub struct Engine {
    backbone: Backbone,
    experts: Box<dyn ExpertBackend>,
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
        }
    }

    /// The backbone with any expert backend (tests inject failing ones).
    pub fn with_backend(backbone: Backbone, experts: Box<dyn ExpertBackend>) -> Engine {
        Engine { backbone, experts }
    }

    /// The backbone here, routed experts on expert nodes.
    pub fn remote(backbone: Backbone, experts: std::sync::Arc<RemoteExperts>) -> Engine {
        Engine {
            backbone,
            experts: Box::new(experts),
        }
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
            .forward(seqs, self.experts.as_ref(), mode, None)
    }
}
