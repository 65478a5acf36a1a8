//! The decode step's scalars and the operations that read them on the
//! device (embedding the step's tokens, storing the new K/V row), so a step
//! recorded once replays at every later position. Decode attention over the
//! step's length is in `decode`. This module must not write the scalars
//! while a step is being recorded: they are the recording's inputs.

use super::super::contract::{self, EmbedStepArgs, StoreRowsAtArgs, STEP_LEN, STEP_POS, STEP_STORE_AT, STEP_TOKENS};
use super::super::launch::{DevPtr, Holds, THREADS};
use super::super::memory::CudaBuf;
use super::super::{ffi, CudaBackend};
use super::{check, same_dtype, shape_err};
use crate::backend::{Result, StepVars};
use cudarc::driver::DevicePtr;

/// Most blocks of a per-sequence kernel (sequences beyond are looped over).
const MAX_ROW_BLOCKS: usize = 65_535 * 16;

/// The scalars as the kernels read them (`contract::STEP_*`).
fn step_scalars(vars: &StepVars) -> Result<Vec<i32>> {
    let int = |what: &str, v: usize| i32::try_from(v).map_err(|_| shape_err(format!("step {what} = {v} exceeds the int32 the kernels read")));
    let mut host = vec![0i32; STEP_TOKENS];
    host[STEP_POS] = int("position", vars.pos)?;
    host[STEP_STORE_AT] = vars.store_at.map(|a| int("store row", a)).transpose()?.unwrap_or(-1);
    host[STEP_LEN] = int("length", vars.len)?;
    host.extend(vars.tokens.iter().map(|&t| t as i32));
    Ok(host)
}

pub(super) fn set_step(be: &CudaBackend, vars: &StepVars) -> Result<()> {
    if be.is_recording() {
        return Err(shape_err("set_step while recording: the scalars are inputs of the recording".into()));
    }
    let host = step_scalars(vars)?;
    let mut step = be.step.lock().expect("step lock");
    if step.as_ref().is_none_or(|b| b.len() < host.len()) {
        // Room for 256 sequences at least, so the address rarely changes
        // (it never does inside a batch: the token count is fixed there).
        step.replace(be.stream.alloc_zeros::<i32>(host.len().max(STEP_TOKENS + 256))?);
    }
    let buf = step.as_mut().expect("just allocated");
    let (dst, _s) = buf.device_ptr(&be.stream);
    // SAFETY: `buf` holds at least `host.len()` int32s and lives in the
    // backend for as long as the backend.
    unsafe { ffi::copy_to_device(dst, &host[..], &be.stream) }?;
    Ok(())
}

/// The address of the step scalars, which must have been set.
pub(super) fn step_ptr(be: &CudaBackend) -> Result<u64> {
    let step = be.step.lock().expect("step lock");
    let ptr = step.as_ref().map(|s| s.device_ptr(&be.stream).0);
    ptr.ok_or_else(|| shape_err("a *_step operation ran before set_step".into()))
}

/// The address of the step's length (decode attention reads it there).
pub(super) fn step_len_ptr(be: &CudaBackend) -> Result<u64> {
    Ok(step_ptr(be)? + (STEP_LEN * std::mem::size_of::<i32>()) as u64)
}

/// The step's tokens' rows of `table`, plus with `sinusoid` the encoding of the step's position.
pub(super) fn embed_step(be: &CudaBackend, table: &CudaBuf, d: usize, nseq: usize, sinusoid: bool) -> Result<CudaBuf> {
    let out = be.alloc(table.dtype(), nseq * d)?;
    if nseq == 0 || d == 0 {
        return Ok(out);
    }
    let freq = if sinusoid { super::dense::freq_table(be, d)? } else { 0 };
    let step = step_ptr(be)?;
    let args = EmbedStepArgs { out: DevPtr::of(&out), table: DevPtr::of(table), step: DevPtr::raw(step, Holds::I32), freq: DevPtr::raw(freq, Holds::F64), rows: nseq as u64, d: d as u64 };
    // SAFETY: `out` holds nseq × d elements; `freq` d/2 frequencies or is
    // null; the step scalars hold a token per sequence (`set_step` was given them) and the runner embeds only
    // tokens of the table.
    unsafe { be.launch(&contract::EMBED_STEP, table.dtype(), nseq.min(MAX_ROW_BLOCKS) as u32, THREADS, &args) }?;
    Ok(out)
}

pub(super) fn store_step(be: &CudaBackend, cache: &mut CudaBuf, src: &CudaBuf, nseq: usize, cap: usize, width: usize) -> Result<()> {
    check("store_step cache", cache.len(), nseq * cap * width)?;
    check("store_step src", src.len(), nseq * width)?;
    same_dtype("store_step", &[cache, src])?;
    if nseq == 0 || width == 0 {
        return Ok(());
    }
    let step = step_ptr(be)?;
    let args = StoreRowsAtArgs {
        dst: DevPtr::of(cache),
        src: DevPtr::of(src),
        row_bytes: (width * cache.dtype().size_bytes()) as u64,
        nseq: nseq as u64,
        cap: cap as u64,
        step: DevPtr::raw(step, Holds::I32),
    };
    // SAFETY: `cache` holds nseq × cap rows and `src` nseq rows of `width`
    // (checked above); the kernel stores nothing outside `0..cap`.
    unsafe { be.launch(&contract::STORE_ROWS_AT, cache.dtype(), nseq.min(MAX_ROW_BLOCKS) as u32, THREADS, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_scalars_sit_at_their_declared_offsets() {
        let host = step_scalars(&StepVars { pos: 70, store_at: Some(5), len: 6, tokens: vec![11, 12] }).unwrap();
        assert_eq!(host, [70, 5, 6, 0, 11, 12]);
        let none = step_scalars(&StepVars { pos: 1, store_at: None, len: 0, tokens: vec![] }).unwrap();
        assert_eq!(none[STEP_STORE_AT], -1);
        assert!(step_scalars(&StepVars { pos: 1 << 31, ..Default::default() }).is_err());
    }
}
