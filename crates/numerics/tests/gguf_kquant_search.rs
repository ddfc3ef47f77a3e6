//! `gguf::quantize_with`: the Q4_K/Q5_K `KQuantSearch::Fast` option against the reference
//! search on random and adversarial super-blocks. (The reference's AVX2 lane search is checked
//! bit for bit against the scalar `make_qkx2_quants` port in the crate's unit tests; the
//! golden vectors check it against ggml.)

use lowbit_numerics::gguf::{self, GgmlType, KQuantSearch};
use lowbit_numerics::Error;

fn xorshift(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Super-blocks of many kinds, 256 values each.
fn blocks() -> Vec<(&'static str, Vec<f32>)> {
    let mut u = xorshift(7);
    let mut gauss = move || (u() + u() + u() + u() - 2.0) * 1.732;
    let mut out = Vec::new();
    let normal: Vec<f32> = (0..256 * 16).map(|_| gauss() * 0.02).collect();
    out.push(("gaussian", normal));
    let outliers: Vec<f32> = (0..256 * 16)
        .map(|i| gauss() * 0.02 * if i % 97 == 3 { 12.0 } else { 1.0 })
        .collect();
    out.push(("gaussian with outliers", outliers));
    out.push(("zeros", vec![0.0; 256]));
    out.push(("constant", vec![0.37; 256]));
    out.push(("negative constant", vec![-1.5; 256]));
    let mut one = vec![0.0f32; 256];
    one[77] = 5.0;
    out.push(("one outlier in zeros", one));
    let neg: Vec<f32> = (0..256).map(|_| -1.0 - gauss().abs()).collect();
    out.push(("negative only", neg));
    let pos: Vec<f32> = (0..256).map(|_| 3.0 + gauss().abs()).collect();
    out.push(("positive offset", pos));
    let tiny: Vec<f32> = (0..256).map(|_| gauss() * 1e-30).collect();
    out.push(("tiny", tiny));
    // Large, but with the super-block scale d = max scale / 63 still inside f16.
    let huge: Vec<f32> = (0..256).map(|_| gauss() * 3e4).collect();
    out.push(("huge", huge));
    out
}

fn rms_err(ty: GgmlType, x: &[f32], search: KQuantSearch) -> f64 {
    let mut packed = Vec::new();
    gguf::quantize_with(ty, x, &mut packed, search).unwrap();
    assert_eq!(packed.len(), ty.row_bytes(x.len()).unwrap());
    let mut y = vec![0.0f32; x.len()];
    gguf::dequantize(ty, &packed, &mut y).unwrap();
    let se: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| {
            assert!(b.is_finite(), "{ty}: non-finite output {b} for input {a}");
            (*a as f64 - *b as f64).powi(2)
        })
        .sum();
    (se / x.len() as f64).sqrt()
}

#[test]
fn reference_is_the_default_and_fast_stays_close_to_it() {
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
        for (name, x) in blocks() {
            let mut a = Vec::new();
            let mut b = Vec::new();
            gguf::quantize(ty, &x, &mut a).unwrap();
            gguf::quantize_with(ty, &x, &mut b, KQuantSearch::default()).unwrap();
            assert_eq!(a, b, "{ty} {name}: default search is not the reference");

            let reference = rms_err(ty, &x, KQuantSearch::Reference);
            let fast = rms_err(ty, &x, KQuantSearch::Fast);
            let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            // Same format, different sub-block search: Fast may lose a little, never a lot.
            // (Measured on the Gaussian blocks: about 5% above the reference.)
            assert!(
                fast <= reference * 1.25 + scale * 1e-6,
                "{ty} {name}: fast RMS error {fast:e} vs reference {reference:e}"
            );
        }
    }
}

#[test]
fn zeros_are_exact_with_both_searches() {
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
        for search in [KQuantSearch::Reference, KQuantSearch::Fast] {
            assert_eq!(rms_err(ty, &[0.0; 256], search), 0.0, "{ty} {search:?}");
            let mut x = [0.0f32; 256];
            x[200] = -0.0;
            assert_eq!(rms_err(ty, &x, search), 0.0, "{ty} {search:?}");
        }
    }
}

#[test]
fn non_finite_input_is_an_error_with_both_searches() {
    for search in [KQuantSearch::Reference, KQuantSearch::Fast] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.1f32; 512];
            x[300] = bad;
            let mut out = Vec::new();
            let err = gguf::quantize_with(GgmlType::Q4_K, &x, &mut out, search).unwrap_err();
            assert!(
                matches!(err, Error::NonFinite { index: 300, .. }),
                "{search:?} {bad}: {err:?}"
            );
        }
    }
}
