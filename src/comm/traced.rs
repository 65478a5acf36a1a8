//! The transport under a traced backend: a transport of the inner backend,
//! moving the same buffers (a [`Traced`] backend's buffers are the inner
//! backend's). Messages are recorded by `Comm` as always; this only lets
//! the strategies run on a backend that can trace its operations.

use super::{Group, RecvPart, Result, SendPart, Timed, Transport};
use crate::backend::traced::Traced;
use crate::backend::Backend;

/// `T`, a transport for `B`, serving `Traced<B>`.
pub struct TracedTransport<T>(pub T);

impl<B: Backend, T: Transport<B>> Transport<Traced<B>> for TracedTransport<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn world(&mut self, backend: &Traced<B>) -> Result<Group> {
        self.0.world(backend.inner())
    }
    fn split(&mut self, backend: &Traced<B>, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>> {
        self.0.split(backend.inner(), parent, color, id, name)
    }
    fn all_reduce_sum(&self, backend: &Traced<B>, group: &Group, buf: &mut B::Buf) -> Result<Timed<B::Mark>> {
        self.0.all_reduce_sum(backend.inner(), group, buf)
    }
    fn all_gather(&self, backend: &Traced<B>, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<Timed<B::Mark>> {
        self.0.all_gather(backend.inner(), group, send, recv)
    }
    fn broadcast(&self, backend: &Traced<B>, group: &Group, root: usize, buf: &mut B::Buf) -> Result<Timed<B::Mark>> {
        self.0.broadcast(backend.inner(), group, root, buf)
    }
    fn reduce_scatter_sum(&self, backend: &Traced<B>, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<Timed<B::Mark>> {
        self.0.reduce_scatter_sum(backend.inner(), group, send, recv)
    }
    fn exchange(&self, backend: &Traced<B>, group: &Group, sends: &[SendPart<'_, Traced<B>>], recv: Option<&mut B::Buf>, recvs: &[RecvPart]) -> Result<Timed<B::Mark>> {
        let sends: Vec<SendPart<'_, B>> = sends.iter().map(|p| SendPart { peer: p.peer, buf: p.buf, range: p.range.clone() }).collect();
        self.0.exchange(backend.inner(), group, &sends, recv, recvs)
    }
    fn all_to_all_v(&self, backend: &Traced<B>, group: &Group, send: &B::Buf, send_counts: &[usize], recv: &mut B::Buf, recv_counts: &[usize]) -> Result<Timed<B::Mark>> {
        self.0.all_to_all_v(backend.inner(), group, send, send_counts, recv, recv_counts)
    }
    fn host_all_to_all(&self, group: &Group, send: &[u32], recv: &mut [u32]) -> Result<()> {
        self.0.host_all_to_all(group, send, recv)
    }
    fn host_broadcast(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()> {
        self.0.host_broadcast(group, root, data)
    }
    fn host_send(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()> {
        self.0.host_send(group, dst, data)
    }
    fn host_recv(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()> {
        self.0.host_recv(group, src, data)
    }
}
