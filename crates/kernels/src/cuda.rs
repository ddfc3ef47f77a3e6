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
use lowbit_numerics::{ElemFormat, FloatFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};
use std::sync::Arc;

/// Tokens handled per launch of the generic kernel (accumulators live in registers).
const MAX_BATCH: usize = 8;
/// Threads per block of the generic kernel: one block computes one output row.
const THREADS: u32 = 256;
/// Threads per block of the word-wide kernel (8 warps; `LOWBIT_CUDA_THREADS`, a multiple of 32
/// up to 1024, overrides it for tuning).
const WORD_THREADS: u32 = 256;
/// Rows each warp of the word-wide kernel computes (`LB_RW` in the kernel source).
const WORD_ROWS_PER_WARP: usize = 2;

fn word_threads() -> u32 {
    static T: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("LOWBIT_CUDA_THREADS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|t| (32..=1024).contains(t) && t % 32 == 0)
            .unwrap_or(WORD_THREADS)
    })
}

/// Kernel source, compiled at run time by NVRTC (no headers needed).
///
/// `lowbit_qgemv` is the generic kernel: any bit width (3, 5, 6, 7 included), one block per
/// row, one code per thread-iteration. The `lowbit_qw{2,4,8}_m{1,2,4,8}` kernels are the fast
/// path for bit widths that divide 32: rows are padded on the device to 16-byte multiples, each
/// warp owns two rows, each lane reads 16 bytes (8 to 64 codes) per load, and the block shares
/// x through shared memory (see the kernel's comments); a 32-bit word never
/// straddles a scale block (the host checks `block_cols % codes_per_word == 0`), so one scale
/// and offset serve a whole word, applied once per word as `s * (Σ v·x + o · Σ x)`. Scales are
/// read in the narrowest exact encoding the host found (u8 index into a 256-entry table, f16 or
/// f32), zero points as u8, so the bytes streamed stay close to the tensor's storage size.
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

__device__ __forceinline__ float lb_h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Weight loads stream past L1 (read once) so they do not evict anything else.
__device__ __forceinline__ uint4 lb_ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// How a word's codes become values (dec_mode): 0 = shared LUT, 1 = integer code (exact
// magic-number conversion, no lookup), 2 / 3 = FP8 E4M3 / E5M2 through the hardware
// fp8x2 -> f16x2 conversion (sm_89+; else the LUT), 4 = FP4 E2M1 by bit arithmetic. All are
// exact, so every mode yields the values of the CPU dequantizer.
template <int BITS>
__device__ __forceinline__ void lb_decode(unsigned int w, int dec_mode, const float* lut,
                                          float* vals)
{
    const int CPW = 32 / BITS;
    const unsigned int MASK = (1u << BITS) - 1u;
    if (dec_mode == 1) {
        #pragma unroll
        for (int j = 0; j < CPW; ++j)
            vals[j] = __int_as_float(0x4B000000u | ((w >> (j * BITS)) & MASK)) - 8388608.0f;
        return;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    if (BITS == 8 && (dec_mode == 2 || dec_mode == 3)) {
        #pragma unroll
        for (int j2 = 0; j2 < CPW / 2; ++j2) {
            const unsigned short pair = (unsigned short)(w >> (16 * j2));
            unsigned int h2;
            if (dec_mode == 2)
                asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
            else
                asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(h2) : "h"(pair));
            vals[2 * j2] = lb_h2f((unsigned short)(h2 & 0xffffu));
            vals[2 * j2 + 1] = lb_h2f((unsigned short)(h2 >> 16));
        }
        return;
    }
#endif
    if (BITS == 4 && dec_mode == 4) {
        #pragma unroll
        for (int j = 0; j < CPW; ++j) {
            const unsigned int c = (w >> (j * BITS)) & 15u;
            const unsigned int e = (c >> 1) & 3u, m = c & 1u;
            // e > 0: 2^(e-1) * (1 + m/2); e == 0: m * 0.5.
            const unsigned int mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? (126u << 23) : 0u);
            vals[j] = __int_as_float(mag | ((c & 8u) << 28));
        }
        return;
    }
    #pragma unroll
    for (int j = 0; j < CPW; ++j) vals[j] = lut[(w >> (j * BITS)) & MASK];
}

// One block = LB_RW rows per warp x (blockDim.x / 32) warps. Columns go in tiles of TC: the
// block stages x[0..M][tile] in shared memory once (zero beyond cols) and every warp reads it
// from there, so x is fetched from L2 once per block instead of once per row. Each lane first
// issues all of its 16-byte weight loads for the tile (RW rows x PL chunks), then the x tile is
// staged while they are in flight, then codes are decoded and multiplied.
// scale_mode: 0 = f32 per block, 1 = f16 per block, 2 = u8 index into stab_g (256 f32).
// off_mode: 0 = the constant off_const, 1 = -(u8 zero point) per block.
#define LB_RW 2
template <int BITS, int M>
__device__ __forceinline__ void lb_qw(
    const unsigned int* __restrict__ data, int row_words, int dec_mode,
    const float* __restrict__ lut_g, int scale_mode, const float* __restrict__ s32,
    const unsigned short* __restrict__ s16, const unsigned char* __restrict__ s8,
    const float* __restrict__ stab_g, int off_mode, float off_const,
    const unsigned char* __restrict__ zp, int block_rows, int block_cols, int bc_shift,
    int grid_cols, const float* __restrict__ x, int cols, int rows, float* __restrict__ y)
{
    const int CPW = 32 / BITS;
    const int TC = (M >= 8 && BITS >= 4) ? 1024 : 2048;
    const int CHT = TC * BITS / 128;
    const int PL = (CHT + 31) / 32;
    __shared__ float lut[1 << BITS];
    __shared__ float stab[256];
    __shared__ __align__(16) float xs[M][TC];
    for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) lut[i] = lut_g[i];
    if (scale_mode == 2)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) stab[i] = stab_g[i];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * (blockDim.x >> 5) + warp) * LB_RW;
    const int nchunks = row_words >> 2;
    float acc[LB_RW][M];
    #pragma unroll
    for (int rr = 0; rr < LB_RW; ++rr)
        #pragma unroll
        for (int t = 0; t < M; ++t) acc[rr][t] = 0.0f;
    for (int tile0 = 0; tile0 < cols; tile0 += TC) {
        const int ch0 = tile0 / CPW / 4;
        uint4 wv[LB_RW][PL];
        #pragma unroll
        for (int rr = 0; rr < LB_RW; ++rr) {
            const int r = r0 + rr;
            #pragma unroll
            for (int p = 0; p < PL; ++p) {
                const int k = lane + 32 * p;
                const int ch = ch0 + k;
                if (r < rows && k < CHT && ch < nchunks)
                    wv[rr][p] = lb_ld_stream((const uint4*)(data + (size_t)r * row_words) + ch);
                else
                    wv[rr][p] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        __syncthreads();
        #pragma unroll
        for (int t = 0; t < M; ++t)
            for (int i = threadIdx.x; i < TC; i += blockDim.x) {
                const int c = tile0 + i;
                xs[t][i] = c < cols ? __ldg(x + (size_t)t * cols + c) : 0.0f;
            }
        __syncthreads();
        #pragma unroll
        for (int rr = 0; rr < LB_RW; ++rr) {
            const int r = r0 + rr;
            if (r >= rows) break;
            const int gbase = (r / block_rows) * grid_cols;
            #pragma unroll
            for (int p = 0; p < PL; ++p) {
                const int k = lane + 32 * p;
                if (k >= CHT || ch0 + k >= nchunks) break;
                const unsigned int words[4] = {wv[rr][p].x, wv[rr][p].y, wv[rr][p].z, wv[rr][p].w};
                #pragma unroll
                for (int q = 0; q < 4; ++q) {
                    // Interleaved layout: this lane's q-th word is word 32q + lane of its
                    // 128-word group, so at each step the warp reads x contiguously.
                    const int c0 = ((ch0 + 32 * p) * 4 + 32 * q + lane) * CPW;
                    if (c0 >= cols) continue;
                    int g = bc_shift >= 0 ? (c0 >> bc_shift) : c0 / block_cols;
                    if (g >= grid_cols) g = grid_cols - 1;
                    const int b = gbase + g;
                    const float s = scale_mode == 0 ? __ldg(s32 + b)
                                  : scale_mode == 1 ? lb_h2f(__ldg(s16 + b)) : stab[__ldg(s8 + b)];
                    const float o = off_mode == 0 ? off_const : -(float)__ldg(zp + b);
                    const unsigned int w = words[q];
                    float vals[CPW];
                    lb_decode<BITS>(w, dec_mode, lut, vals);
                    const int lc = c0 - tile0;
                    #pragma unroll
                    for (int t = 0; t < M; ++t) {
                        const float4* xp = (const float4*)(&xs[t][lc]);
                        float sv = 0.0f, sx = 0.0f;
                        #pragma unroll
                        for (int j4 = 0; j4 < CPW / 4; ++j4) {
                            const float4 xx = xp[j4];
                            sv = fmaf(vals[4 * j4 + 0], xx.x, sv);
                            sv = fmaf(vals[4 * j4 + 1], xx.y, sv);
                            sv = fmaf(vals[4 * j4 + 2], xx.z, sv);
                            sv = fmaf(vals[4 * j4 + 3], xx.w, sv);
                            sx += (xx.x + xx.y) + (xx.z + xx.w);
                        }
                        acc[rr][t] = fmaf(s, fmaf(o, sx, sv), acc[rr][t]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < LB_RW; ++rr) {
        const int r = r0 + rr;
        #pragma unroll
        for (int t = 0; t < M; ++t) {
            float v = acc[rr][t];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && r < rows) y[(size_t)t * rows + r] = v;
        }
    }
}

#define LB_QW(BITS, M)                                                                          \
extern "C" __global__ void lowbit_qw##BITS##_m##M(                                              \
    const unsigned int* data, int row_words, int dec_mode, const float* lut_g, int scale_mode,  \
    const float* s32, const unsigned short* s16, const unsigned char* s8, const float* stab_g,  \
    int off_mode, float off_const, const unsigned char* zp, int block_rows, int block_cols,     \
    int bc_shift, int grid_cols, const float* x, int cols, int rows, float* y)                  \
{                                                                                               \
    lb_qw<BITS, M>(data, row_words, dec_mode, lut_g, scale_mode, s32, s16, s8, stab_g, off_mode,  \
                   off_const, zp, block_rows, block_cols, bc_shift, grid_cols, x, cols, rows,   \
                   y);                                                                          \
}
LB_QW(2, 1) LB_QW(2, 2) LB_QW(2, 4)
LB_QW(4, 1) LB_QW(4, 2) LB_QW(4, 4) LB_QW(4, 8)
LB_QW(8, 1) LB_QW(8, 2) LB_QW(8, 4) LB_QW(8, 8)
"#;

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// Compile the kernel source with NVRTC and return the PTX text (no GPU needed, only
/// `libnvrtc`). [`CudaBackend::new`] does this itself; this entry point lets a machine without a
/// GPU check that the kernels compile.
///
/// `arch` is an NVRTC virtual architecture such as `"compute_90"` (`None`: NVRTC's default).
pub fn compile_kernels_ptx(arch: Option<&'static str>) -> Result<String> {
    // SAFETY: only tries to dlopen libnvrtc and reports whether that worked.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda("NVRTC (libnvrtc.so) not found".into()));
    }
    Ok(compile(arch)?.to_src())
}

/// NVRTC's virtual architecture name for a compute capability (the FP8 conversion
/// instructions need compute_89 or newer; older or unknown devices get NVRTC's default).
fn arch_name((major, minor): (i32, i32)) -> Option<&'static str> {
    Some(match (major, minor) {
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (8, _) => "compute_80",
        (7, 5) => "compute_75",
        (7, _) => "compute_70",
        _ => return None,
    })
}

fn compile(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch,
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SRC, opts).map_err(cuda_err)
}

/// Names of the kernels in [`compile_kernels_ptx`]'s output.
pub fn kernel_names() -> Vec<String> {
    let mut v = vec!["lowbit_qgemv".to_string()];
    for bits in [2, 4, 8] {
        for m in QW_TOKENS {
            if bits != 2 || m < 8 {
                v.push(format!("lowbit_qw{bits}_m{m}"));
            }
        }
    }
    v
}

/// A CUDA device with the lowbit kernels compiled (NVRTC) and loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    qgemv: CudaFunction,
    /// Word-wide kernels, indexed `[bits 2/4/8][tokens 1/2/4/8]`.
    qw: [[CudaFunction; 4]; 3],
    /// Placeholders bound to kernel pointer arguments a tensor's encoding does not use.
    dummy_f32: CudaSlice<f32>,
    dummy_u16: CudaSlice<u16>,
    dummy_u8: CudaSlice<u8>,
}

/// Token counts the word-wide kernels are instantiated for (2-bit stops at 4: its x tile
/// for 8 tokens would not fit the static shared-memory limit).
const QW_TOKENS: [usize; 4] = [1, 2, 4, 8];

/// Words per interleave group of the word-wide layout: 32 lanes x 4 words (one 16-byte load
/// each). Rows are padded to whole groups.
const INTERLEAVE: usize = 128;

/// Where word `i` of a row goes in the interleaved layout: in each 128-word group, lane `l`'s
/// 16-byte chunk holds words `l, 32 + l, 64 + l, 96 + l`, so when every lane decodes its q-th
/// word the warp touches 32 consecutive words and reads x without shared-memory bank
/// conflicts.
fn interleaved_slot(i: usize) -> usize {
    let (group, w) = (i / INTERLEAVE, i % INTERLEAVE);
    let (q, lane) = (w / 32, w % 32);
    group * INTERLEAVE + lane * 4 + q
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
        let cc = ctx.compute_capability().map_err(cuda_err)?;
        let ptx = compile(arch_name(cc))?;
        let module = ctx.load_module(ptx).map_err(cuda_err)?;
        let qgemv = module.load_function("lowbit_qgemv").map_err(cuda_err)?;
        let load = |bits: u32, m: usize| {
            module
                .load_function(&format!("lowbit_qw{bits}_m{m}"))
                .map_err(cuda_err)
        };
        let row = |bits: u32| -> Result<[CudaFunction; 4]> {
            Ok([
                load(bits, 1)?,
                load(bits, 2)?,
                load(bits, 4)?,
                // 2-bit has no 8-token kernel; its slot repeats the 4-token one (never used).
                load(bits, if bits == 2 { 4 } else { 8 })?,
            ])
        };
        let qw = [row(2)?, row(4)?, row(8)?];
        let dummy_f32 = stream.alloc_zeros::<f32>(256).map_err(cuda_err)?;
        let dummy_u16 = stream.alloc_zeros::<u16>(1).map_err(cuda_err)?;
        let dummy_u8 = stream.alloc_zeros::<u8>(1).map_err(cuda_err)?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            qgemv,
            qw,
            dummy_f32,
            dummy_u16,
            dummy_u8,
        }))
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

/// How the word-wide kernel reads a tensor's block scales on the device.
enum DeviceScales {
    /// One f32 per block.
    F32(CudaSlice<f32>),
    /// One f16 per block (every scale is exactly an f16).
    F16(CudaSlice<u16>),
    /// One u8 index per block into a table of at most 256 distinct f32 scales (E8M0, E4M3 and
    /// any tensor with few distinct scales).
    Table(CudaSlice<u8>, CudaSlice<f32>),
}

/// Device layout for the word-wide kernels (bit widths dividing 32).
struct WordLayout {
    /// Index into `CudaBackend::qw` (bits 2 / 4 / 8).
    kernel: usize,
    /// Padded row length in 32-bit words (a multiple of 4: 16-byte rows).
    row_words: usize,
    words: CudaSlice<u32>,
    scales: DeviceScales,
    /// Per-block u8 zero points (asymmetric integer formats).
    zero_points: Option<CudaSlice<u8>>,
    /// Offset added to every code when there are no zero points.
    off_const: f32,
    /// How codes are decoded (`dec_mode` in the kernel source).
    dec_mode: i32,
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
    lut: CudaSlice<f32>,
    /// Word-wide layout when the format allows it, else the generic byte layout below.
    fast: Option<WordLayout>,
    data: Option<CudaSlice<u8>>,
    scales: Option<CudaSlice<f32>>,
    offsets: Option<CudaSlice<f32>>,
}

/// Choose the narrowest exact device encoding for the block scales.
fn encode_scales(stream: &Arc<CudaStream>, scales: &[f32]) -> Result<DeviceScales> {
    // Distinct scale bit patterns in first-seen order, each with its table index.
    let mut table: Vec<u32> = Vec::new();
    let mut slot: std::collections::HashMap<u32, u8> = std::collections::HashMap::new();
    let mut index = Vec::with_capacity(scales.len());
    let mut fits_table = true;
    for &s in scales {
        let bits = s.to_bits();
        let i = match slot.get(&bits) {
            Some(&i) => i,
            None if table.len() < 256 => {
                let i = table.len() as u8;
                table.push(bits);
                slot.insert(bits, i);
                i
            }
            None => {
                fits_table = false;
                break;
            }
        };
        index.push(i);
    }
    if fits_table {
        let mut t: Vec<f32> = table.into_iter().map(f32::from_bits).collect();
        t.resize(256, 0.0);
        return Ok(DeviceScales::Table(
            stream.clone_htod(&index).map_err(cuda_err)?,
            stream.clone_htod(&t).map_err(cuda_err)?,
        ));
    }
    let halves: Vec<u16> = scales
        .iter()
        .map(|&s| half::f16::from_f32(s).to_bits())
        .collect();
    let exact = scales
        .iter()
        .zip(&halves)
        .all(|(&s, &h)| half::f16::from_bits(h).to_f32().to_bits() == s.to_bits());
    Ok(if exact {
        DeviceScales::F16(stream.clone_htod(&halves).map_err(cuda_err)?)
    } else {
        DeviceScales::F32(stream.clone_htod(scales).map_err(cuda_err)?)
    })
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
        let dec_mode = match q.scheme.elem {
            ElemFormat::Int { .. } => 1,
            ElemFormat::Float(FloatFormat::E4M3) => 2,
            ElemFormat::Float(FloatFormat::E5M2) => 3,
            ElemFormat::Float(FloatFormat::E2M1) => 4,
            _ => 0,
        };
        let lut: Vec<f32> = match q.scheme.elem {
            ElemFormat::Int { bits } => (0..1u32 << bits).map(|u| u as f32).collect(),
            other => value_table(other)?,
        };
        let sym_offset = match q.scheme.elem {
            ElemFormat::Int { bits } => -((1u32 << (bits - 1)) as f32),
            _ => 0.0,
        };
        let scales: Vec<f32> = match q.global_scale {
            Some(g) => q.scales.iter().map(|s| s / g).collect(),
            None => q.scales.clone(),
        };
        let s = &backend.stream;
        let row_bytes = q.row_bytes();
        let kernel = match bits {
            2 => Some(0),
            4 => Some(1),
            8 => Some(2),
            _ => None,
        };
        let codes_per_word = 32 / bits.max(1) as usize;
        let word_ok = kernel.is_some() && (block_cols % codes_per_word == 0 || grid_cols == 1);
        let mut lin = Self {
            backend: backend.clone(),
            rows: q.rows,
            cols: q.cols,
            bits,
            row_bytes,
            block_rows,
            block_cols,
            grid_cols,
            lut: s.clone_htod(&lut).map_err(cuda_err)?,
            fast: None,
            data: None,
            scales: None,
            offsets: None,
        };
        if let (true, Some(kernel)) = (word_ok, kernel) {
            // Rows padded to 16 bytes so every lane's load is one aligned 128-bit read; the
            // bit stream of each row is unchanged (LSB-first), padding codes are never used.
            let row_words = row_bytes.div_ceil(4).div_ceil(INTERLEAVE) * INTERLEAVE;
            let mut words = vec![0u32; q.rows * row_words];
            for r in 0..q.rows {
                let src = &q.data[r * row_bytes..(r + 1) * row_bytes];
                let dst = &mut words[r * row_words..(r + 1) * row_words];
                for (i, chunk) in src.chunks(4).enumerate() {
                    let mut b = [0u8; 4];
                    b[..chunk.len()].copy_from_slice(chunk);
                    dst[interleaved_slot(i)] = u32::from_le_bytes(b);
                }
            }
            lin.fast = Some(WordLayout {
                kernel,
                row_words,
                words: s.clone_htod(&words).map_err(cuda_err)?,
                scales: encode_scales(s, &scales)?,
                zero_points: match &q.zero_points {
                    Some(z) => Some(s.clone_htod(z).map_err(cuda_err)?),
                    None => None,
                },
                off_const: sym_offset,
                dec_mode,
            });
        } else {
            let offsets: Vec<f32> = match &q.zero_points {
                Some(z) => z.iter().map(|&z| -(z as f32)).collect(),
                None => vec![sym_offset; q.scales.len()],
            };
            lin.data = Some(s.clone_htod(&q.data).map_err(cuda_err)?);
            lin.scales = Some(s.clone_htod(&scales).map_err(cuda_err)?);
            lin.offsets = Some(s.clone_htod(&offsets).map_err(cuda_err)?);
        }
        Ok(lin)
    }

    /// Whether the word-wide kernel serves this tensor (bit widths 2, 4 and 8 whose scale
    /// blocks hold whole 32-bit words); other formats use the generic kernel.
    pub fn uses_word_kernel(&self) -> bool {
        self.fast.is_some()
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
        if let Some(f) = &self.fast {
            return self.forward_words(f, x, n_tokens, y, [br, bc, gc, cols, rows]);
        }
        let (data, scales, offsets) = match (&self.data, &self.scales, &self.offsets) {
            (Some(d), Some(s), Some(o)) => (d, s, o),
            _ => return Err(Error::Cuda("CUDA layer has no device layout".into())),
        };
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
            b.arg(data)
                .arg(&row_bytes)
                .arg(&bits)
                .arg(&self.lut)
                .arg(scales)
                .arg(offsets)
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

    /// The word-wide path: launches of 8, 4, 2 and 1 tokens cover `n_tokens`.
    fn forward_words(
        &self,
        f: &WordLayout,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        y: &mut CudaSlice<f32>,
        [br, bc, gc, cols, rows]: [i32; 5],
    ) -> Result<()> {
        let be = &self.backend;
        let row_words = i32::try_from(f.row_words)
            .map_err(|_| Error::Shape(format!("row words = {} exceeds i32", f.row_words)))?;
        let (scale_mode, s32, s16, s8, stab) = match &f.scales {
            DeviceScales::F32(v) => (0i32, v, &be.dummy_u16, &be.dummy_u8, &be.dummy_f32),
            DeviceScales::F16(v) => (1, &be.dummy_f32, v, &be.dummy_u8, &be.dummy_f32),
            DeviceScales::Table(i, t) => (2, &be.dummy_f32, &be.dummy_u16, i, t),
        };
        let (off_mode, zp) = match &f.zero_points {
            Some(z) => (1i32, z),
            None => (0, &be.dummy_u8),
        };
        let bc_shift: i32 = if self.block_cols.is_power_of_two() {
            self.block_cols.trailing_zeros() as i32
        } else {
            -1
        };
        let threads = word_threads();
        let rows_per_block = WORD_ROWS_PER_WARP * (threads as usize / 32);
        let cfg = LaunchConfig {
            grid_dim: (self.rows.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut t0 = 0;
        while t0 < n_tokens {
            let left = n_tokens - t0;
            let max_m = if f.kernel == 0 { 4 } else { 8 };
            let mi = QW_TOKENS
                .iter()
                .rposition(|&k| k <= left.min(max_m))
                .unwrap_or(0);
            let m = QW_TOKENS[mi];
            let xv = x.slice(t0 * self.cols..(t0 + m) * self.cols);
            let mut yv = y.slice_mut(t0 * self.rows..(t0 + m) * self.rows);
            let mut b = be.stream.launch_builder(&be.qw[f.kernel][mi]);
            b.arg(&f.words)
                .arg(&row_words)
                .arg(&f.dec_mode)
                .arg(&self.lut)
                .arg(&scale_mode)
                .arg(s32)
                .arg(s16)
                .arg(s8)
                .arg(stab)
                .arg(&off_mode)
                .arg(&f.off_const)
                .arg(zp)
                .arg(&br)
                .arg(&bc)
                .arg(&bc_shift)
                .arg(&gc)
                .arg(&xv)
                .arg(&cols)
                .arg(&rows)
                .arg(&mut yv);
            // SAFETY: the arguments match `lowbit_qw{bits}_m{m}` in order and type. `words`
            // holds rows * row_words u32 (row_words a multiple of 4, so each row is whole
            // 16-byte loads); the scale buffer the mode selects holds one entry per block (the
            // table 256 f32 and u8 indices below 256), `zp` one u8 per block when off_mode is
            // 1, the LUT 2^bits f32; placeholders are never read in modes that do not select
            // them. Block indices are clamped to the grid, x reads stop at `cols`, and the
            // x/y views hold exactly m*cols and m*rows f32.
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
