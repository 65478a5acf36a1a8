//! MPI communicators behind the groups, for the transports that run on real
//! ranks: creating a group is a collective MPI split, and small host-side
//! messages (token ids) travel over the group's MPI communicator. The MPI
//! transport moves CPU buffers over the same communicators; the NCCL
//! transport bootstraps its own communicators over them.

use super::{CommError, Group, Result};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::collections::BTreeMap;

/// The MPI communicator of every group this rank belongs to, by group id.
pub struct HostGroups {
    comms: BTreeMap<usize, SimpleCommunicator>,
}

impl HostGroups {
    /// The world communicator, as group 0.
    pub fn new(world: SimpleCommunicator) -> Self {
        let mut comms = BTreeMap::new();
        comms.insert(0, world);
        Self { comms }
    }

    /// The world as a group.
    pub fn world(&self) -> Group {
        let w = &self.comms[&0];
        Group::new(0, "world", (0..w.size() as usize).collect(), w.rank() as usize)
    }

    /// The group's communicator.
    pub fn comm(&self, group: &Group) -> Result<&SimpleCommunicator> {
        self.comms.get(&group.id).ok_or_else(|| CommError::Protocol(format!("group `{}` (id {}) has no communicator on this rank", group.name, group.id)))
    }

    /// Splits `parent` collectively (ranks with the same color form a group,
    /// ordered by their parent rank; `None` opts out).
    pub fn split(&mut self, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>> {
        let c = match color {
            Some(c) => Color::with_value(c as i32),
            None => Color::undefined(),
        };
        let Some(comm) = self.comm(parent)?.split_by_color(c) else {
            return Ok(None);
        };
        let me = parent.world_ranks[parent.rank()] as u64;
        let mut ranks = vec![0u64; comm.size() as usize];
        comm.all_gather_into(&me, &mut ranks[..]);
        let group = Group::new(id, name, ranks.into_iter().map(|r| r as usize).collect(), comm.rank() as usize);
        self.comms.insert(id, comm);
        Ok(Some(group))
    }

    pub fn broadcast_u32(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()> {
        self.comm(group)?.process_at_rank(root as i32).broadcast_into(data);
        Ok(())
    }

    pub fn send_u32(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()> {
        self.comm(group)?.process_at_rank(dst as i32).send(data);
        Ok(())
    }

    pub fn all_to_all_u32(&self, group: &Group, send: &[u32], recv: &mut [u32]) -> Result<()> {
        if send.len() != recv.len() || send.len() % group.size() != 0 {
            return Err(CommError::Size(format!("host all-to-all on `{}` of {} ranks: {} sent, {} received", group.name, group.size(), send.len(), recv.len())));
        }
        self.comm(group)?.all_to_all_into(send, recv);
        Ok(())
    }

    pub fn recv_u32(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()> {
        self.comm(group)?.process_at_rank(src as i32).receive_into(data);
        Ok(())
    }
}
