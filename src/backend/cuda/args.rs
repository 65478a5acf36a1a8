//! The values a kernel launch passes: device addresses with what they hold
//! (so a launch can check them against the kernel's declared parameters),
//! TMA tensor maps with the tensor they map, and plain scalars. Shared by the kernel contract, which declares the
//! parameters, and the launch path, which checks and passes them.

use super::memory::CudaBuf;
use crate::backend::Dtype;
use std::ffi::c_void;

/// What the memory behind a device address holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holds {
    /// Elements of a buffer of this dtype.
    Elements(Dtype),
    F64,
    I32,
    U32,
    U64,
}

/// A device address passed to a kernel, with what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPtr {
    pub(super) addr: u64,
    pub(super) holds: Holds,
}

impl DevPtr {
    /// The start of `buf`.
    pub fn of(buf: &CudaBuf) -> Self {
        Self { addr: buf.device_ptr(), holds: Holds::Elements(buf.dtype()) }
    }
    /// `bytes` past the start of `buf` (a column block inside its rows).
    pub fn of_at(buf: &CudaBuf, bytes: usize) -> Self {
        Self { addr: buf.device_ptr() + bytes as u64, holds: Holds::Elements(buf.dtype()) }
    }
    /// An address that is not a [`CudaBuf`] (the step scalars, a frequency
    /// or row-run table, an index output); 0 is the null pointer.
    pub fn raw(addr: u64, holds: Holds) -> Self {
        Self { addr, holds }
    }
    /// Bytes of one element of what the address holds.
    pub fn element_bytes(&self) -> u32 {
        match self.holds {
            Holds::Elements(dtype) => dtype.size_bytes() as u32,
            Holds::F64 | Holds::U64 => 8,
            Holds::I32 | Holds::U32 => 4,
        }
    }
}

/// A value passed as one kernel parameter.
pub trait ArgValue {
    /// Where the value lives, as `cuLaunchKernel` wants it (one pointer per parameter).
    fn param_ptr(&self) -> *mut c_void;
    /// The device address, when the value is one.
    fn device_ptr(&self) -> Option<DevPtr> {
        None
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl ArgValue for $t {
            fn param_ptr(&self) -> *mut c_void {
                self as *const $t as *mut c_void
            }
        }
    )*};
}
scalar_arg!(u64, i32, f32);

impl ArgValue for DevPtr {
    fn param_ptr(&self) -> *mut c_void {
        // The kernel receives the 8-byte address alone.
        &self.addr as *const u64 as *mut c_void
    }
    fn device_ptr(&self) -> Option<DevPtr> {
        Some(*self)
    }
}

/// The 128 opaque bytes of a driver `CUtensorMap`, with its 64-byte
/// alignment (the kernels' `TensorMap`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapBytes(pub [u64; 16]);

/// A TMA tensor map passed by value (`const __grid_constant__ TensorMap`),
/// with the start of the tensor it maps, so that a launch can check the
/// tensor's element type as it does a pointer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap {
    pub(super) bytes: TensorMapBytes,
    pub(super) tensor: DevPtr,
}

impl ArgValue for TensorMap {
    fn param_ptr(&self) -> *mut c_void {
        // The kernel receives the map's 128 bytes alone.
        &self.bytes as *const TensorMapBytes as *mut c_void
    }
    fn device_ptr(&self) -> Option<DevPtr> {
        Some(self.tensor)
    }
}
