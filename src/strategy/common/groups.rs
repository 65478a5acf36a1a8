//! Creates the communicators a layout lists: one collective split of the
//! world per group family. Every rank of the world calls it; a rank gets the
//! groups it belongs to, by family name.

use crate::backend::Backend;
use crate::comm::{Comm, Group};
use crate::strategy::{protocol, GroupFamily, Result};
use std::collections::BTreeMap;

/// This rank's groups of one strategy, by family name.
pub struct Groups {
    by_family: BTreeMap<&'static str, Group>,
}

impl Groups {
    /// Splits `world` once per family of `families` (a layout's groups;
    /// collective over the world), naming each group `<strategy>/<family>[<index>]`.
    pub fn create<B: Backend>(comm: &Comm<'_, B>, world: &Group, families: &[GroupFamily], strategy: &str) -> Result<Self> {
        let me = world.world_ranks[world.rank()];
        let mut by_family = BTreeMap::new();
        for family in families {
            let mine = family.group_of(me);
            let name = match mine {
                Some((i, _)) if family.groups.len() > 1 => format!("{strategy}/{}{i}", family.name),
                _ => format!("{strategy}/{}", family.name),
            };
            if let Some(g) = comm.split(world, mine.map(|(i, _)| i as u32), &name)? {
                let expected = mine.map(|(_, m)| m).unwrap_or(&[]);
                if g.world_ranks != expected {
                    return Err(protocol(format!("group {name}: the split gave ranks {:?}, the layout lists {expected:?} (members must be in ascending world-rank order)", g.world_ranks)));
                }
                by_family.insert(family.name, g);
            }
        }
        Ok(Self { by_family })
    }

    /// Takes this rank's group of `family`; an error if it has none.
    pub fn take(&mut self, family: &str) -> Result<Group> {
        self.by_family.remove(family).ok_or_else(|| protocol(format!("this rank belongs to no `{family}` group")))
    }
}
