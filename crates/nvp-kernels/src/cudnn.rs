//! The 3×3 convolution on CUDA through cuDNN (feature `cudnn`).
//!
//! candle's CUDA `conv2d` (without its own `cudnn` feature: im2col + cuBLAS) and, above
//! all, its backward pass (a naive `conv_transpose2d` kernel for the input gradient, a
//! convolution with an image-sized kernel for the weight gradient) are what made
//! training on a GPU several times slower than PyTorch. Here the three convolutions of
//! a training step are cuDNN's own — forward, backward data, backward filter — the
//! calls PyTorch makes, with the algorithms cuDNN's heuristics pick (PyTorch's choice
//! with `cudnn.benchmark` off, its default) or, with [`crate::set_cudnn_benchmark`] /
//! `NVP_CUDNN_BENCHMARK=1`, the fastest of them all timed on the real buffers (its
//! `cudnn.benchmark = True`), cached per shape.
//!
//! Math: TF32 tensor cores are allowed in these convolutions unless switched off
//! ([`crate::set_tf32`], `NVP_TF32=0`): `CUDNN_DEFAULT_MATH` when allowed (PyTorch's
//! default for convolutions, `torch.backends.cudnn.allow_tf32 = True`), strict FP32
//! `CUDNN_FMA_MATH` otherwise. f64 tensors are always computed in f64.
//!
//! [`conv2d_3x3_cudnn`] is differentiable in all its arguments; its gradients are
//! custom ops themselves, not differentiable further.
//!
//! Batch normalisation ([`batch_norm_cudnn`], `CUDNN_BATCHNORM_SPATIAL`): cuDNN's
//! training forward (batch statistics; biased variance to normalise, as candle's ops
//! and PyTorch) with its backward (the gradient through the statistics), and its
//! inference forward (running statistics) for graph-free evaluation — one kernel each
//! where candle's ops take a dozen. f32 and f64; `eps ≥ 1e-5` (cuDNN's minimum).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::safe::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda::cudarc::cudnn::{result as cudnn_result, sys, CudnnDataType, CudnnError};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda::{CudaDType, CudaDevice, DeviceId};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};

use crate::kernels::ConvDims;

/// Which of the three convolutions of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    /// `y = conv(x, w)`.
    Forward,
    /// `dx = conv_backward_data(dy, w)`.
    Data,
    /// `dw = conv_backward_filter(x, dy)`.
    Filter,
}

/// The algorithm cuDNN's heuristics picked for one pass at one size.
#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// Device, pass, dtype, sizes, TF32 allowed, picked by timing.
type AlgoKey = (DeviceId, Pass, DType, ConvDims, bool, bool);

/// The algorithms `NVP_CUDNN_BENCHMARK=1` times, per pass.
const FWD_ALGOS: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    [
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
};
const DATA_ALGOS: [sys::cudnnConvolutionBwdDataAlgo_t; 6] = {
    use sys::cudnnConvolutionBwdDataAlgo_t as A;
    [
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ]
};
const FILTER_ALGOS: [sys::cudnnConvolutionBwdFilterAlgo_t; 7] = {
    use sys::cudnnConvolutionBwdFilterAlgo_t as A;
    [
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ]
};

/// The largest workspace an algorithm may ask for when algorithms are timed (1 GiB).
const BENCH_WORKSPACE_LIMIT: usize = 1 << 30;

/// Scratch space of `bytes` bytes on `dev` (none for 0).
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    // SAFETY: a workspace is scratch space; cuDNN needs no particular contents.
    Ok(if bytes == 0 {
        None
    } else {
        Some(unsafe { dev.alloc::<u8>(bytes)? })
    })
}

/// One pass's algorithm, chosen and run: cached per [`AlgoKey`]; otherwise cuDNN's
/// heuristics, or (`bench`) each algorithm run and timed on the real buffers, the
/// fastest kept (PyTorch's `cudnn.benchmark`).
struct Pick<'a, F: Fn(CudnnError) -> candle_core::Error> {
    key: AlgoKey,
    bench: bool,
    dev: &'a CudaDevice,
    err: &'a F,
}

impl<F: Fn(CudnnError) -> candle_core::Error> Pick<'_, F> {
    /// Chooses the algorithm (see [`Pick`]) and launches it on the pass's buffers, last,
    /// so that the output is the chosen algorithm's.
    #[allow(clippy::too_many_arguments)]
    fn run<A: Copy>(
        &self,
        candidates: &[A],
        wrap: fn(A) -> Algo,
        unwrap: fn(Algo) -> Option<A>,
        heuristic: impl FnOnce() -> std::result::Result<A, CudnnError>,
        ws_size: impl Fn(A) -> std::result::Result<usize, CudnnError>,
        mut launch: impl FnMut(A, Option<&mut CudaSlice<u8>>) -> std::result::Result<(), CudnnError>,
    ) -> Result<()> {
        let cached = ALGOS.with(|m| m.borrow().get(&self.key).copied());
        let a = match cached.and_then(unwrap) {
            Some(a) => a,
            None => {
                let timed = if self.bench {
                    self.fastest(candidates, &ws_size, &mut launch)?
                } else {
                    None
                };
                let a = match timed {
                    Some(a) => a,
                    None => heuristic().map_err(self.err)?,
                };
                ALGOS.with(|m| m.borrow_mut().insert(self.key, wrap(a)));
                a
            }
        };
        let mut ws = workspace(self.dev, ws_size(a).map_err(self.err)?)?;
        launch(a, ws.as_mut()).map_err(self.err)
    }

    /// The fastest of `candidates` on these buffers (one warm-up run, one timed run
    /// each); `None` if none runs.
    fn fastest<A: Copy>(
        &self,
        candidates: &[A],
        ws_size: &impl Fn(A) -> std::result::Result<usize, CudnnError>,
        launch: &mut impl FnMut(A, Option<&mut CudaSlice<u8>>) -> std::result::Result<(), CudnnError>,
    ) -> Result<Option<A>> {
        let stream = self.dev.cuda_stream();
        let sync = || {
            stream
                .synchronize()
                .map_err(|e| candle_core::Error::Msg(format!("cuDNN benchmark: {e:?}")))
        };
        let mut best: Option<(f64, A)> = None;
        for &a in candidates {
            // Unsupported here, or too hungry: not a candidate.
            let Ok(bytes) = ws_size(a) else { continue };
            if bytes > BENCH_WORKSPACE_LIMIT {
                continue;
            }
            let mut ws = workspace(self.dev, bytes)?;
            if launch(a, ws.as_mut()).is_err() {
                continue;
            }
            sync()?;
            let t0 = std::time::Instant::now();
            if launch(a, ws.as_mut()).is_err() {
                continue;
            }
            sync()?;
            let t = t0.elapsed().as_secs_f64();
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, a));
            }
        }
        Ok(best.map(|(_, a)| a))
    }
}

// cuDNN handles are neither Send nor Sync: one per thread and device (as candle does),
// with the algorithm picks beside them.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static ALGOS: RefCell<HashMap<AlgoKey, Algo>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())
            .map_err(|e| candle_core::Error::Msg(format!("cuDNN: creating a handle: {e:?}")))?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn cudnn_err(pass: Pass, d: ConvDims) -> impl Fn(CudnnError) -> candle_core::Error {
    move |e| {
        candle_core::Error::Msg(format!(
            "cuDNN 3x3 convolution ({pass:?}; x ({}, {}, {}, {}), w ({}, {}, 3, 3)): {e:?}",
            d.n, d.c, d.h, d.w, d.k, d.c
        ))
    }
}

/// The descriptors of one 3×3 / stride 1 / padding 1 convolution.
struct Descs<T: CudnnDataType> {
    conv: ConvDescriptor<T>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn descs<T: CudnnDataType>(
    c: &Arc<Cudnn>,
    d: ConvDims,
    tf32: bool,
    pass: Pass,
) -> Result<Descs<T>> {
    let e = cudnn_err(pass, d);
    let i = |v: usize| -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cuDNN: size {v} too large")))
    };
    let (n, ch, k, h, w) = (i(d.n)?, i(d.c)?, i(d.k)?, i(d.h)?, i(d.w)?);
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let mut conv = c
        .create_conv2d::<T>(
            [1, 1],
            [1, 1],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(&e)?;
    let math = if tf32 {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    };
    conv.set_math_type(math).map_err(&e)?;
    Ok(Descs {
        conv,
        x: c.create_4d_tensor::<T>(nchw, [n, ch, h, w]).map_err(&e)?,
        w: c.create_4d_filter::<T>(nchw, [k, ch, 3, 3]).map_err(&e)?,
        y: c.create_4d_tensor::<T>(nchw, [n, k, h, w]).map_err(&e)?,
    })
}

/// The data of a contiguous CUDA tensor of dtype `T`, from its start offset.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda::cudarc::driver::CudaView<'a, T>> {
    if !l.is_contiguous() {
        bail!("cuDNN 3x3 convolution: internal: {what} must be contiguous");
    }
    let len = l.shape().elem_count();
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + len))
}

/// Runs one pass: `a`, `b` are (x, w) for the forward, (dy, w) for the input gradient,
/// (x, dy) for the weight gradient.
fn run<T>(
    pass: Pass,
    d: ConvDims,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage>
where
    T: CudnnDataType + CudaDType + DeviceRepr + WithDType,
{
    let dev = a.0.device.clone();
    let tf32 = crate::tf32_enabled() && T::DTYPE == DType::F32;
    let c = handle(&dev)?;
    let ds = descs::<T>(&c, d, tf32, pass)?;
    let e = cudnn_err(pass, d);
    let bench = crate::cudnn_benchmark_enabled();
    let key: AlgoKey = (dev.id(), pass, T::DTYPE, d, tf32, bench);
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    let (av, bv) = (
        view::<T>(a.0, a.1, "first input")?,
        view::<T>(b.0, b.1, "second input")?,
    );
    let out_len = match pass {
        Pass::Forward => d.n * d.k * d.h * d.w,
        Pass::Data => d.n * d.c * d.h * d.w,
        Pass::Filter => d.k * d.c * 9,
    };
    // SAFETY: every element of `out` is written by the convolution (beta = 0).
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(out_len)? };
    let pick = Pick {
        key,
        bench,
        dev: &dev,
        err: &e,
    };
    match pass {
        Pass::Forward => {
            let op = ConvForward {
                conv: &ds.conv,
                x: &ds.x,
                w: &ds.w,
                y: &ds.y,
            };
            // SAFETY (each launch): the descriptors describe `av` (x), `bv` (w), `out` (y).
            pick.run(
                &FWD_ALGOS,
                Algo::Forward,
                |a| match a {
                    Algo::Forward(a) => Some(a),
                    _ => None,
                },
                || op.pick_algorithm(),
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, ws, (one, zero), &av, &bv, &mut out) },
            )?;
        }
        Pass::Data => {
            let op = ConvBackwardData {
                conv: &ds.conv,
                dx: &ds.x,
                w: &ds.w,
                dy: &ds.y,
            };
            // SAFETY (each launch): the descriptors describe `out` (dx), `bv` (w), `av` (dy).
            pick.run(
                &DATA_ALGOS,
                Algo::Data,
                |a| match a {
                    Algo::Data(a) => Some(a),
                    _ => None,
                },
                || op.pick_algorithm(),
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, ws, (one, zero), &mut out, &bv, &av) },
            )?;
        }
        Pass::Filter => {
            let op = ConvBackwardFilter {
                conv: &ds.conv,
                x: &ds.x,
                dw: &ds.w,
                dy: &ds.y,
            };
            // SAFETY (each launch): the descriptors describe `av` (x), `out` (dw), `bv` (dy).
            pick.run(
                &FILTER_ALGOS,
                Algo::Filter,
                |a| match a {
                    Algo::Filter(a) => Some(a),
                    _ => None,
                },
                || op.pick_algorithm(),
                |a| op.get_workspace_size(a),
                |a, ws| unsafe { op.launch(a, ws, (one, zero), &av, &mut out, &bv) },
            )?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `f32_run` where every input is f32, `f64_run` where every input is f64; an error
/// naming `what` otherwise.
fn by_dtype(
    what: &str,
    ins: &[&CudaStorage],
    f32_run: impl FnOnce() -> Result<CudaStorage>,
    f64_run: impl FnOnce() -> Result<CudaStorage>,
) -> Result<CudaStorage> {
    let dtypes: Vec<DType> = ins.iter().map(|s| s.dtype()).collect();
    if dtypes.iter().all(|&t| t == DType::F32) {
        f32_run()
    } else if dtypes.iter().all(|&t| t == DType::F64) {
        f64_run()
    } else {
        bail!("{what}: dtypes {dtypes:?}; want all f32 or all f64")
    }
}

/// One pass as a candle custom op on two tensors.
#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    pass: Pass,
    d: ConvDims,
}

impl CudnnConv {
    fn out_shape(&self) -> Shape {
        let d = self.d;
        match self.pass {
            Pass::Forward => Shape::from((d.n, d.k, d.h, d.w)),
            Pass::Data => Shape::from((d.n, d.c, d.h, d.w)),
            Pass::Filter => Shape::from((d.k, d.c, 3, 3)),
        }
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "nvp-cudnn-conv3x3",
            Pass::Data => "nvp-cudnn-conv3x3-grad-input",
            Pass::Filter => "nvp-cudnn-conv3x3-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{}: takes CUDA tensors, got CPU ones", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (a, b) = ((s1, l1), (s2, l2));
        let out = by_dtype(
            self.name(),
            &[s1, s2],
            || run::<f32>(self.pass, self.d, a, b),
            || run::<f64>(self.pass, self.d, a, b),
        )?;
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            bail!("{}: not differentiable", self.name());
        }
        conv_grads(self.d, x, w, &dy.contiguous()?)
    }
}

/// The input and weight gradients of the forward convolution (`dy` contiguous), each
/// where its tensor is in a graph.
fn conv_grads(
    d: ConvDims,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    conv_grads_where(d, x, w, dy, x.track_op(), w.track_op())
}

/// The input gradient (where `want_dx`) and weight gradient (where `want_dw`) of the
/// forward convolution by cuDNN's data and filter passes (`dy` contiguous).
fn conv_grads_where(
    d: ConvDims,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    want_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if want_dx {
        Some(dy.apply_op2_no_bwd(
            w,
            &CudnnConv {
                pass: Pass::Data,
                d,
            },
        )?)
    } else {
        None
    };
    let dw = if want_dw {
        Some(x.apply_op2_no_bwd(
            dy,
            &CudnnConv {
                pass: Pass::Filter,
                d,
            },
        )?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The gradients of `conv(x, w) + b` outside any graph (for [`crate::resnet_train_ops`]):
/// the input gradient where `want_dx`, the weight gradient, and the bias gradient —
/// cuDNN's data and filter passes, and `cudnnConvolutionBackwardBias` where
/// [`crate::cudnn_bias_enabled`] (candle's sum over N, H, W otherwise). CUDA tensors
/// of one dtype, f32 or f64 ([`applies`]).
pub(crate) fn conv_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let d = crate::conv::dims_of(x.shape(), w.shape())?;
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let (dx, dw) = conv_grads_where(d, &x, &w, &dy, want_dx, true)?;
    let dw = dw.ok_or_else(|| candle_core::Error::Msg("cuDNN conv backward: no dw".into()))?;
    let db = if crate::cudnn_bias_enabled() {
        dy.apply_op1_no_bwd(&CudnnBiasGrad { d })?
    } else {
        dy.sum(vec![0, 2, 3])?
    };
    Ok((dx, dw, db))
}

/// The convolution with its bias, (x, w, b) → `conv(x, w) + b`: cuDNN's forward, the
/// bias added in place by `cudnnAddTensor`; backward: cuDNN's data and filter passes,
/// and `cudnnConvolutionBackwardBias` for the bias. One graph node where a broadcast
/// add took another, whose backward summed over three dimensions with candle's ops and
/// accumulated a zero-filled copy of the output's gradient.
#[derive(Debug, Clone, Copy)]
struct CudnnConvBias {
    d: ConvDims,
}

impl CudnnConvBias {
    fn add_bias<T>(&self, y: &mut CudaStorage, b: &CudaStorage, bl: &Layout) -> Result<()>
    where
        T: CudnnDataType + CudaDType + DeviceRepr + WithDType,
    {
        let d = self.d;
        let dev = y.device.clone();
        let stream = dev.cuda_stream();
        let h = raw_handle(&dev)?;
        let dt = <T as CudnnDataType>::DATA_TYPE;
        let bd = TensorDesc::new(dt, [1, d.k, 1, 1])?;
        let yd = TensorDesc::new(dt, [d.n, d.k, d.h, d.w])?;
        let bv = view::<T>(b, bl, "bias")?;
        let (bp, _b) = bv.device_ptr(&stream);
        let ys = y.as_cuda_slice_mut::<T>()?;
        let (yp, _y) = ys.device_ptr_mut(&stream);
        let one = T::from_f64(1.0);
        let one = &one as *const T as *const std::ffi::c_void;
        // SAFETY: `bd` describes the K contiguous bias values at `bp`, `yd` the freshly
        // written (N, K, H, W) output at `yp`; alpha = beta = 1 of type `T`; the guards
        // order the accesses on candle's stream, the handle's.
        let status = unsafe {
            sys::cudnnAddTensor(
                h.0,
                one,
                bd.0,
                bp as *const std::ffi::c_void,
                one,
                yd.0,
                yp as *mut std::ffi::c_void,
            )
        };
        status.result().map_err(cudnn_err(Pass::Forward, d))
    }
}

impl candle_core::CustomOp3 for CudnnConvBias {
    fn name(&self) -> &'static str {
        "nvp-cudnn-conv3x3-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{}: takes CUDA tensors, got CPU ones", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (a, b) = ((s1, l1), (s2, l2));
        let d = self.d;
        let y = by_dtype(
            self.name(),
            &[s1, s2, s3],
            || {
                let mut y = run::<f32>(Pass::Forward, d, a, b)?;
                self.add_bias::<f32>(&mut y, s3, l3)?;
                Ok(y)
            },
            || {
                let mut y = run::<f64>(Pass::Forward, d, a, b)?;
                self.add_bias::<f64>(&mut y, s3, l3)?;
                Ok(y)
            },
        )?;
        Ok((y, Shape::from((d.n, d.k, d.h, d.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (dx, dw) = conv_grads(self.d, x, w, &dy)?;
        let db = if b.track_op() {
            Some(dy.apply_op1_no_bwd(&CudnnBiasGrad { d: self.d })?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// dy (N, K, H, W) → db (K): `cudnnConvolutionBackwardBias`.
#[derive(Debug, Clone, Copy)]
struct CudnnBiasGrad {
    d: ConvDims,
}

impl CudnnBiasGrad {
    fn run<T>(&self, s: &CudaStorage, l: &Layout) -> Result<CudaStorage>
    where
        T: CudnnDataType + CudaDType + DeviceRepr + WithDType,
    {
        let d = self.d;
        let dev = s.device.clone();
        let stream = dev.cuda_stream();
        let h = raw_handle(&dev)?;
        let dt = <T as CudnnDataType>::DATA_TYPE;
        let bd = TensorDesc::new(dt, [1, d.k, 1, 1])?;
        let yd = TensorDesc::new(dt, [d.n, d.k, d.h, d.w])?;
        let dyv = view::<T>(s, l, "output gradient")?;
        // SAFETY: every element is written by cuDNN (beta = 0).
        let mut db: CudaSlice<T> = unsafe { dev.alloc::<T>(d.k)? };
        {
            let (yp, _y) = dyv.device_ptr(&stream);
            let (bp, _b) = db.device_ptr_mut(&stream);
            let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
            // SAFETY: `yd` describes the (N, K, H, W) contiguous gradient at `yp`, `bd`
            // the K values at `bp`; alpha = 1, beta = 0 of type `T`; the guards order
            // the accesses on candle's stream, the handle's.
            let status = unsafe {
                sys::cudnnConvolutionBackwardBias(
                    h.0,
                    &one as *const T as *const std::ffi::c_void,
                    yd.0,
                    yp as *const std::ffi::c_void,
                    &zero as *const T as *const std::ffi::c_void,
                    bd.0,
                    bp as *mut std::ffi::c_void,
                )
            };
            status.result().map_err(cudnn_err(Pass::Filter, d))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(db, dev))
    }
}

impl candle_core::CustomOp1 for CudnnBiasGrad {
    fn name(&self) -> &'static str {
        "nvp-cudnn-conv3x3-grad-bias"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{}: takes CUDA tensors, got CPU ones", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype(
            self.name(),
            &[s],
            || self.run::<f32>(s, l),
            || self.run::<f64>(s, l),
        )?;
        Ok((out, Shape::from(self.d.k)))
    }
}

/// Whether [`conv2d_3x3_cudnn`] takes these tensors: CUDA, both f32 or both f64.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && w.device().same_device(x.device())
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// 3×3 convolution (stride 1, zero padding 1) of CUDA tensors by cuDNN: `x (N, Cin, H,
/// W)`, `w (Cout, Cin, 3, 3)`, `b (Cout)`. Forward, input gradient and weight gradient
/// are cuDNN's; see the module documentation. The bias is added, and its gradient
/// taken, by cuDNN too (`cudnnAddTensor`, `cudnnConvolutionBackwardBias`) where
/// [`crate::cudnn_bias_enabled`] (`NVP_CUDNN_BIAS=1`; off by default), otherwise by
/// candle's broadcast add.
pub fn conv2d_3x3_cudnn(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let d = crate::conv::dims_of(x.shape(), w.shape())?;
    crate::conv::check_bias(b, d)?;
    if !applies(x, w) {
        bail!(
            "conv2d_3x3_cudnn: wants CUDA tensors, both f32 or both f64; got x {:?} {:?}, w {:?} {:?}",
            x.dtype(),
            x.device().location(),
            w.dtype(),
            w.device().location()
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) if crate::cudnn_bias_enabled() && b.dtype() == x.dtype() => {
            x.apply_op3(&w, &b.contiguous()?, CudnnConvBias { d })
        }
        _ => {
            let y = x.apply_op2(
                &w,
                CudnnConv {
                    pass: Pass::Forward,
                    d,
                },
            )?;
            match b {
                Some(b) => y.broadcast_add(&b.reshape((1, d.k, 1, 1))?),
                None => Ok(y),
            }
        }
    }
}

// ------------------------------------------------------------------------ batch norm

/// A cuDNN handle on candle's stream for the calls cudarc's safe API does not wrap
/// (batch normalisation: the safe [`Cudnn`] keeps its raw handle private), destroyed
/// with its thread.
struct RawHandle(sys::cudnnHandle_t);

impl Drop for RawHandle {
    fn drop(&mut self) {
        // SAFETY: created by `raw_handle`, destroyed once, here.
        unsafe {
            let _ = cudnn_result::destroy_handle(self.0);
        }
    }
}

thread_local! {
    static RAW_HANDLES: RefCell<HashMap<DeviceId, Rc<RawHandle>>> = RefCell::new(HashMap::new());
}

fn bn_err(what: &'static str) -> impl Fn(CudnnError) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("cuDNN batch norm ({what}): {e:?}"))
}

fn raw_handle(dev: &CudaDevice) -> Result<Rc<RawHandle>> {
    RAW_HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("cuDNN: binding the context: {e:?}")))?;
        let raw = RawHandle(cudnn_result::create_handle().map_err(bn_err("handle"))?);
        // SAFETY: a live handle and candle's live stream (the handle keeps no reference
        // past the stream's life: both live as long as the device, per thread).
        unsafe { cudnn_result::set_stream(raw.0, stream.cu_stream() as *mut _) }
            .map_err(bn_err("stream"))?;
        let raw = Rc::new(raw);
        h.borrow_mut().insert(dev.id(), raw.clone());
        Ok(raw)
    })
}

/// A 4-d NCHW tensor descriptor, destroyed on drop.
struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn new(dtype: sys::cudnnDataType_t, dims: [usize; 4]) -> Result<Self> {
        let mut d = [0i32; 4];
        for (o, v) in d.iter_mut().zip(dims) {
            *o = i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("cuDNN: size {v} too large")))?;
        }
        let desc =
            TensorDesc(cudnn_result::create_tensor_descriptor().map_err(bn_err("descriptor"))?);
        // SAFETY: a descriptor just created and not yet destroyed.
        unsafe {
            cudnn_result::set_tensor4d_descriptor(
                desc.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dtype,
                d,
            )
        }
        .map_err(bn_err("descriptor"))?;
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, here.
        unsafe {
            let _ = cudnn_result::destroy_tensor_descriptor(self.0);
        }
    }
}

/// cuDNN's smallest batch-norm epsilon (`CUDNN_BN_MIN_EPSILON`).
const BN_MIN_EPSILON: f64 = 1e-5;

/// `(N, C, H·W)` of a batch-norm input (rank 2 to 4: `(N, C)`, `(N, C, L)`, `(N, C, H, W)`).
fn bn_dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if !(2..=4).contains(&d.len()) {
        bail!(
            "cuDNN batch norm: input of shape {shape:?}; want rank 2 to 4 with channels in dim 1"
        );
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// The batch-norm passes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BnPass {
    /// (x, weight, bias) → `[y | batch mean | unbiased batch variance]`, flat.
    Train,
    /// (x, dy, weight) → `[dx | dweight | dbias]`, flat (statistics recomputed from x).
    Backward,
    /// (x, `[weight | bias | running mean | running variance]`) → y.
    Inference,
}

#[derive(Debug, Clone, Copy)]
struct CudnnBn {
    pass: BnPass,
    eps: f64,
    n: usize,
    c: usize,
    hw: usize,
}

impl CudnnBn {
    fn nchw(&self) -> usize {
        self.n * self.c * self.hw
    }

    /// The flat output: `[y | two per-channel vectors]`, or y alone for inference.
    fn out_len(&self) -> usize {
        match self.pass {
            BnPass::Train | BnPass::Backward => self.nchw() + 2 * self.c,
            BnPass::Inference => self.nchw(),
        }
    }

    fn run<T>(&self, ins: &[(&CudaStorage, &Layout)]) -> Result<CudaStorage>
    where
        T: CudnnDataType + CudaDType + DeviceRepr + WithDType + ValidAsZeroBits,
    {
        let dev = ins[0].0.device.clone();
        let stream = dev.cuda_stream();
        let h = raw_handle(&dev)?;
        let dt = <T as CudnnDataType>::DATA_TYPE;
        let xd = TensorDesc::new(dt, [self.n, self.c, self.hw, 1])?;
        let pd = TensorDesc::new(dt, [1, self.c, 1, 1])?;
        let views = ins
            .iter()
            .map(|(s, l)| view::<T>(s, l, "batch-norm input"))
            .collect::<Result<Vec<_>>>()?;
        let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
        let p = |i: usize| ptrs[i].0 as *const std::ffi::c_void;
        let (nchw, c) = (self.nchw(), self.c);
        let len = self.out_len();
        // SAFETY: every element is written by cuDNN (y/dx, then the two per-channel
        // vectors), except the running statistics of `Train`, zeroed below first.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(len)? };
        if self.pass == BnPass::Train {
            // With averaging factor 1 cuDNN computes `running = 0·running + batch`:
            // the old contents must not be NaN.
            stream
                .memset_zeros(&mut out.slice_mut(nchw..))
                .map_err(|e| candle_core::Error::Msg(format!("cuDNN batch norm: memset: {e:?}")))?;
        }
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        let (one, zero) = (
            &one as *const T as *const std::ffi::c_void,
            &zero as *const T as *const std::ffi::c_void,
        );
        let size = std::mem::size_of::<T>() as u64;
        {
            let (base, _sync) = out.device_ptr_mut(&stream);
            let at = |i: usize| (base + i as u64 * size) as *mut std::ffi::c_void;
            let mode = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;
            let null = std::ptr::null_mut::<std::ffi::c_void>();
            // SAFETY: the descriptors describe the buffers: x, y, dy, dx are (N, C, HW, 1)
            // NCHW of `T`, the per-channel vectors (1, C, 1, 1); all pointers are into live
            // allocations of candle's device on the handle's stream, and `_sync` / `ptrs`
            // order the accesses with other streams.
            let status = unsafe {
                match self.pass {
                    BnPass::Train => sys::cudnnBatchNormalizationForwardTraining(
                        h.0,
                        mode,
                        one,
                        zero,
                        xd.0,
                        p(0),
                        xd.0,
                        at(0),
                        pd.0,
                        p(1),
                        p(2),
                        1.0,
                        at(nchw),
                        at(nchw + c),
                        self.eps,
                        null,
                        null,
                    ),
                    BnPass::Backward => sys::cudnnBatchNormalizationBackward(
                        h.0,
                        mode,
                        one,
                        zero,
                        one,
                        zero,
                        xd.0,
                        p(0),
                        xd.0,
                        p(1),
                        xd.0,
                        at(0),
                        pd.0,
                        p(2),
                        at(nchw),
                        at(nchw + c),
                        self.eps,
                        null,
                        null,
                    ),
                    BnPass::Inference => {
                        let q = |i: usize| {
                            (ptrs[1].0 + (i * c) as u64 * size) as *const std::ffi::c_void
                        };
                        sys::cudnnBatchNormalizationForwardInference(
                            h.0,
                            mode,
                            one,
                            zero,
                            xd.0,
                            p(0),
                            xd.0,
                            at(0),
                            pd.0,
                            q(0),
                            q(1),
                            q(2),
                            q(3),
                            self.eps,
                        )
                    }
                }
            };
            status.result().map_err(bn_err(match self.pass {
                BnPass::Train => "forward, training",
                BnPass::Backward => "backward",
                BnPass::Inference => "forward, inference",
            }))?;
        }
        drop(ptrs);
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    fn dispatch(&self, ins: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        let storages: Vec<&CudaStorage> = ins.iter().map(|(s, _)| *s).collect();
        let out = by_dtype(
            "cuDNN batch norm",
            &storages,
            || self.run::<f32>(ins),
            || self.run::<f64>(ins),
        )?;
        Ok((out, Shape::from(self.out_len())))
    }
}

impl CustomOp2 for CudnnBn {
    fn name(&self) -> &'static str {
        "nvp-cudnn-batch-norm-inference"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{}: takes CUDA tensors, got CPU ones", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.dispatch(&[(s1, l1), (s2, l2)])
    }
}

impl candle_core::CustomOp3 for CudnnBn {
    fn name(&self) -> &'static str {
        match self.pass {
            BnPass::Train => "nvp-cudnn-batch-norm-train",
            _ => "nvp-cudnn-batch-norm-backward",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!(
            "{}: takes CUDA tensors, got CPU ones",
            candle_core::CustomOp3::name(self)
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.dispatch(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.pass != BnPass::Train {
            bail!("{}: not differentiable", candle_core::CustomOp3::name(self));
        }
        // Only y carries a gradient: the statistics leave the op detached.
        let dy = grad.narrow(0, 0, self.nchw())?;
        let (dx, dw, db) = self.backward(x, &dy, w)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CudnnBn {
    /// cuDNN's backward pass (the gradient through the batch statistics, recomputed
    /// from `x`): `(dx, dweight, dbias)` from `x` and `dy` (each the op's N·C·HW
    /// values, flat or not), `dx` flat.
    fn backward(&self, x: &Tensor, dy: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (nchw, c) = (self.nchw(), self.c);
        let back = CudnnBn {
            pass: BnPass::Backward,
            ..*self
        };
        let g = x.flatten_all()?.contiguous()?.apply_op3_no_bwd(
            &dy.flatten_all()?.contiguous()?,
            &w.contiguous()?,
            &back,
        )?;
        Ok((
            g.narrow(0, 0, nchw)?,
            g.narrow(0, nchw, c)?,
            g.narrow(0, nchw + c, c)?,
        ))
    }
}

/// The gradient of the train-mode batch norm `y = weight·(x − μ)/√(σ² + ε) + bias`
/// through its batch statistics, outside any graph (for [`crate::resnet_train_ops`]):
/// `(dx, dweight, dbias)` by cuDNN's backward, for tensors [`bn_applies`] takes.
pub(crate) fn batch_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, hw) = bn_dims(x.shape())?;
    let op = CudnnBn {
        pass: BnPass::Backward,
        eps,
        n,
        c,
        hw,
    };
    let (dx, dw, db) = op.backward(x, dy, weight)?;
    Ok((dx.reshape(x.shape())?, dw, db))
}

/// Whether [`batch_norm_cudnn`] takes these tensors: CUDA, all f32 or all f64, rank 2
/// to 4, at least two values per channel, `eps` at least cuDNN's minimum (1e-5).
pub(crate) fn bn_applies(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> bool {
    let dt = x.dtype();
    let params = [weight, bias]
        .into_iter()
        .chain(running.into_iter().flat_map(|(m, v)| [m, v]));
    x.device().is_cuda()
        && matches!(dt, DType::F32 | DType::F64)
        && (2..=4).contains(&x.rank())
        && x.elem_count() / x.dim(1).unwrap_or(1).max(1) >= 2
        && eps >= BN_MIN_EPSILON
        && params
            .into_iter()
            .all(|p| p.dtype() == dt && p.device().same_device(x.device()))
}

/// Batch normalisation with affine `(weight, bias)` of a CUDA tensor by cuDNN
/// (`CUDNN_BATCHNORM_SPATIAL`): with `running = None` the batch statistics are used
/// (cuDNN's training forward; differentiable in x, weight and bias through cuDNN's
/// backward, which takes the gradient through the statistics) and returned — `mean`
/// and the biased `var`, detached; with `running = Some((mean, var))` those are used
/// (cuDNN's inference forward; no gradient) and returned.
pub fn batch_norm_cudnn(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<crate::BatchNormOutput> {
    let (n, c, hw) = bn_dims(x.shape())?;
    for (name, t) in [("weight", weight), ("bias", bias)].into_iter().chain(
        running
            .into_iter()
            .flat_map(|(m, v)| [("running mean", m), ("running var", v)]),
    ) {
        if t.dims() != [c] {
            bail!(
                "cuDNN batch norm: {name} of shape {:?}, want ({c},)",
                t.shape()
            );
        }
    }
    if !bn_applies(x, weight, bias, running, eps) {
        bail!(
            "cuDNN batch norm: wants CUDA tensors, all f32 or all f64, eps >= {BN_MIN_EPSILON:e}; got x {:?} on {:?}, eps {eps:e}",
            x.dtype(),
            x.device().location()
        );
    }
    let op = |pass| CudnnBn {
        pass,
        eps,
        n,
        c,
        hw,
    };
    let xf = x.contiguous()?.flatten_all()?;
    let nchw = n * c * hw;
    match running {
        None => {
            let out = xf.apply_op3(
                &weight.contiguous()?,
                &bias.contiguous()?,
                op(BnPass::Train),
            )?;
            let y = out.narrow(0, 0, nchw)?.reshape(x.shape())?;
            let mean = out.narrow(0, nchw, c)?.detach();
            let count = (n * hw) as f64;
            let var = (out.narrow(0, nchw + c, c)?.detach() * ((count - 1.0).max(0.0) / count))?;
            Ok(crate::BatchNormOutput { y, mean, var })
        }
        Some((m, v)) => {
            let packed = Tensor::cat(&[weight, bias, m, v], 0)?.detach();
            let y = xf
                .detach()
                .apply_op2_no_bwd(&packed, &op(BnPass::Inference))?
                .reshape(x.shape())?;
            Ok(crate::BatchNormOutput {
                y,
                mean: m.detach(),
                var: v.detach(),
            })
        }
    }
}

// ------------------------------------------------------------------ running averages

/// `dst ← keep · dst + take · src` in place, by one `cudnnAddTensor` (what PyTorch's
/// cuDNN batch norm does inside its training kernel): the running statistics' update,
/// one kernel where candle's ops take four and a copy.
#[derive(Debug, Clone, Copy)]
struct CudnnBlend {
    keep: f64,
    take: f64,
}

impl CudnnBlend {
    fn run<T>(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()>
    where
        T: CudnnDataType + CudaDType + DeviceRepr + WithDType,
    {
        let n = dl.shape().elem_count();
        if sl.shape().elem_count() != n || !dl.is_contiguous() {
            bail!("cuDNN running average: internal: dst {dl:?}, src {sl:?}");
        }
        let dev = dst.device.clone();
        let stream = dev.cuda_stream();
        let h = raw_handle(&dev)?;
        let dt = <T as CudnnDataType>::DATA_TYPE;
        let desc = TensorDesc::new(dt, [1, n, 1, 1])?;
        let sv = view::<T>(src, sl, "running-average input")?;
        let (sp, _s) = sv.device_ptr(&stream);
        let size = std::mem::size_of::<T>() as u64;
        let start = dl.start_offset() as u64 * size;
        let dslice = dst.as_cuda_slice_mut::<T>()?;
        let (dp, _d) = dslice.device_ptr_mut(&stream);
        let (take, keep) = (T::from_f64(self.take), T::from_f64(self.keep));
        // SAFETY: both descriptors describe n contiguous values of `T`, at `sp` (the
        // source view) and `dp + start` (the destination's layout start, in bounds);
        // alpha/beta are `T` as cuDNN wants for f32 and f64 data; the guards order the
        // accesses on candle's stream, the handle's stream.
        let status = unsafe {
            sys::cudnnAddTensor(
                h.0,
                &take as *const T as *const std::ffi::c_void,
                desc.0,
                sp as *const std::ffi::c_void,
                &keep as *const T as *const std::ffi::c_void,
                desc.0,
                (dp + start) as *mut std::ffi::c_void,
            )
        };
        status.result().map_err(bn_err("running average"))
    }
}

impl candle_core::InplaceOp2 for CudnnBlend {
    fn name(&self) -> &'static str {
        "nvp-cudnn-running-average"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("{}: takes CUDA tensors, got CPU ones", self.name())
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        match (dst.dtype(), src.dtype()) {
            (DType::F32, DType::F32) => self.run::<f32>(dst, dl, src, sl),
            (DType::F64, DType::F64) => self.run::<f64>(dst, dl, src, sl),
            (a, b) => bail!(
                "{}: dtypes {a:?} and {b:?}; want both f32 or both f64",
                self.name()
            ),
        }
    }
}

/// Whether [`blend_cudnn`] takes these tensors: CUDA, the same device and dtype (f32 or
/// f64), the same number of elements, contiguous.
pub(crate) fn blend_applies(dst: &Tensor, src: &Tensor) -> bool {
    dst.device().is_cuda()
        && src.device().same_device(dst.device())
        && dst.dtype() == src.dtype()
        && matches!(dst.dtype(), DType::F32 | DType::F64)
        && dst.elem_count() == src.elem_count()
        && dst.is_contiguous()
        && src.is_contiguous()
}

/// `dst ← keep · dst + take · src` in place on the GPU by cuDNN (`dst` is typically a
/// batch norm's running statistic, a [`candle_core::Var`]'s tensor; every tensor that
/// shares its storage sees the new values, as with `Var::set`).
pub fn blend_cudnn(dst: &Tensor, src: &Tensor, keep: f64, take: f64) -> Result<()> {
    if !blend_applies(dst, src) {
        bail!(
            "cuDNN running average: wants contiguous CUDA tensors of one dtype (f32 or f64) and size; got {:?} {:?} and {:?} {:?}",
            dst.shape(),
            dst.dtype(),
            src.shape(),
            src.dtype()
        );
    }
    dst.inplace_op2(src, &CudnnBlend { keep, take })
}
