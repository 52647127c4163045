//! What the scheduler runs: the backbone plus an expert backend, local (`moe serve`) or remote
//! (`moe router`).

use moe_model::model::{Backbone, LogitsMode, Model, SeqInput};
use moe_model::{Config, ExpertBackend, Matrix};

use crate::dispatch::RemoteExperts;

/// A loaded engine.
pub struct Engine {
    backbone: Backbone,
    experts: Box<dyn ExpertBackend>,
    remote: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("remote", &self.remote)
            .finish()
    }
}

struct Shared(std::sync::Arc<RemoteExperts>);

impl ExpertBackend for Shared {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a moe_model::gate::Routing,
    ) -> moe_model::Result<Box<dyn moe_model::PendingExperts + 'a>> {
        self.0.dispatch(layer, x, routing)
    }
}

impl Engine {
    /// Everything in this process.
    pub fn local(model: Model) -> Engine {
        Engine {
            backbone: model.backbone,
            experts: Box::new(model.experts),
            remote: false,
        }
    }

    /// The backbone here, routed experts on expert nodes.
    pub fn remote(backbone: Backbone, experts: std::sync::Arc<RemoteExperts>) -> Engine {
        Engine {
            backbone,
            experts: Box::new(Shared(experts)),
            remote: true,
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
