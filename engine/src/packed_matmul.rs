//! `ai.meridian:PackedMatMulNBits`: the CPU kernel for the int4 decoder's matrix products.
//!
//! ONNX Runtime's `MatMulNBits` (4-bit weights, int8 activations with `accuracy_level` 4) unpacks
//! each block of weights once per row of activations. At batch 8 its products took 13–16 ms of a
//! 23–30 ms decode step here (ORT's profiler), barely faster per row than at batch 1. This kernel
//! computes the same function, weights `(q - z) · s` in blocks of 32 along K and activations
//! quantised to int8 per row and block of 32 (scale `max|x| / 127`, as ORT's), but unpacks each
//! block of 16 columns once for up to 8 rows and multiplies with AVX-512 VNNI's `vpdpbusd`.
//!
//! The converter (`engine/convert/pack.py`) writes the weights in the layout `vpdpbusd` takes, so
//! the engine never holds two copies: per tile of 16 columns and block of 32 K, a 320-byte record
//! of four 64-byte vectors whose 32-bit lane `j` holds column `j`'s codes for 8 K (K `8p..8p+4`
//! in the low nibbles, `8p+4..8p+8` in the high ones), then a cache line of the 16 scales
//! (float16, as the quantizer rounds them) and the 16 zero points (bytes). Tiles go in pairs, the
//! two tiles' records of a block side by side, block after block, so that the pairs a thread takes
//! are one stream to read. At batch 1 the products are bound by reading those records, and the
//! two choices together made batch 1 1.4× as fast (`pack.py` has the figures). The model
//! directory keeps the standard `model.onnx` for other providers and other CPUs, and for the
//! Python tools that score it.

use std::cell::RefCell;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

/// The packed graph's file name in a model directory, beside `model.onnx`.
pub const PACKED_MODEL: &str = "model.packed.onnx";
/// The custom operator domain of the packed graph.
pub const DOMAIN: &str = "ai.meridian";
/// The operator's name in the packed graph.
pub const OP: &str = "PackedMatMulNBits";

/// K per quantisation block, of weights and of activations.
const BLOCK: usize = 32;
/// Columns per tile: one 512-bit vector of 32-bit sums.
const TILE: usize = 16;
/// Bytes of codes per tile and block.
const TILE_BYTES: usize = TILE * BLOCK / 2;
/// Where a record's 16 scales (f16) begin.
const SCALES: usize = TILE_BYTES;
/// Where a record's 16 zero points (u8) begin.
const ZERO_POINTS: usize = SCALES + 2 * TILE;
/// Bytes per tile and block: the codes, then a cache line holding the scales, the zero points and
/// 16 bytes unused, so that every record starts a cache line.
const RECORD: usize = TILE_BYTES + 64;

/// Whether this CPU runs the kernel (x86-64 with AVX-512 F, BW and VNNI).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The operator domain to register on a session that opens a packed graph. Only call it where
/// [`supported`] holds: the kernel refuses to run otherwise.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?.add(PackedMatMulNBits)
}

struct PackedMatMulNBits;

impl Operator for PackedMatMulNBits {
    type Kernel<'attr> = PackedKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32), OperatorInput::required(TensorElementType::Uint8)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<PackedKernel> {
        let dim = |name: &str| -> ort::Result<usize> {
            let v: i64 = info.get(name).ok_or_else(|| ort::Error::new(format!("{OP}: attribute {name} is missing")))?;
            usize::try_from(v).map_err(|_| ort::Error::new(format!("{OP}: attribute {name} is {v}")))
        };
        let (k, n) = (dim("K")?, dim("N")?);
        if k == 0 || n == 0 || k % BLOCK != 0 || n % TILE != 0 {
            return Err(ort::Error::new(format!(
                "{OP}: K {k} and N {n} must be positive multiples of {BLOCK} and {TILE}"
            )));
        }
        if !supported() {
            return Err(ort::Error::new(format!("{OP}: this CPU lacks AVX-512 VNNI")));
        }
        Ok(PackedKernel { k, n })
    }
}

/// One node's kernel: its shape.
struct PackedKernel {
    k: usize,
    n: usize,
}

thread_local! {
    /// The activations of the node running on this thread, quantised: one buffer per thread, as a
    /// session runs its nodes one after another. A buffer per node would keep, in each of the
    /// model's 121 nodes, the codes of the longest prompt it ever saw (~100 MB after 1,000 tokens).
    static ACTIVATIONS: RefCell<Activations> = RefCell::new(Activations::default());
}

/// Bytes of quantised activations kept on a thread between nodes: a decode step's (8 rows of at
/// most 1,536 codes) stay, a long prompt's are released after its node.
const KEEP_ACTIVATIONS: usize = 1 << 20;

/// Activations quantised per row and block: codes, scales, and scales times the codes' sums
/// (the zero points' share of each product).
#[derive(Default)]
struct Activations {
    codes: Vec<i8>,
    scales: Vec<f32>,
    scaled_sums: Vec<f32>,
}

/// A shared output pointer: the parallel units write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every unit of `par_for` writes its own tiles' columns only.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl Kernel for PackedKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| ctx.input(i)?.ok_or_else(|| ort::Error::new(format!("{OP}: input {i} is missing")));
        let (x, records) = (input(0)?, input(1)?);
        let (x_shape, x) = x.try_extract_tensor::<f32>()?;
        let (_, records) = records.try_extract_tensor::<u8>()?;
        let (k, n) = (self.k, self.n);
        let blocks = k / BLOCK;
        let tiles = n / TILE;
        if x_shape.last().copied() != Some(k as i64) {
            return Err(ort::Error::new(format!("{OP}: input of shape {x_shape:?}, K is {k}")));
        }
        if records.len() != tiles * blocks * RECORD {
            return Err(ort::Error::new(format!("{OP}: packed weights do not hold K {k} × N {n}")));
        }
        let rows = x.len() / k;
        let mut out_shape = x_shape.to_vec();
        *out_shape.last_mut().expect("checked above") = n as i64;
        let mut out = ctx.output(0, out_shape)?.ok_or_else(|| ort::Error::new(format!("{OP}: no output")))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        if rows == 0 {
            return Ok(());
        }
        let weights = Weights { records, blocks };
        ACTIVATIONS.with_borrow_mut(|acts| {
            // SAFETY: `supported` held when the kernel was created, and K is a multiple of 32.
            unsafe { acts.quantize(x) };
            // Units of whole tile pairs, a few per thread so that a slower thread is not waited on.
            let pairs = tiles.div_ceil(2);
            let units = pairs.min(16);
            let ptr = OutPtr(out.as_mut_ptr());
            let shared: &Activations = acts;
            let done = ctx.par_for(units, 0, move |u| {
                let ptr = ptr;
                let (first, last) = (u * pairs / units * 2, ((u + 1) * pairs / units * 2).min(tiles));
                // SAFETY: `supported` held when the kernel was created; the slices were checked
                // against K and N above, and this unit writes only columns of tiles first..last.
                unsafe { product(&weights, shared, rows, n, first..last, ptr.0) };
            });
            if acts.codes.capacity() > KEEP_ACTIVATIONS {
                *acts = Activations::default();
            }
            done
        })
    }
}

/// One node's packed weights: a record per tile and block, in pairs of tiles (the last tile of an
/// odd count alone), each pair's records block after block, its two tiles' side by side.
struct Weights<'a> {
    records: &'a [u8],
    blocks: usize,
}

impl Activations {
    /// Quantises `x` ([rows, K]) to int8 per row and block of 32, ORT's way: scale `max|x| / 127`,
    /// codes `x / scale` rounded to nearest-even.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; `x.len()` is a multiple of 32.
    unsafe fn quantize(&mut self, x: &[f32]) {
        let blocks = x.len() / BLOCK;
        self.codes.resize(x.len(), 0);
        self.scales.resize(blocks, 0.0);
        self.scaled_sums.resize(blocks, 0.0);
        // SAFETY: forwarded from the caller; the buffers were sized to `x` above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            vnni::quantize(x, &mut self.codes, &mut self.scales, &mut self.scaled_sums)
        };
    }
}

/// Writes `out[r][16t..16t+16]` for every row and every tile `t` of `tiles`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `out` holds `rows × n` floats; `weights` and `acts` hold
/// the tiles and rows named.
#[cfg(target_arch = "x86_64")]
unsafe fn product(
    weights: &Weights,
    acts: &Activations,
    rows: usize,
    n: usize,
    tiles: std::ops::Range<usize>,
    out: *mut f32,
) {
    let mut t = tiles.start;
    while t < tiles.end {
        let pair = tiles.end - t >= 2;
        let mut r = 0;
        while r < rows {
            // SAFETY: forwarded from the caller.
            let step = unsafe {
                match (rows - r, pair) {
                    (8.., true) => vnni::tile::<8, 2>(weights, acts, r, t, n, out),
                    (4.., true) => vnni::tile::<4, 2>(weights, acts, r, t, n, out),
                    (2.., true) => vnni::tile::<2, 2>(weights, acts, r, t, n, out),
                    (_, true) => vnni::tile::<1, 2>(weights, acts, r, t, n, out),
                    (8.., false) => vnni::tile::<8, 1>(weights, acts, r, t, n, out),
                    (4.., false) => vnni::tile::<4, 1>(weights, acts, r, t, n, out),
                    (2.., false) => vnni::tile::<2, 1>(weights, acts, r, t, n, out),
                    (_, false) => vnni::tile::<1, 1>(weights, acts, r, t, n, out),
                }
            };
            r += step;
        }
        t += if pair { 2 } else { 1 };
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn product(_: &Weights, _: &Activations, _: usize, _: usize, _: std::ops::Range<usize>, _: *mut f32) {
    unreachable!("the kernel is only created where `supported` holds")
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Activations, Weights, BLOCK, RECORD, SCALES, TILE, ZERO_POINTS};
    use std::arch::x86_64::*;

    /// `R` rows × `T` tiles from row `row` and tile `tile`, which begins a pair (`T` = 2) or is the
    /// lone last tile of an odd count (`T` = 1); returns `R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize, const T: usize>(
        w: &Weights,
        a: &Activations,
        row: usize,
        tile: usize,
        n: usize,
        out: *mut f32,
    ) -> usize {
        let blocks = w.blocks;
        let k = blocks * BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for b in 0..blocks {
            for t in 0..T {
                // A pair's records interleave its two tiles; a lone last tile's follow each other.
                let at = tile * blocks + b * T + t;
                // SAFETY (whole body): indices stay inside the slices the caller vouched for.
                let (codes, s, zs) = unsafe {
                    let rec = w.records.as_ptr().add(at * RECORD);
                    let s = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(SCALES).cast()));
                    let z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(rec.add(ZERO_POINTS).cast())));
                    (rec, s, _mm512_mul_ps(z, s))
                };
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for p in 0..4 {
                    let v = unsafe { _mm512_loadu_si512(codes.add(p * 64).cast()) };
                    lo[p] = _mm512_and_si512(v, low);
                    hi[p] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let at = (row + r) * k + b * BLOCK;
                    let quads = unsafe { a.codes.as_ptr().add(at).cast::<i32>() };
                    let (mut d0, mut d1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for p in 0..4 {
                        let (q0, q1) =
                            unsafe { (quads.add(2 * p).read_unaligned(), quads.add(2 * p + 1).read_unaligned()) };
                        d0 = _mm512_dpbusd_epi32(d0, lo[p], _mm512_set1_epi32(q0));
                        d1 = _mm512_dpbusd_epi32(d1, hi[p], _mm512_set1_epi32(q1));
                    }
                    let ab = (row + r) * blocks + b;
                    let (scale, scaled_sum) =
                        unsafe { (*a.scales.get_unchecked(ab), *a.scaled_sums.get_unchecked(ab)) };
                    let dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), _mm512_set1_ps(scale));
                    acc_r[t] = _mm512_fmadd_ps(dot, s, acc_r[t]);
                    acc_r[t] = _mm512_fnmadd_ps(zs, _mm512_set1_ps(scaled_sum), acc_r[t]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (t, v) in acc_r.iter().enumerate() {
                unsafe { _mm512_storeu_ps(out.add((row + r) * n + (tile + t) * TILE), *v) };
            }
        }
        R
    }

    /// [`Activations::quantize`]'s loop: per block of 32, the scale, the codes (saturated to
    /// int8) and the scale times the codes' sum.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(x: &[f32], codes: &mut [i8], scales: &mut [f32], scaled_sums: &mut [f32]) {
        for (b, (scale, scaled_sum)) in scales.iter_mut().zip(scaled_sums.iter_mut()).enumerate() {
            // SAFETY: the caller sized `x` and `codes` to 32 per scale.
            unsafe {
                let p = x.as_ptr().add(b * BLOCK);
                let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                let s = max / 127.0;
                let inverse = _mm512_set1_ps(if s != 0.0 { 1.0 / s } else { 0.0 });
                // The default rounding mode (MXCSR) is to nearest-even.
                let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse));
                let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse));
                let c = codes.as_mut_ptr().add(b * BLOCK);
                _mm_storeu_si128(c.cast(), _mm512_cvtsepi32_epi8(q0));
                _mm_storeu_si128(c.add(16).cast(), _mm512_cvtsepi32_epi8(q1));
                *scale = s;
                *scaled_sum = s * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)) as f32;
            }
        }
    }
}
