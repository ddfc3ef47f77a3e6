//! Intel AMX-INT8 tiles for the batched (prefill) W8A8 GEMM.
//!
//! `C[t][n] = sum_k A[t][k] * B[n][k]` with `A` the per-token INT8 activations (`[-127, 127]`)
//! and `B` the INT8 weights (`[-128, 127]`), both signed, so `tdpbssd` (s8 x s8 -> s32) computes
//! the sums directly, with no unsigned offset or correction term.
//!
//! Tiles are 16 rows x 64 bytes (palette 1, the largest shape): an `A` tile holds 16 tokens x
//! 64 k values, a `B` tile 16 groups of 4 consecutive k values x 16 output channels (the
//! "VNNI" layout `tdpbssd` reads: byte `4n + i` of row `k4` is `B[n][4 k4 + i]`), a `C` tile
//! 16 tokens x 16 channels of int32. One work item is a 32 x 32 output block in tiles
//! `tmm0..tmm3` (`C[i][j]` = `tmm(2i + j)`), `A` rows in `tmm4, tmm5`, `B` in `tmm6, tmm7`.
//! Weights are packed once into contiguous 1 KiB `B` tiles, zero padded to multiples of 16
//! channels and 64 columns; activations are copied per call into a zero-padded
//! `[tokens rounded up to 16][cols rounded up to 64]` buffer. Zero padding adds nothing to the
//! sums, so the integers are exactly the scalar reference's.
//!
//! The same blocked driver runs on two tile back ends: the hardware (`asm!`, because Rust's AMX
//! intrinsics are unstable) and a scalar emulation with exactly `tdpbssd`'s semantics, which is
//! what the tests on machines without AMX exercise (packing, padding, blocking, tails).
//!
//! AMX is used only if CPUID leaf 7 reports AMX-TILE (EDX bit 24) and AMX-INT8 (EDX bit 25),
//! the OS grants the tile data state (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
//! requested once per process), and the environment does not say `LOWBIT_AMX=0`.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of a tile (tokens of an `A`/`C` tile, k groups of a `B` tile).
pub const TILE_ROWS: usize = 16;
/// Bytes per tile row (64 k values of `A`; 16 channels x 4 k values of `B`; 16 int32 of `C`).
pub const TILE_COLSB: usize = 64;
/// Bytes of one packed `B` tile.
pub const TILE_BYTES: usize = TILE_ROWS * TILE_COLSB;
/// Output channels per `B`/`C` tile.
pub const TILE_N: usize = TILE_COLSB / 4;
/// k values per tile step.
pub const TILE_K: usize = TILE_COLSB;
/// Output block of one work item: 2 x 2 `C` tiles.
const BLK: usize = 2 * TILE_ROWS;

/// Why AMX cannot be used in this process (`Ok` when it can), detected once.
pub fn detect() -> std::result::Result<(), String> {
    static DET: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DET.get_or_init(detect_uncached).clone()
}

/// Whether the W8A8 kernel uses AMX: [`detect`] succeeded and `LOWBIT_AMX` is not `0`.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOWBIT_AMX").as_deref() != Ok("0") && detect().is_ok())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_uncached() -> std::result::Result<(), String> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU (the intrinsic is `unsafe` only on older Rust).
    #[allow(unused_unsafe)]
    let max_leaf = unsafe { __cpuid(0) }.eax;
    if max_leaf < 7 {
        return Err(format!("CPUID max leaf {max_leaf} < 7"));
    }
    // SAFETY: leaf 7 exists (checked above).
    #[allow(unused_unsafe)]
    let edx = unsafe { __cpuid_count(7, 0) }.edx;
    let (tile, int8) = ((edx >> 24) & 1 == 1, (edx >> 25) & 1 == 1);
    if !(tile && int8) {
        return Err(format!(
            "CPU lacks AMX (CPUID.7.0:EDX AMX-TILE={tile}, AMX-INT8={int8})"
        ));
    }
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_GET_XCOMP_PERM: usize = 0x1022;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the Linux x86-64 syscall ABI: number in rax, arguments in rdi/rsi, result in rax,
    // rcx and r11 clobbered; ARCH_REQ_XCOMP_PERM reads no memory and only changes this
    // process's permitted extended-state set.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret != 0 {
        return Err(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed with errno {}",
            -ret
        ));
    }
    let mut mask = 0u64;
    let ret: isize;
    // SAFETY: as above; ARCH_GET_XCOMP_PERM writes one u64 to the pointer in rsi, which points
    // to `mask`, live and writable for the call.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_GET_XCOMP_PERM,
            in("rsi") &mut mask as *mut u64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret != 0 || (mask >> XFEATURE_XTILEDATA) & 1 == 0 {
        return Err(format!(
            "tile data not permitted after the request (ARCH_GET_XCOMP_PERM ret {ret}, mask {mask:#x})"
        ));
    }
    Ok(())
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_uncached() -> std::result::Result<(), String> {
    Err("AMX is only used on x86-64 Linux".into())
}

/// INT8 weights `[rows][cols]` packed into `B` tiles: `[rows / 16][cols / 64]` tiles (both
/// rounded up, zero padded) of 1 KiB, row `k4`, byte `4n + i` = `w[16 nb + n][64 kb + 4 k4 + i]`.
#[derive(Debug, Clone)]
pub struct AmxPackedB {
    rows: usize,
    cols: usize,
    nblk: usize,
    kblk: usize,
    data: Vec<i8>,
}

/// Offset within a packed `B` tile of channel `n` (0..16) and k `k` (0..64).
#[inline]
pub fn b_tile_offset(n: usize, k: usize) -> usize {
    (k / 4) * TILE_COLSB + n * 4 + k % 4
}

impl AmxPackedB {
    /// Pack `w[r * stride + c]` for `r < rows`, `c < cols`.
    pub fn new(w: &[i8], rows: usize, cols: usize, stride: usize) -> Result<Self> {
        if stride < cols || (rows > 0 && w.len() < (rows - 1) * stride + cols) {
            return Err(Error::Shape(format!(
                "AMX packing: {} weights for {rows} x {cols} with stride {stride}",
                w.len()
            )));
        }
        let (nblk, kblk) = (rows.div_ceil(TILE_N), cols.div_ceil(TILE_K));
        let mut data = vec![0i8; nblk * kblk * TILE_BYTES];
        data.par_chunks_mut(kblk * TILE_BYTES)
            .enumerate()
            .for_each(|(nb, strip)| {
                for n in 0..TILE_N.min(rows - nb * TILE_N) {
                    let r = nb * TILE_N + n;
                    for (c, &v) in w[r * stride..r * stride + cols].iter().enumerate() {
                        let tile = &mut strip[(c / TILE_K) * TILE_BYTES..][..TILE_BYTES];
                        tile[b_tile_offset(n, c % TILE_K)] = v;
                    }
                }
            });
        Ok(AmxPackedB {
            rows,
            cols,
            nblk,
            kblk,
            data,
        })
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of packed weights (with padding).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed tile of channel block `nb` and k block `kb` (16 x 64 bytes, stride 64).
    #[inline]
    pub fn tile(&self, nb: usize, kb: usize) -> &[i8] {
        &self.data[(nb * self.kblk + kb) * TILE_BYTES..][..TILE_BYTES]
    }
}

/// Copy `xq[t][c]` (`n_tokens x cols`) into a zero-padded `[mp][lda]` buffer: `mp` the token
/// count rounded up to 16, `lda` the column count rounded up to 64 plus 64 more, so that the 16
/// rows one `tileloadd` reads do not all fall into one L1 set when `cols` is a multiple of 4 KiB.
/// Returns `(buffer, mp, lda)`.
pub fn pad_activations(xq: &[i8], n_tokens: usize, cols: usize) -> (Vec<i8>, usize, usize) {
    let (mp, lda) = (
        n_tokens.div_ceil(TILE_ROWS) * TILE_ROWS,
        cols.div_ceil(TILE_K) * TILE_K + TILE_K,
    );
    let mut a = vec![0i8; mp * lda];
    if cols > 0 {
        a.par_chunks_mut(lda)
            .zip(xq.par_chunks(cols))
            .for_each(|(d, s)| d[..cols].copy_from_slice(s));
    }
    (a, mp, lda)
}

/// `tdpbssd` on 16 x 64-byte tiles, exactly as the instruction defines it: for each row `m`,
/// each 4-byte group `k` of `a`'s row and each int32 column `n`,
/// `c[m][n] += a[m][4k..4k+4] . b[k][4n..4n+4]` with sign-extended bytes and 32-bit wrap-around.
pub fn tdpbssd_emulated(
    c: &mut [[i32; TILE_N]; TILE_ROWS],
    a: &[[i8; TILE_COLSB]; TILE_ROWS],
    b: &[[i8; TILE_COLSB]; TILE_ROWS],
) {
    for (cm, am) in c.iter_mut().zip(a) {
        for k in 0..TILE_COLSB / 4 {
            for (n, cv) in cm.iter_mut().enumerate() {
                let dp = (0..4)
                    .map(|i| (am[4 * k + i] as i32).wrapping_mul(b[k][4 * n + i] as i32))
                    .fold(0i32, i32::wrapping_add);
                *cv = cv.wrapping_add(dp);
            }
        }
    }
}

/// A tile register file: `C` tiles 0..4, `A` tiles 4..6, `B` tiles 6..8, all 16 x 64 bytes.
trait Tiles {
    fn zero(&mut self, t: usize);
    /// Load 16 rows of 64 bytes, row `r` from `src[r * stride..]`.
    fn load(&mut self, t: usize, src: &[i8], stride: usize);
    /// `tmm(2i + j) += tmm(4 + i) x tmm(6 + j)`.
    fn dp(&mut self, i: usize, j: usize);
    /// Store 16 rows of 16 int32, row `r` to `dst[r * stride..]`.
    fn store(&mut self, t: usize, dst: &mut [i32], stride: usize);
}

/// The scalar emulation of the tile registers.
struct EmuTiles {
    c: [[[i32; TILE_N]; TILE_ROWS]; 4],
    ab: [[[i8; TILE_COLSB]; TILE_ROWS]; 4],
}

impl EmuTiles {
    fn new() -> Self {
        EmuTiles {
            c: [[[0; TILE_N]; TILE_ROWS]; 4],
            ab: [[[0; TILE_COLSB]; TILE_ROWS]; 4],
        }
    }
}

impl Tiles for EmuTiles {
    fn zero(&mut self, t: usize) {
        self.c[t] = [[0; TILE_N]; TILE_ROWS];
    }
    fn load(&mut self, t: usize, src: &[i8], stride: usize) {
        for (r, row) in self.ab[t - 4].iter_mut().enumerate() {
            row.copy_from_slice(&src[r * stride..r * stride + TILE_COLSB]);
        }
    }
    fn dp(&mut self, i: usize, j: usize) {
        let (a, b) = (self.ab[i], self.ab[2 + j]);
        tdpbssd_emulated(&mut self.c[2 * i + j], &a, &b);
    }
    fn store(&mut self, t: usize, dst: &mut [i32], stride: usize) {
        for (r, row) in self.c[t].iter().enumerate() {
            dst[r * stride..r * stride + TILE_N].copy_from_slice(row);
        }
    }
}

/// The hardware tiles of the current thread: configured on creation, released on drop.
#[cfg(target_arch = "x86_64")]
struct HwTiles(());

#[cfg(target_arch = "x86_64")]
mod hw {
    use super::{HwTiles, Tiles, TILE_COLSB, TILE_N, TILE_ROWS};
    use std::arch::asm;

    /// `ldtilecfg` operand: palette 1, tiles 0..8 all 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    impl HwTiles {
        /// Configure the tiles of this thread.
        ///
        /// # Safety
        /// AMX-TILE/AMX-INT8 present and the tile data state permitted ([`super::detect`] is
        /// `Ok`); the value must be dropped on the thread that created it.
        pub(super) unsafe fn new() -> Self {
            let mut cfg = TileCfg([0; 64]);
            cfg.0[0] = 1; // palette 1
            for t in 0..8 {
                cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&(TILE_COLSB as u16).to_le_bytes());
                cfg.0[48 + t] = TILE_ROWS as u8;
            }
            // SAFETY: AMX is enabled for this process (caller contract); `cfg` is a valid
            // 64-byte palette-1 configuration (reserved bytes zero, rows <= 16, colsb <= 64).
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            HwTiles(())
        }
    }

    impl Drop for HwTiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured by `HwTiles::new` on this thread (AMX present);
            // `tilerelease` returns them to the init state and touches no memory.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// Run `$body` with `$n` bound to the tile number `$t` as a constant (tile registers are
    /// named in the instruction, so each one needs its own `asm!`).
    macro_rules! on_tile {
        ($t:expr, [$($k:literal),*], |$n:ident| $body:block) => {
            match $t {
                $($k => {
                    const $n: usize = $k;
                    $body
                })*
                t => unreachable!("tile {t} not in {:?}", [$($k),*]),
            }
        };
    }

    impl Tiles for HwTiles {
        #[inline(always)]
        fn zero(&mut self, t: usize) {
            on_tile!(t, [0, 1, 2, 3], |T| {
                // SAFETY: tiles configured (an `HwTiles` exists); no memory access.
                unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
            })
        }
        #[inline(always)]
        fn load(&mut self, t: usize, src: &[i8], stride: usize) {
            assert!(stride >= TILE_COLSB && src.len() >= (TILE_ROWS - 1) * stride + TILE_COLSB);
            on_tile!(t, [4, 5, 6, 7], |T| {
                // SAFETY: tiles configured; reads 16 rows of 64 bytes at src + r * stride, all
                // inside `src` (asserted).
                unsafe {
                    asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) src.as_ptr(),
                         s = in(reg) stride, options(nostack, readonly))
                }
            })
        }
        #[inline(always)]
        fn dp(&mut self, i: usize, j: usize) {
            // C[i][j] = tmm(2i + j) += A[i] = tmm(4 + i) x B[j] = tmm(6 + j)
            match (i, j) {
                // SAFETY: tiles configured; register-only tile arithmetic.
                (0, 0) => unsafe { asm!("tdpbssd tmm0, tmm4, tmm6", options(nostack, nomem)) },
                // SAFETY: as above.
                (0, 1) => unsafe { asm!("tdpbssd tmm1, tmm4, tmm7", options(nostack, nomem)) },
                // SAFETY: as above.
                (1, 0) => unsafe { asm!("tdpbssd tmm2, tmm5, tmm6", options(nostack, nomem)) },
                // SAFETY: as above.
                (1, 1) => unsafe { asm!("tdpbssd tmm3, tmm5, tmm7", options(nostack, nomem)) },
                _ => unreachable!("C tile ({i}, {j}) outside 2 x 2"),
            }
        }
        #[inline(always)]
        fn store(&mut self, t: usize, dst: &mut [i32], stride: usize) {
            assert!(stride >= TILE_N && dst.len() >= (TILE_ROWS - 1) * stride + TILE_N);
            on_tile!(t, [0, 1, 2, 3], |T| {
                // SAFETY: tiles configured; writes 16 rows of 64 bytes at dst + r * stride
                // int32s, all inside `dst` (asserted), which is borrowed mutably.
                unsafe {
                    asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) dst.as_mut_ptr(),
                         s = in(reg) stride * 4, options(nostack))
                }
            })
        }
    }
}

/// One work item: a block of up to 2 x 2 `C` tiles at token row `row0`, channel tile `nb0`.
struct Block<'a> {
    b: &'a AmxPackedB,
    a: &'a [i8],
    lda: usize,
    row0: usize,
    nb0: usize,
}

impl Block<'_> {
    /// `C` tiles `(i, j)`, `i < MI`, `j < NI` over the whole k range, stored into `c`
    /// (`[32][32]` int32).
    #[inline(always)]
    fn run<T: Tiles, const MI: usize, const NI: usize>(&self, tiles: &mut T, c: &mut [i32]) {
        for i in 0..MI {
            for j in 0..NI {
                tiles.zero(2 * i + j);
            }
        }
        for kb in 0..self.b.kblk {
            for i in 0..MI {
                let row = self.row0 + i * TILE_ROWS;
                tiles.load(4 + i, &self.a[row * self.lda + kb * TILE_K..], self.lda);
            }
            for j in 0..NI {
                tiles.load(6 + j, self.b.tile(self.nb0 + j, kb), TILE_COLSB);
            }
            for i in 0..MI {
                for j in 0..NI {
                    tiles.dp(i, j);
                }
            }
        }
        for i in 0..MI {
            for j in 0..NI {
                tiles.store(2 * i + j, &mut c[i * TILE_ROWS * BLK + j * TILE_N..], BLK);
            }
        }
    }
}

/// The blocked product on one tile back end: `out[t][r] = sum_k xq[t][k] * w[r][k]`
/// (`[n_tokens][rows]`), `new_tiles` called once per rayon work piece on its thread.
fn gemm_with<T: Tiles>(
    b: &AmxPackedB,
    xq: &[i8],
    n_tokens: usize,
    new_tiles: impl Fn() -> T + Sync + Send,
) -> Result<Vec<i32>> {
    if xq.len() != n_tokens * b.cols {
        return Err(Error::Shape(format!(
            "AMX GEMM: {} activations, want {n_tokens} x {}",
            xq.len(),
            b.cols
        )));
    }
    let mut out = vec![0i32; n_tokens * b.rows];
    if n_tokens == 0 || b.rows == 0 {
        return Ok(out);
    }
    let (a, mp, lda) = pad_activations(xq, n_tokens, b.cols);
    let mtiles = mp / TILE_ROWS;
    let (mblk, nblk) = (mtiles.div_ceil(2), b.nblk.div_ceil(2));
    // blocked result: item (nb2, mb2) -> a 32 x 32 int32 block, items n-major so neighbouring
    // items share their B tiles
    let mut blocks = vec![0i32; nblk * mblk * BLK * BLK];
    blocks
        .par_chunks_mut(BLK * BLK)
        .enumerate()
        .for_each_init(&new_tiles, |tiles, (item, c)| {
            let (nb2, mb2) = (item / mblk, item % mblk);
            let ni = (b.nblk - 2 * nb2).min(2);
            let mi = (mtiles - 2 * mb2).min(2);
            // the tile counts as constants, so the k loop has no per-tile branches
            let blk = Block {
                b,
                a: &a,
                lda,
                row0: 2 * mb2 * TILE_ROWS,
                nb0: 2 * nb2,
            };
            match (mi, ni) {
                (2, 2) => blk.run::<T, 2, 2>(tiles, c),
                (2, _) => blk.run::<T, 2, 1>(tiles, c),
                (_, 2) => blk.run::<T, 1, 2>(tiles, c),
                _ => blk.run::<T, 1, 1>(tiles, c),
            }
        });
    out.par_chunks_mut(b.rows).enumerate().for_each(|(t, row)| {
        let (mb2, tr) = (t / BLK, t % BLK);
        for (r, v) in row.iter_mut().enumerate() {
            let (nb2, rr) = (r / BLK, r % BLK);
            *v = blocks[(nb2 * mblk + mb2) * BLK * BLK + tr * BLK + rr];
        }
    });
    Ok(out)
}

/// The AMX blocked product with emulated tiles (any machine): `[n_tokens][rows]` int32 sums.
pub fn gemm_i32_emulated(b: &AmxPackedB, xq: &[i8], n_tokens: usize) -> Result<Vec<i32>> {
    gemm_with(b, xq, n_tokens, EmuTiles::new)
}

/// The AMX blocked product on the hardware tiles: `[n_tokens][rows]` int32 sums;
/// [`Error::Unsupported`] where [`detect`] fails (`LOWBIT_AMX` is not consulted here).
pub fn gemm_i32(b: &AmxPackedB, xq: &[i8], n_tokens: usize) -> Result<Vec<i32>> {
    detect().map_err(|e| Error::Unsupported(format!("AMX: {e}")))?;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `detect` succeeded (AMX-TILE/INT8 present, tile data permitted); each
        // `HwTiles` is created and dropped by the same rayon worker inside one work piece.
        gemm_with(b, xq, n_tokens, || unsafe { HwTiles::new() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (b, xq, n_tokens);
        Err(Error::Unsupported("AMX needs x86-64".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b_offsets_cover_the_tile_once() {
        let mut seen = [false; TILE_BYTES];
        for n in 0..TILE_N {
            for k in 0..TILE_K {
                let o = b_tile_offset(n, k);
                assert!(!seen[o]);
                seen[o] = true;
            }
        }
    }
}
