//! FA Pool: a base group (TP=B) runs embedding, FFNs and the LM head; when a
//! batch's sequence length crosses the threshold, an attention pool of extra
//! ranks takes over attention, split along the sequence ([`layout`] says who
//! does what, [`dataflow`] what each rank does per phase).

mod base;
pub mod dataflow;
pub mod layout;
mod pool;
pub mod units;

pub use layout::{FapoolSpec, Partition};

use crate::backend::Backend;
use crate::model::ModelConfig;
use crate::rules::Violation;
use crate::strategy::{BatchShape, BuildContext, Deployment, Layout, RankRange, Result, Strategy};

impl Deployment for FapoolSpec {
    fn kind(&self) -> &'static str {
        "fapool"
    }
    fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.default_name())
    }
    fn rank_range(&self) -> RankRange {
        RankRange { min: self.base + 1, max: self.base + self.pool_max }
    }
    fn check(&self, model: &ModelConfig) -> std::result::Result<(), Violation> {
        self.check_rules(model)
    }
    fn check_prompts(&self, lengths: &[usize]) -> std::result::Result<(), Violation> {
        self.check_prompt_rules(lengths.iter().copied().filter(|&s| s > self.threshold).min())
    }
    fn layout(&self, world: usize) -> Layout {
        self.layout_of(world)
    }
    fn memory_bytes(&self, model: &ModelConfig, shape: BatchShape, world: usize, elem: usize) -> u64 {
        self.memory_of(model, shape, world, elem)
    }
}

/// This rank's part of the deployment (collective over the world).
pub fn build<'a, 'c, B: Backend>(spec: &FapoolSpec, cx: BuildContext<'a, 'c, B>) -> Result<Box<dyn Strategy<B> + 'a>> {
    // The groups alone: every rank of a plan's thousand builds them, and the
    // roles of the whole world are not needed here.
    let families = spec.group_families(cx.world.size());
    Ok(Box::new(dataflow::Fapool::new(cx, spec, &spec.name(), &families)?))
}
