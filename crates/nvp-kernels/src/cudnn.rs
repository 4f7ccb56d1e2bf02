//! The 3×3 convolution on CUDA through cuDNN (feature `cudnn`).
//!
//! candle's CUDA `conv2d` (without its own `cudnn` feature: im2col + cuBLAS) and, above
//! all, its backward pass (a naive `conv_transpose2d` kernel for the input gradient, a
//! convolution with an image-sized kernel for the weight gradient) are what made
//! training on a GPU several times slower than PyTorch. Here the three convolutions of
//! a training step are cuDNN's own — forward, backward data, backward filter — the
//! calls PyTorch makes, with the algorithms cuDNN's heuristics pick (PyTorch's choice
//! with `cudnn.benchmark` off, its default), cached per shape.
//!
//! Math: TF32 tensor cores are allowed in these convolutions unless switched off
//! ([`crate::set_tf32`], `NVP_TF32=0`): `CUDNN_DEFAULT_MATH` when allowed (PyTorch's
//! default for convolutions, `torch.backends.cudnn.allow_tf32 = True`), strict FP32
//! `CUDNN_FMA_MATH` otherwise. f64 tensors are always computed in f64.
//!
//! [`conv2d_3x3_cudnn`] is differentiable in all its arguments; its gradients are
//! custom ops themselves, not differentiable further.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::safe::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda::cudarc::cudnn::{sys, CudnnDataType};
use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
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

type AlgoKey = (DeviceId, Pass, DType, ConvDims, bool);

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

fn cudnn_err(
    pass: Pass,
    d: ConvDims,
) -> impl Fn(candle_core::cuda::cudarc::cudnn::CudnnError) -> candle_core::Error {
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
    let key: AlgoKey = (dev.id(), pass, T::DTYPE, d, tf32);
    let cached = ALGOS.with(|m| m.borrow().get(&key).copied());
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
    let workspace = |bytes: usize| -> Result<Option<CudaSlice<u8>>> {
        // SAFETY: a workspace is scratch space; cuDNN needs no particular contents.
        Ok(if bytes == 0 {
            None
        } else {
            Some(unsafe { dev.alloc::<u8>(bytes)? })
        })
    };
    match pass {
        Pass::Forward => {
            let op = ConvForward {
                conv: &ds.conv,
                x: &ds.x,
                w: &ds.w,
                y: &ds.y,
            };
            let algo = match cached {
                Some(Algo::Forward(a)) => a,
                _ => {
                    let a = op.pick_algorithm().map_err(&e)?;
                    ALGOS.with(|m| m.borrow_mut().insert(key, Algo::Forward(a)));
                    a
                }
            };
            let mut ws = workspace(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: the descriptors describe `av` (x), `bv` (w) and `out` (y).
            unsafe { op.launch(algo, ws.as_mut(), (one, zero), &av, &bv, &mut out) }.map_err(&e)?;
        }
        Pass::Data => {
            let op = ConvBackwardData {
                conv: &ds.conv,
                dx: &ds.x,
                w: &ds.w,
                dy: &ds.y,
            };
            let algo = match cached {
                Some(Algo::Data(a)) => a,
                _ => {
                    let a = op.pick_algorithm().map_err(&e)?;
                    ALGOS.with(|m| m.borrow_mut().insert(key, Algo::Data(a)));
                    a
                }
            };
            let mut ws = workspace(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: the descriptors describe `out` (dx), `bv` (w) and `av` (dy).
            unsafe { op.launch(algo, ws.as_mut(), (one, zero), &mut out, &bv, &av) }.map_err(&e)?;
        }
        Pass::Filter => {
            let op = ConvBackwardFilter {
                conv: &ds.conv,
                x: &ds.x,
                dw: &ds.w,
                dy: &ds.y,
            };
            let algo = match cached {
                Some(Algo::Filter(a)) => a,
                _ => {
                    let a = op.pick_algorithm().map_err(&e)?;
                    ALGOS.with(|m| m.borrow_mut().insert(key, Algo::Filter(a)));
                    a
                }
            };
            let mut ws = workspace(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: the descriptors describe `av` (x), `out` (dw) and `bv` (dy).
            unsafe { op.launch(algo, ws.as_mut(), (one, zero), &av, &mut out, &bv) }.map_err(&e)?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
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
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => run::<f32>(self.pass, self.d, a, b)?,
            (DType::F64, DType::F64) => run::<f64>(self.pass, self.d, a, b)?,
            (t1, t2) => bail!(
                "{}: dtypes {t1:?}, {t2:?}; want both f32 or both f64",
                self.name()
            ),
        };
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
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &CudnnConv {
                    pass: Pass::Data,
                    d: self.d,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(
                &dy,
                &CudnnConv {
                    pass: Pass::Filter,
                    d: self.d,
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Whether [`conv2d_3x3_cudnn`] takes these tensors: CUDA, both f32 or both f64.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && w.device().same_device(x.device())
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// 3×3 convolution (stride 1, zero padding 1) of CUDA tensors by cuDNN, bias added by
/// a broadcast add: `x (N, Cin, H, W)`, `w (Cout, Cin, 3, 3)`, `b (Cout)`. Forward,
/// input gradient and weight gradient are cuDNN's; see the module documentation.
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
    let y = x.contiguous()?.apply_op2(
        &w.contiguous()?,
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
