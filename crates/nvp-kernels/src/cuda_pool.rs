//! The CUDA memory pool's release threshold.
//!
//! candle allocates CUDA memory with the stream-ordered allocator
//! (`cuMemAllocAsync` / `cuMemFreeAsync`, through cudarc) from the device's current
//! memory pool. The pool's release threshold defaults to 0 bytes: at every
//! synchronisation (a training step has a few: the loss and the gradient norm are read
//! back) it hands all memory freed so far back to the driver, and the next step maps
//! it again, allocation by allocation. [`keep_freed_cuda_memory`] raises the threshold
//! to "never", so that freed memory stays in the pool for the next allocations, as
//! PyTorch's caching allocator keeps it. The memory is still reused within the process
//! and returned when it ends.

use candle_core::{Device, Result};

/// Keeps memory freed on `device`'s CUDA memory pool for reuse (see the module
/// documentation) where switched on: off by default (not yet run on a GPU), on where
/// the environment variable `NVP_CUDA_KEEP_FREED` is `1`, `true`, `on` or `yes`, or
/// after [`crate::tuning::set_keep_freed_cuda_memory`]. Returns whether the pool now
/// keeps it: false on the CPU, without the `cuda` feature, when switched off, or where
/// the device has no stream-ordered allocator.
pub fn keep_freed_cuda_memory(device: &Device) -> Result<bool> {
    if !crate::switch_with_default(&crate::CUDA_KEEP_FREED, "NVP_CUDA_KEEP_FREED", false) {
        return Ok(false);
    }
    imp::keep(device)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::{Device, Result};

    pub fn keep(device: &Device) -> Result<bool> {
        let Device::Cuda(dev) = device else {
            return Ok(false);
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Ok(false);
        }
        let err = |what: &str, e: sys::CUresult| {
            candle_core::Error::Msg(format!("CUDA memory pool: {what}: {e:?}"))
        };
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and `cu_device` a device of this process.
        let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuDeviceGetMemPool", r));
        }
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the release threshold attribute takes a pointer to a u64 (cuuint64_t).
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemPoolSetAttribute(RELEASE_THRESHOLD)", r));
        }
        Ok(true)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Device, Result};

    pub fn keep(_: &Device) -> Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_pool() {
        assert!(!keep_freed_cuda_memory(&Device::Cpu).unwrap());
    }
}
