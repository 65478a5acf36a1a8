//! The baseline: static Megatron-style TP × PP ([`layout`] says who does
//! what, [`dataflow`] what each rank does per phase).

pub mod dataflow;
pub mod layout;

pub use layout::BaselineSpec;

use crate::backend::Backend;
use crate::model::ModelConfig;
use crate::rules::Violation;
use crate::strategy::{BatchShape, BuildContext, Deployment, Layout, RankRange, Result, Strategy};

impl Deployment for BaselineSpec {
    fn kind(&self) -> &'static str {
        "baseline"
    }
    fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.default_name())
    }
    fn rank_range(&self) -> RankRange {
        RankRange { min: self.ranks(), max: self.ranks() }
    }
    fn check(&self, model: &ModelConfig) -> std::result::Result<(), Violation> {
        self.check_rules(model)
    }
    fn layout(&self, world: usize) -> Layout {
        self.layout_of(world)
    }
    fn memory_bytes(&self, model: &ModelConfig, shape: BatchShape, _world: usize, elem: usize) -> u64 {
        self.memory_of(model, shape, elem)
    }
}

/// This rank's part of the deployment (collective over the world).
pub fn build<'a, 'c, B: Backend>(spec: &BaselineSpec, cx: BuildContext<'a, 'c, B>) -> Result<Box<dyn Strategy<B> + 'a>> {
    let layout = spec.layout(cx.world.size());
    Ok(Box::new(dataflow::Baseline::new(cx, spec, &spec.name(), &layout)?))
}
