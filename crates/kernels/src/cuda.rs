//! CUDA backend (feature `cuda`): quantized GEMV/GEMM with dequantization fused into the kernel.
//!
//! Built on `cudarc` with a pinned CUDA API version (12.8), dynamic loading of `libcuda` and
//! NVRTC at run time, so the crate builds on machines without a CUDA toolkit or driver (no
//! `nvcc` is ever invoked). [`CudaBackend::new`] checks that the driver library is present
//! before touching it and returns [`Error::Cuda`] otherwise; nothing here panics on a machine
//! without a GPU.
//!
//! One kernel serves every element format of a [`QuantizedTensor`]: codes stay packed on the
//! device exactly as in the tensor's layout contract (LSB-first bit stream per row), and each
//! code is decoded through a small look-up table (`value = (lut[code] + offset[block]) *
//! scale[block]`). Integer formats use `lut[u] = u` and `offset = -zero_point`; float, NF4,
//! ternary and binary formats use the format's decoded values and `offset = 0`; NVFP4's global
//! scale is folded into the block scales as `scale / global_scale`, the same f32 operation the
//! CPU dequantizer performs. The f32 weight matrix is never materialised.

use crate::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};
use std::sync::Arc;

/// Tokens handled per kernel launch (accumulators live in registers).
const MAX_BATCH: usize = 8;
/// Threads per block: one block computes one output row.
const THREADS: u32 = 256;

const KERNEL_SRC: &str = r#"
extern "C" __global__ void lowbit_qgemv(
    const unsigned char* __restrict__ data, int row_bytes, int bits,
    const float* __restrict__ lut, const float* __restrict__ scales,
    const float* __restrict__ offsets, int block_rows, int block_cols, int grid_cols,
    const float* __restrict__ x, int m, int cols, int rows, float* __restrict__ y)
{
    int r = blockIdx.x;
    if (r >= rows) return;
    const unsigned char* rowp = data + (size_t)r * row_bytes;
    int brow = (r / block_rows) * grid_cols;
    unsigned int mask = (1u << bits) - 1u;
    float acc[8];
    #pragma unroll
    for (int t = 0; t < 8; ++t) acc[t] = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        long long bit = (long long)c * bits;
        int byte = (int)(bit >> 3);
        int sh = (int)(bit & 7);
        unsigned int v = rowp[byte];
        if (sh + bits > 8) v |= ((unsigned int)rowp[byte + 1]) << 8;
        unsigned int code = (v >> sh) & mask;
        int b = brow + c / block_cols;
        float w = (lut[code] + offsets[b]) * scales[b];
        #pragma unroll
        for (int t = 0; t < 8; ++t) {
            if (t < m) acc[t] += w * x[(size_t)t * cols + c];
        }
    }
    __shared__ float red[8][32];
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int nwarps = (blockDim.x + 31) >> 5;
    #pragma unroll
    for (int t = 0; t < 8; ++t) {
        float s = acc[t];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) red[t][warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        for (int t = 0; t < m; ++t) {
            float s = lane < nwarps ? red[t][lane] : 0.0f;
            for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
            if (lane == 0) y[(size_t)t * rows + r] = s;
        }
    }
}
"#;

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// A CUDA device with the lowbit kernels compiled (NVRTC) and loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    qgemv: CudaFunction,
}

impl CudaBackend {
    /// Open device `ordinal` and compile the kernels. Fails with [`Error::Cuda`] (never panics)
    /// when the CUDA driver or NVRTC library is missing or no such device exists.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: these only try to dlopen the libraries and report whether that worked;
        // cudarc panics on first use when they are absent, so we ask first.
        let (driver, nvrtc) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        };
        if !driver {
            return Err(Error::Cuda(
                "no CUDA driver library (libcuda.so) found: install the NVIDIA driver or use the CPU path"
                    .into(),
            ));
        }
        if !nvrtc {
            return Err(Error::Cuda(
                "NVRTC (libnvrtc.so, CUDA >= 12.8) not found: install the CUDA runtime libraries"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        let stream = ctx.default_stream();
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SRC).map_err(cuda_err)?;
        let module = ctx.load_module(ptx).map_err(cuda_err)?;
        let qgemv = module.load_function("lowbit_qgemv").map_err(cuda_err)?;
        Ok(Arc::new(Self { ctx, stream, qgemv }))
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|e| format!("<unknown: {e:?}>"))
    }

    /// Block until all queued work has finished (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }

    /// Copy host f32 data to the device.
    pub fn upload(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(x).map_err(cuda_err)
    }

    /// A zeroed device buffer of `n` f32.
    pub fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(n).map_err(cuda_err)
    }

    /// Device-to-device copy (the bandwidth baseline of `cargo xtask bench cuda`).
    pub fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        self.stream.memcpy_dtod(src, dst).map_err(cuda_err)
    }

    /// Copy a device buffer back to the host.
    pub fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(x).map_err(cuda_err)
    }
}

/// Per-code values of a non-integer element format, obtained from the numerics dequantizer
/// itself (a one-row tensor holding every code with scale 1), so the GPU decodes exactly what
/// the CPU reference decodes.
fn value_table(elem: ElemFormat) -> Result<Vec<f32>> {
    let bits = elem.bits();
    let n = 1usize << bits;
    let scheme = Scheme {
        elem,
        granularity: Granularity::PerTensor,
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    };
    let mut data = vec![0u8; lowbit_numerics::tensor::packed_row_bytes(n, bits)];
    for code in 0..n {
        let bit = code * bits as usize;
        data[bit / 8] |= (code << (bit % 8)) as u8;
        if bit % 8 + bits as usize > 8 {
            data[bit / 8 + 1] |= (code >> (8 - bit % 8)) as u8;
        }
    }
    let t = QuantizedTensor {
        scheme,
        rows: 1,
        cols: n,
        data,
        scales: vec![1.0],
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    };
    // Codes that do not decode to a number (e.g. an unused ternary code) become NaN, as on CPU.
    Ok(t.dequantize()?)
}

/// A quantized weight matrix resident on the GPU.
pub struct CudaLinear {
    backend: Arc<CudaBackend>,
    rows: usize,
    cols: usize,
    bits: u32,
    row_bytes: usize,
    block_rows: usize,
    block_cols: usize,
    grid_cols: usize,
    data: CudaSlice<u8>,
    lut: CudaSlice<f32>,
    scales: CudaSlice<f32>,
    offsets: CudaSlice<f32>,
}

impl CudaLinear {
    /// Upload `q` (validated first). Act-order tensors (`g_idx`) are not supported here yet.
    pub fn new(backend: &Arc<CudaBackend>, q: &QuantizedTensor) -> Result<Self> {
        q.validate()?;
        if q.g_idx.is_some() {
            return Err(Error::Unsupported(
                "CUDA backend: act-order g_idx tensors are not supported yet".into(),
            ));
        }
        let bits = q.scheme.elem.bits();
        let (block_rows, block_cols) = q.scheme.granularity.block_shape(q.rows, q.cols);
        let (_, grid_cols) = q.grid();
        let (lut, offsets): (Vec<f32>, Vec<f32>) = match q.scheme.elem {
            ElemFormat::Int { bits } => {
                let lut = (0..1u32 << bits).map(|u| u as f32).collect();
                let offsets = match &q.zero_points {
                    Some(z) => z.iter().map(|&z| -(z as f32)).collect(),
                    None => vec![-((1u32 << (bits - 1)) as f32); q.scales.len()],
                };
                (lut, offsets)
            }
            other => (value_table(other)?, vec![0.0; q.scales.len()]),
        };
        let scales: Vec<f32> = match q.global_scale {
            Some(g) => q.scales.iter().map(|s| s / g).collect(),
            None => q.scales.clone(),
        };
        let s = &backend.stream;
        Ok(Self {
            backend: backend.clone(),
            rows: q.rows,
            cols: q.cols,
            bits,
            row_bytes: q.row_bytes(),
            block_rows,
            block_cols,
            grid_cols,
            data: s.clone_htod(&q.data).map_err(cuda_err)?,
            lut: s.clone_htod(&lut).map_err(cuda_err)?,
            scales: s.clone_htod(&scales).map_err(cuda_err)?,
            offsets: s.clone_htod(&offsets).map_err(cuda_err)?,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of packed codes on the device (what one GEMV streams, besides scales).
    pub fn code_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// `y[t][out] = Σ x[t][in] · W[out][in]` with `x` and `y` already on the device.
    pub fn forward_device(
        &self,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if x.len() != n_tokens * self.cols || y.len() != n_tokens * self.rows {
            return Err(Error::Shape(format!(
                "CUDA forward: x has {} (want {n_tokens}x{}), y has {} (want {n_tokens}x{})",
                x.len(),
                self.cols,
                y.len(),
                self.rows
            )));
        }
        let as_i32 = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32")))
        };
        let (row_bytes, bits) = (as_i32(self.row_bytes, "row bytes")?, self.bits as i32);
        let (br, bc, gc) = (
            as_i32(self.block_rows, "block rows")?,
            as_i32(self.block_cols, "block cols")?,
            as_i32(self.grid_cols, "grid cols")?,
        );
        let (cols, rows) = (as_i32(self.cols, "cols")?, as_i32(self.rows, "rows")?);
        let cfg = LaunchConfig {
            grid_dim: (self.rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = &self.backend.stream;
        let mut t0 = 0;
        while t0 < n_tokens {
            let m = (n_tokens - t0).min(MAX_BATCH);
            let xv = x.slice(t0 * self.cols..(t0 + m) * self.cols);
            let mut yv = y.slice_mut(t0 * self.rows..(t0 + m) * self.rows);
            let m_i32 = m as i32;
            let mut b = stream.launch_builder(&self.backend.qgemv);
            b.arg(&self.data)
                .arg(&row_bytes)
                .arg(&bits)
                .arg(&self.lut)
                .arg(&self.scales)
                .arg(&self.offsets)
                .arg(&br)
                .arg(&bc)
                .arg(&gc)
                .arg(&xv)
                .arg(&m_i32)
                .arg(&cols)
                .arg(&rows)
                .arg(&mut yv);
            // SAFETY: the argument list matches `lowbit_qgemv`'s signature in order and type
            // (device pointers, i32 scalars); every buffer was sized from the validated tensor
            // (data = rows*row_bytes, scales/offsets = one per block, lut = 2^bits entries) and
            // x/y views hold exactly m*cols and m*rows f32, so the kernel's indices stay in
            // bounds. cudarc records the buffers' read/write events for stream ordering.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            t0 += m;
        }
        Ok(())
    }

    /// Host-to-host convenience: upload `x`, run, download into `y`.
    pub fn forward(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        if y.len() != n_tokens * self.rows {
            return Err(Error::Shape(format!(
                "CUDA forward: y has {}, want {n_tokens}x{}",
                y.len(),
                self.rows
            )));
        }
        let xd = self.backend.upload(x)?;
        let mut yd = self.backend.zeros(n_tokens * self.rows)?;
        self.forward_device(&xd, n_tokens, &mut yd)?;
        y.copy_from_slice(&self.backend.download(&yd)?);
        Ok(())
    }
}
