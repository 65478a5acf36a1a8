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
//! messages.
//!
//! This module must not allocate (see `memory`) or launch kernels; the
//! scalars a recorded step reads are written by `ops::step`.

use super::memory::Arena;
use super::{ffi, CudaBackend};
use crate::backend::{BackendError, Result};
use cudarc::driver::{sys as drv_sys, CudaEvent, CudaGraph};
use std::sync::atomic::Ordering;

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
        let ev = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        if self.is_recording() {
            ffi::record_external_event(&ev, &self.stream)?;
        } else {
            ev.record(&self.stream)?;
        }
        Ok(ev)
    }
}
