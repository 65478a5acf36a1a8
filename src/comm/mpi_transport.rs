//! MPI transport for host-memory buffers (the CPU backend).

use super::{Group, Result, Transport};
use crate::backend::cpu::CpuBackend;
use mpi::collective::SystemOperation;
use mpi::traits::*;

/// Moves `Vec<f32>` buffers with MPI collectives and blocking point-to-point.
#[derive(Default)]
pub struct MpiTransport;

impl Transport<CpuBackend> for MpiTransport {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn attach(&mut self, _backend: &CpuBackend, _group: &Group) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum(&self, _b: &CpuBackend, group: &Group, buf: &mut Vec<f32>) -> Result<()> {
        let send = buf.clone();
        group.comm.all_reduce_into(&send[..], &mut buf[..], SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, _b: &CpuBackend, group: &Group, send: &Vec<f32>, recv: &mut Vec<f32>) -> Result<()> {
        if recv.len() != send.len() * group.size() {
            return Err(super::CommError::Size(format!("all_gather: recv {} != {} x {}", recv.len(), group.size(), send.len())));
        }
        group.comm.all_gather_into(&send[..], &mut recv[..]);
        Ok(())
    }

    fn broadcast(&self, _b: &CpuBackend, group: &Group, root: usize, buf: &mut Vec<f32>) -> Result<()> {
        group.comm.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn send(&self, _b: &CpuBackend, group: &Group, dst: usize, buf: &Vec<f32>) -> Result<()> {
        group.comm.process_at_rank(dst as i32).send(&buf[..]);
        Ok(())
    }

    fn recv(&self, _b: &CpuBackend, group: &Group, src: usize, buf: &mut Vec<f32>) -> Result<()> {
        let (msg, status) = group.comm.process_at_rank(src as i32).matched_probe();
        let count = status.count(f32::equivalent_datatype()) as usize;
        if count != buf.len() {
            return Err(super::CommError::Size(format!("recv from {src} on {}: got {count} elements, expected {}", group.name, buf.len())));
        }
        msg.matched_receive_into(&mut buf[..]);
        Ok(())
    }
}
