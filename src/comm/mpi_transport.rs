//! MPI transport for host-memory buffers (the CPU backend).

use super::host::HostGroups;
use super::{ordered_recv_parts, CommError, Group, RecvPart, Result, SendPart, Timed, Transport};
use crate::backend::cpu::CpuBackend;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::Instant;

/// Moves `Vec<f32>` buffers with MPI collectives and point-to-point messages.
pub struct MpiTransport {
    groups: HostGroups,
}

impl MpiTransport {
    pub fn new(world: SimpleCommunicator) -> Self {
        Self { groups: HostGroups::new(world) }
    }
}

/// Runs a blocking MPI call between two instants.
fn timed(op: impl FnOnce() -> Result<()>) -> Result<Timed<Instant>> {
    let start = Instant::now();
    op()?;
    let end = Instant::now();
    Ok(Timed { start, end, done: end })
}

impl Transport<CpuBackend> for MpiTransport {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn world(&mut self, _backend: &CpuBackend) -> Result<Group> {
        Ok(self.groups.world())
    }

    fn split(&mut self, _backend: &CpuBackend, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>> {
        self.groups.split(parent, color, id, name)
    }

    fn all_reduce_sum(&self, _b: &CpuBackend, group: &Group, buf: &mut Vec<f32>) -> Result<Timed<Instant>> {
        let comm = self.groups.comm(group)?;
        timed(|| {
            let send = buf.clone();
            comm.all_reduce_into(&send[..], &mut buf[..], SystemOperation::sum());
            Ok(())
        })
    }

    fn all_gather(&self, _b: &CpuBackend, group: &Group, send: &Vec<f32>, recv: &mut Vec<f32>) -> Result<Timed<Instant>> {
        if recv.len() != send.len() * group.size() {
            return Err(CommError::Size(format!("all_gather: recv {} != {} x {}", recv.len(), group.size(), send.len())));
        }
        let comm = self.groups.comm(group)?;
        timed(|| {
            comm.all_gather_into(&send[..], &mut recv[..]);
            Ok(())
        })
    }

    fn reduce_scatter_sum(&self, _b: &CpuBackend, group: &Group, send: &Vec<f32>, recv: &mut Vec<f32>) -> Result<Timed<Instant>> {
        if send.len() != recv.len() * group.size() {
            return Err(CommError::Size(format!("reduce_scatter: send {} != {} x {}", send.len(), group.size(), recv.len())));
        }
        let comm = self.groups.comm(group)?;
        timed(|| {
            comm.reduce_scatter_block_into(&send[..], &mut recv[..], SystemOperation::sum());
            Ok(())
        })
    }

    fn broadcast(&self, _b: &CpuBackend, group: &Group, root: usize, buf: &mut Vec<f32>) -> Result<Timed<Instant>> {
        let comm = self.groups.comm(group)?;
        timed(|| {
            comm.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
            Ok(())
        })
    }

    fn exchange(&self, _b: &CpuBackend, group: &Group, sends: &[SendPart<'_, CpuBackend>], recv: Option<&mut Vec<f32>>, recvs: &[RecvPart]) -> Result<Timed<Instant>> {
        let comm = self.groups.comm(group)?;
        for p in sends {
            if p.range.end > p.buf.len() || p.peer >= group.size() {
                return Err(CommError::Size(format!("send of elements {:?} of {} to rank {} of `{}`", p.range, p.buf.len(), p.peer, group.name)));
            }
        }
        let mut empty = Vec::new();
        let buf = recv.unwrap_or(&mut empty);
        ordered_recv_parts(recvs, buf.len())?;
        if let Some(p) = recvs.iter().find(|p| p.peer >= group.size()) {
            return Err(CommError::Size(format!("receive from rank {} of `{}` ({} ranks)", p.peer, group.name, group.size())));
        }
        timed(|| {
            // Disjoint slices of the receive buffer, indexed like `recvs`.
            let mut order: Vec<usize> = (0..recvs.len()).collect();
            order.sort_by_key(|&i| recvs[i].range.start);
            let mut slices: Vec<Option<&mut [f32]>> = (0..recvs.len()).map(|_| None).collect();
            let mut rest: &mut [f32] = &mut buf[..];
            let mut at = 0;
            for i in order {
                let r = &recvs[i].range;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
                let (slice, tail) = tail.split_at_mut(r.len());
                slices[i] = Some(slice);
                rest = tail;
                at = r.end;
            }
            mpi::request::scope(|scope| {
                // Sends first (non-blocking), then each receive in the order
                // its peer sends: no order of peers can deadlock.
                let sent: Vec<_> = sends.iter().map(|p| comm.process_at_rank(p.peer as i32).immediate_send(scope, &p.buf[p.range.clone()])).collect();
                let mut outcome = Ok(());
                for (p, slice) in recvs.iter().zip(slices) {
                    let slice = slice.expect("every part has a slice");
                    let (msg, status) = comm.process_at_rank(p.peer as i32).matched_probe();
                    let count = status.count(f32::equivalent_datatype()) as usize;
                    if count != slice.len() && outcome.is_ok() {
                        outcome = Err(CommError::Size(format!("receive from rank {} of `{}`: got {count} elements, expected {}", p.peer, group.name, slice.len())));
                    }
                    if count == slice.len() {
                        msg.matched_receive_into(slice);
                    } else {
                        let mut sink = vec![0f32; count];
                        msg.matched_receive_into(&mut sink[..]);
                    }
                }
                for r in sent {
                    r.wait();
                }
                outcome
            })
        })
    }

    /// `MPI_Alltoallv` over the group's communicator.
    fn all_to_all_v(&self, _b: &CpuBackend, group: &Group, send: &Vec<f32>, send_counts: &[usize], recv: &mut Vec<f32>, recv_counts: &[usize]) -> Result<Timed<Instant>> {
        let n = group.size();
        let (sent, received): (usize, usize) = (send_counts.iter().sum(), recv_counts.iter().sum());
        if send_counts.len() != n || recv_counts.len() != n || sent > send.len() || received > recv.len() {
            return Err(CommError::Size(format!("all_to_all_v on `{}` of {n} ranks: counts {send_counts:?} of {} sent, {recv_counts:?} of {} received", group.name, send.len(), recv.len())));
        }
        let layout = |counts: &[usize]| -> Result<(Vec<i32>, Vec<i32>)> {
            let to_i32 = |v: usize| i32::try_from(v).map_err(|_| CommError::Size(format!("all_to_all_v on `{}`: {v} elements exceed MPI's int counts", group.name)));
            let counts = counts.iter().map(|&c| to_i32(c)).collect::<Result<Vec<_>>>()?;
            let mut at = 0usize;
            let displs = counts.iter().map(|&c| {
                let d = at;
                at += c as usize;
                to_i32(d)
            });
            Ok((counts.clone(), displs.collect::<Result<Vec<_>>>()?))
        };
        let (sc, sd) = layout(send_counts)?;
        let (rc, rd) = layout(recv_counts)?;
        let comm = self.groups.comm(group)?;
        timed(|| {
            let sendbuf = Partition::new(&send[..sent], &sc[..], &sd[..]);
            let mut recvbuf = PartitionMut::new(&mut recv[..received], &rc[..], &rd[..]);
            comm.all_to_all_varcount_into(&sendbuf, &mut recvbuf);
            Ok(())
        })
    }

    fn host_broadcast(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()> {
        self.groups.broadcast_u32(group, root, data)
    }

    fn host_send(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()> {
        self.groups.send_u32(group, dst, data)
    }

    fn host_recv(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()> {
        self.groups.recv_u32(group, src, data)
    }

    fn host_all_to_all(&self, group: &Group, send: &[u32], recv: &mut [u32]) -> Result<()> {
        self.groups.all_to_all_u32(group, send, recv)
    }
}
