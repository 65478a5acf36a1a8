//! NCCL transport for device buffers (the CUDA backend).
//!
//! Each group gets its own NCCL communicator when it is created (the MPI
//! split of [`HostGroups`] first): group rank 0 asks NCCL for a unique id,
//! broadcasts its 128 bytes over the group's MPI communicator, and every
//! member calls `ncclCommInitRank` (a collective over the group).
//! Communicators are keyed by `Group::id`; host messages (token ids) go over
//! the groups' MPI communicators.
//!
//! Every communicator has a stream of its own, so messages run beside the
//! kernels: before a message its stream waits for the compute stream (the
//! data it sends and the buffer it fills are ready), the message is timed by
//! events on its own stream, and the compute stream waits for its completion
//! only where `Comm` completes it (where the data is used). One stream per
//! communicator keeps each communicator's messages in the order every member
//! issues them, and no communicator's messages queue behind another's (FA
//! Pool's hand-offs and returns use two). The element type NCCL moves is the
//! buffer's own dtype (bf16, fp16, or f32 for log-sum-exp buffers), so the
//! bytes on the wire are the bytes the buffer holds.
//!
//! NVLink SHARP (multicast) is left to the environment (`NCCL_NVLS_ENABLE`):
//! this module sets no NCCL option. It must not know about strategies or
//! categories of traffic; `Comm` records those.

use super::host::HostGroups;
use super::{ordered_recv_parts, CommError, Group, RecvPart, Result, SendPart, Timed, Transport};
use crate::backend::cuda::{CudaBackend, CudaBuf};
use crate::backend::Dtype;
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{result as nccl, sys as nccl_sys};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One NCCL communicator, aborted when dropped.
struct NcclComm {
    raw: nccl_sys::ncclComm_t,
    size: usize,
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: destroy may wait for peers, and ranks
        // drop their communicators at different times at exit. The owning
        // transport synchronises the stream first, so nothing is in flight.
        // SAFETY: `raw` is a live communicator owned by this value only.
        let _ = unsafe { nccl::comm_abort(self.raw) };
    }
}

/// Moves [`CudaBuf`]s with NCCL, each communicator on its own stream.
pub struct NcclTransport {
    groups: HostGroups,
    comms: BTreeMap<usize, NcclComm>,
    /// Every communicator's stream, by group id.
    streams: BTreeMap<usize, Arc<CudaStream>>,
    /// The compute stream, drained (with the others) before communicators are torn down.
    compute: Option<Arc<CudaStream>>,
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        for s in self.compute.iter().chain(self.streams.values()) {
            let _ = s.synchronize();
        }
        self.comms.clear();
    }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> CommError {
    CommError::Nccl(format!("{what}: {e:?}"))
}

fn data_type(d: Dtype) -> nccl_sys::ncclDataType_t {
    match d {
        Dtype::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
        Dtype::Fp16 => nccl_sys::ncclDataType_t::ncclFloat16,
        Dtype::Fp32 => nccl_sys::ncclDataType_t::ncclFloat32,
    }
}

impl NcclTransport {
    pub fn new(world: SimpleCommunicator) -> Self {
        Self { groups: HostGroups::new(world), comms: BTreeMap::new(), streams: BTreeMap::new(), compute: None }
    }

    fn comm(&self, group: &Group) -> Result<&NcclComm> {
        self.comms.get(&group.id).ok_or_else(|| CommError::Nccl(format!("group `{}` (id {}) has no NCCL communicator: it was not attached", group.name, group.id)))
    }

    fn stream(&self, group: &Group) -> Result<&Arc<CudaStream>> {
        self.streams.get(&group.id).ok_or_else(|| CommError::Nccl(format!("group `{}` (id {}) has no stream: it was not attached", group.name, group.id)))
    }

    fn peer(group: &Group, peer: usize) -> Result<i32> {
        if peer >= group.size() {
            return Err(CommError::Size(format!("peer {peer} is outside group `{}` of {} ranks", group.name, group.size())));
        }
        Ok(peer as i32)
    }
}

impl NcclTransport {
    /// Creates the NCCL communicator of `group` (collective over its members).
    fn attach(&mut self, backend: &CudaBackend, group: &Group) -> Result<()> {
        // The bindings abort the process on a missing library: look first.
        if crate::backend::cuda::probe::nccl_library().is_none() {
            return Err(CommError::Nccl("the NCCL library (libnccl.so) was not found".into()));
        }
        let mut id = [0u8; 128];
        if group.rank() == 0 {
            let uid = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            for (b, c) in id.iter_mut().zip(uid.internal.iter()) {
                *b = *c as u8;
            }
        }
        self.groups.comm(group)?.process_at_rank(0).broadcast_into(&mut id[..]);
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(id.iter()) {
            *c = *b as std::ffi::c_char;
        }
        // NCCL binds the communicator to the calling thread's current device.
        backend.bind_to_thread()?;
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; every member of the group
        // makes this call with the same id, size and its own rank.
        unsafe { nccl::comm_init_rank(&mut raw, group.size() as i32, nccl_sys::ncclUniqueId { internal }, group.rank() as i32) }.map_err(|e| nccl_err("ncclCommInitRank", e))?;
        self.compute.get_or_insert_with(|| backend.stream().clone());
        self.streams.insert(group.id, backend.new_message_stream()?);
        self.comms.insert(group.id, NcclComm { raw, size: group.size() });
        Ok(())
    }

    /// Queues `op` on `group`'s stream after the work queued so far on the
    /// compute stream, timed by marks on that stream; returns the marks and
    /// the completion point.
    fn on_stream(&self, backend: &CudaBackend, group: &Group, op: impl FnOnce(nccl_sys::cudaStream_t) -> Result<()>) -> Result<Timed<CudaEvent>> {
        let stream = self.stream(group)?;
        backend.fence_to(stream)?;
        let start = backend.mark_on(stream)?;
        op(stream.cu_stream() as nccl_sys::cudaStream_t)?;
        let end = backend.mark_on(stream)?;
        Ok(Timed { start, end, done: backend.point_on(stream)? })
    }
}

impl Transport<CudaBackend> for NcclTransport {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn world(&mut self, backend: &CudaBackend) -> Result<Group> {
        let world = self.groups.world();
        self.attach(backend, &world)?;
        Ok(world)
    }

    fn split(&mut self, backend: &CudaBackend, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>> {
        let group = self.groups.split(parent, color, id, name)?;
        if let Some(g) = &group {
            self.attach(backend, g)?;
        }
        Ok(group)
    }

    fn all_reduce_sum(&self, backend: &CudaBackend, group: &Group, buf: &mut CudaBuf) -> Result<Timed<CudaEvent>> {
        let c = self.comm(group)?;
        let p = buf.device_ptr();
        self.on_stream(backend, group, |stream| {
            // SAFETY: in-place reduction over `len` elements of the buffer's
            // own type, queued on the stream that owns the buffer.
            unsafe { nccl::all_reduce(p as *const _, p as *mut _, buf.len(), data_type(buf.dtype()), nccl_sys::ncclRedOp_t::ncclSum, c.raw, stream) }.map_err(|e| nccl_err("ncclAllReduce", e))?;
            Ok(())
        })
    }

    fn all_gather(&self, backend: &CudaBackend, group: &Group, send: &CudaBuf, recv: &mut CudaBuf) -> Result<Timed<CudaEvent>> {
        let c = self.comm(group)?;
        if recv.len() != send.len() * c.size {
            return Err(CommError::Size(format!("all_gather on `{}`: recv {} != {} x {}", group.name, recv.len(), c.size, send.len())));
        }
        if recv.dtype() != send.dtype() {
            return Err(CommError::Size(format!("all_gather on `{}`: send is {}, recv is {}", group.name, send.dtype(), recv.dtype())));
        }
        self.on_stream(backend, group, |stream| {
            // SAFETY: `recv` holds size x len(send) elements of the same type
            // (checked above); both are queued on their owning stream.
            unsafe { nccl::all_gather(send.device_ptr() as *const _, recv.device_ptr() as *mut _, send.len(), data_type(send.dtype()), c.raw, stream) }.map_err(|e| nccl_err("ncclAllGather", e))?;
            Ok(())
        })
    }

    fn reduce_scatter_sum(&self, backend: &CudaBackend, group: &Group, send: &CudaBuf, recv: &mut CudaBuf) -> Result<Timed<CudaEvent>> {
        let c = self.comm(group)?;
        if send.len() != recv.len() * c.size || send.dtype() != recv.dtype() {
            return Err(CommError::Size(format!("reduce_scatter on `{}`: send {} {} != {} x {} {}", group.name, send.len(), send.dtype(), c.size, recv.len(), recv.dtype())));
        }
        self.on_stream(backend, group, |stream| {
            // SAFETY: `send` holds size x len(recv) elements of `recv`'s type
            // (checked above); both are queued on their owning stream.
            unsafe { nccl::reduce_scatter(send.device_ptr() as *const _, recv.device_ptr() as *mut _, recv.len(), data_type(recv.dtype()), nccl_sys::ncclRedOp_t::ncclSum, c.raw, stream) }
                .map_err(|e| nccl_err("ncclReduceScatter", e))?;
            Ok(())
        })
    }

    fn broadcast(&self, backend: &CudaBackend, group: &Group, root: usize, buf: &mut CudaBuf) -> Result<Timed<CudaEvent>> {
        let c = self.comm(group)?;
        let root = Self::peer(group, root)?;
        let p = buf.device_ptr();
        self.on_stream(backend, group, |stream| {
            // SAFETY: in-place broadcast of the buffer's `len` elements.
            unsafe { nccl::broadcast(p as *const _, p as *mut _, buf.len(), data_type(buf.dtype()), root, c.raw, stream) }.map_err(|e| nccl_err("ncclBroadcast", e))?;
            Ok(())
        })
    }

    /// Every receiver must post parts of the same lengths and dtype as the
    /// matching sends: NCCL cannot detect a mismatch (it would hang or
    /// corrupt), unlike MPI.
    fn exchange(&self, backend: &CudaBackend, group: &Group, sends: &[SendPart<'_, CudaBackend>], recv: Option<&mut CudaBuf>, recvs: &[RecvPart]) -> Result<Timed<CudaEvent>> {
        let c = self.comm(group)?;
        for p in sends {
            Self::peer(group, p.peer)?;
            if p.range.end > p.buf.len() {
                return Err(CommError::Size(format!("send of elements {:?} of {} on `{}`", p.range, p.buf.len(), group.name)));
            }
        }
        let (recv_ptr, recv_len, recv_dtype) = match &recv {
            Some(b) => (b.device_ptr(), b.len(), b.dtype()),
            None => (0, 0, Dtype::Fp32),
        };
        ordered_recv_parts(recvs, recv_len)?;
        for p in recvs {
            Self::peer(group, p.peer)?;
        }
        self.on_stream(backend, group, |stream| {
            nccl::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
            let mut issued = Ok(());
            for p in sends {
                let es = p.buf.dtype().size_bytes() as u64;
                // SAFETY: reads elements `range` of the buffer (checked above) on its owning stream.
                let r = unsafe { nccl::send((p.buf.device_ptr() + p.range.start as u64 * es) as *const _, p.range.len(), data_type(p.buf.dtype()), p.peer as i32, c.raw, stream) };
                issued = issued.and(r.map(|_| ()).map_err(|e| nccl_err("ncclSend", e)));
            }
            for p in recvs {
                let es = recv_dtype.size_bytes() as u64;
                // SAFETY: writes elements `range` of the receive buffer (checked above) on its owning stream.
                let r = unsafe { nccl::recv((recv_ptr + p.range.start as u64 * es) as *mut _, p.range.len(), data_type(recv_dtype), p.peer as i32, c.raw, stream) };
                issued = issued.and(r.map(|_| ()).map_err(|e| nccl_err("ncclRecv", e)));
            }
            // The group must be closed whatever happened inside it.
            let ended = nccl::group_end().map(|_| ()).map_err(|e| nccl_err("ncclGroupEnd", e));
            issued.and(ended)
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
