//! Recording a decode step once and replaying it (CUDA graphs), and the
//! timing marks, which must behave differently while a step is recorded.
//!
//! A recording is stream capture in relaxed mode: between
//! [`CudaBackend::begin_recording`] and [`CudaBackend::end_recording`] the
//! backend's stream records work instead of running it, `memory` carves
//! every new buffer from a fresh arena, and the arena's chunks move into the
//! [`CudaRecording`] so the buffers' addresses stay valid for every replay.
//! A mark taken while recording is an external event node of the graph, so
//! each replay records it again and the comm layer can time replayed
//! messages. Messages run on streams of their own: a plain event orders a
//! message stream after the compute stream ([`CudaBackend::fence_to`]) and
//! the compute stream after the message ([`CudaBackend::point_on`] and
//! `wait_for`); while recording, those dependencies bring the message
//! streams into the recording and back.
//!
//! This module must not allocate (see `memory`) or launch kernels; the
//! scalars a recorded step reads are written by `ops::step`.

use super::memory::Arena;
use super::{ffi, CudaBackend};
use crate::backend::{BackendError, Result};
use cudarc::driver::{sys as drv_sys, CudaEvent, CudaGraph, CudaStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A recorded decode step (a CUDA graph) and the arena its buffers live in.
pub struct CudaRecording {
    graph: CudaGraph,
    _arena: Vec<std::sync::Arc<super::memory::ArenaChunk>>,
}

impl CudaBackend {
    /// Whether a recording is in progress (buffers then come from the arena).
    pub(super) fn is_recording(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Starts recording: see [`crate::backend::Backend::capture_begin`].
    pub(super) fn begin_recording(&self) -> Result<bool> {
        if self.is_recording() {
            return Err(BackendError::Shape("a recording is already in progress".into()));
        }
        self.stream.begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        *self.arena.lock().expect("arena lock") = Arena::default();
        self.capturing.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Ends the recording and readies it for replay.
    pub(super) fn end_recording(&self) -> Result<CudaRecording> {
        self.capturing.store(false, Ordering::Relaxed);
        let arena = std::mem::take(&mut *self.arena.lock().expect("arena lock"));
        let graph = self
            .stream
            .end_capture(drv_sys::CUgraphInstantiate_flags(0))?
            .ok_or_else(|| BackendError::Device { library: crate::backend::DeviceLibrary::Driver, message: "the recording captured no work".into() })?;
        // Instantiation done; upload now so the first replay pays no set-up.
        graph.upload()?;
        Ok(CudaRecording { graph, _arena: arena.into_chunks() })
    }

    /// Queues one replay.
    pub(super) fn replay_recording(&self, rec: &CudaRecording) -> Result<()> {
        Ok(rec.graph.launch()?)
    }

    /// A timing event recorded on the backend's stream (a graph node while
    /// recording).
    pub(super) fn new_mark(&self) -> Result<CudaEvent> {
        self.mark_on(&self.stream)
    }

    /// A timing event recorded on `stream` (a graph node while recording:
    /// every replay records it again, but it orders nothing).
    pub fn mark_on(&self, stream: &CudaStream) -> Result<CudaEvent> {
        let ev = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        if self.is_recording() {
            ffi::record_external_event(&ev, stream)?;
        } else {
            ev.record(stream)?;
        }
        Ok(ev)
    }

    /// A stream of its own for one communicator's messages, so they run
    /// beside the compute stream (see `comm::nccl_transport`).
    pub fn new_message_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }

    /// The point `stream` has reached, as a dependency (a plain event: while
    /// recording, waiting for it orders the recorded work).
    pub fn point_on(&self, stream: &CudaStream) -> Result<CudaEvent> {
        let ev = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        ev.record(stream)?;
        Ok(ev)
    }

    /// Makes `stream` wait for the work queued so far on the compute
    /// stream (the data a message sends, the buffer it receives into).
    /// While recording, this brings `stream` into the recording.
    pub fn fence_to(&self, stream: &CudaStream) -> Result<()> {
        Ok(stream.wait(&self.point_on(&self.stream)?)?)
    }

    /// Makes the compute stream wait for `point` (recorded on another stream).
    pub(super) fn wait_on(&self, point: &CudaEvent) -> Result<()> {
        Ok(self.stream.wait(point)?)
    }
}
