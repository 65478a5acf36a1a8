//! The strategies the suite knows, in one list. The job spec's
//! `[[strategy]]` tables deserialize into [`StrategySpec`] (tagged by
//! `kind`), and this is the only place that maps a spec to its deployment and
//! its dataflow: adding a strategy is a folder under `strategy/` and one line
//! in the `strategies!` invocation below.

use super::{BuildContext, Deployment, Result, Strategy};
use crate::backend::Backend;

/// A strategy's folder exposes its spec type (which implements
/// [`Deployment`]) and `build`, which constructs the rank's dataflow.
macro_rules! strategies {
    ($($variant:ident => $module:ident :: $spec:ident),+ $(,)?) => {
        /// One `[[strategy]]` table of a job, tagged by `kind`.
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        pub enum StrategySpec {
            $($variant(super::$module::$spec),)+
        }

        impl StrategySpec {
            /// Every kind name, in registry order.
            pub const KINDS: &'static [&'static str] = &[$(stringify!($module)),+];

            /// The strategy's layout, rules and memory model.
            pub fn deployment(&self) -> &dyn Deployment {
                match self {
                    $(StrategySpec::$variant(s) => s,)+
                }
            }

            /// Builds this rank's part (collective over `cx.world`).
            pub fn build<'a, 'c, B: Backend>(&self, cx: BuildContext<'a, 'c, B>) -> Result<Box<dyn Strategy<B> + 'a>> {
                match self {
                    $(StrategySpec::$variant(s) => super::$module::build(s, cx),)+
                }
            }
        }
    };
}

strategies! {
    Baseline => baseline::BaselineSpec,
    Fapool => fapool::FapoolSpec,
    Moe => moe::MoeSpec,
}

impl StrategySpec {
    pub fn kind(&self) -> &'static str {
        self.deployment().kind()
    }
    pub fn name(&self) -> String {
        self.deployment().name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_the_serialized_tags() {
        for kind in StrategySpec::KINDS {
            let text = match *kind {
                "baseline" => "kind = \"baseline\"\ntp = 1\npp = 1\n".to_string(),
                "fapool" => "kind = \"fapool\"\nbase = 1\npool_max = 1\n".to_string(),
                "moe" => "kind = \"moe\"\n".to_string(),
                other => panic!("add a minimal table for `{other}` to this test"),
            };
            let s: StrategySpec = toml::from_str(&text).unwrap();
            assert_eq!(s.kind(), *kind);
        }
    }
}
