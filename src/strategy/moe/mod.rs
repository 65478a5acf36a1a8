//! The MoE deployment: a model with a mixture-of-experts FFN under expert,
//! tensor (with sequence), pipeline and data parallelism ([`layout`] says
//! who does what, [`dataflow`] what each rank does per phase, [`experts`]
//! the expert FFN with its all-to-alls, [`shards`] the weights a rank holds).

pub mod dataflow;
pub mod experts;
pub mod layout;
pub mod shards;

pub use layout::MoeSpec;

use crate::backend::Backend;
use crate::model::ModelConfig;
use crate::rules::Violation;
use crate::strategy::{BatchShape, BuildContext, Deployment, Layout, RankRange, Result, Strategy};

impl Deployment for MoeSpec {
    fn kind(&self) -> &'static str {
        "moe"
    }
    fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.default_name())
    }
    /// Exactly t × p × d ranks.
    fn rank_range(&self) -> RankRange {
        RankRange { min: self.ranks(), max: self.ranks() }
    }
    fn check(&self, model: &ModelConfig) -> std::result::Result<(), Violation> {
        self.check_rules(model)
    }
    fn serves_experts(&self) -> bool {
        true
    }
    fn layout(&self, world: usize) -> Layout {
        self.layout_of(world)
    }
    fn memory_bytes(&self, model: &ModelConfig, shape: BatchShape, _world: usize, elem: usize) -> u64 {
        self.memory_of(model, shape, elem)
    }
}

/// This rank's part of the deployment (collective over the world).
pub fn build<'a, 'c, B: Backend>(spec: &MoeSpec, cx: BuildContext<'a, 'c, B>) -> Result<Box<dyn Strategy<B> + 'a>> {
    let layout = spec.layout(cx.world.size());
    Ok(Box::new(dataflow::Moe::new(cx, spec, &spec.name(), &layout)?))
}
