//! `quantize_into` (buffer reuse) against `quantize`: the same tensor, bit for bit, whatever the
//! reused tensor held before (other schemes, other shapes, garbage bytes), for one-row and 2-D
//! blocks, symmetric and asymmetric schemes, ragged shapes.

use lowbit_numerics::quantize::{quantize, quantize_into, QuantOptions};
use lowbit_numerics::{QuantizedTensor, Scheme};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            match (s >> 8) % 13 {
                0 => 0.0,
                1 => -0.0,
                2 => ((s >> 20) % 13) as f32 * 0.5 - 3.0,
                3 => u * 1e-39,
                _ if i % 97 == 5 => u * 40.0,
                _ => u * 0.05,
            }
        })
        .collect()
}

fn same(a: &QuantizedTensor, b: &QuantizedTensor, what: &str) {
    assert_eq!(a.scheme, b.scheme, "{what}: scheme");
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "{what}: shape");
    assert_eq!(a.data, b.data, "{what}: data");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.scales), bits(&b.scales), "{what}: scales");
    assert_eq!(a.zero_points, b.zero_points, "{what}: zero points");
    assert_eq!(
        a.global_scale.map(f32::to_bits),
        b.global_scale.map(f32::to_bits),
        "{what}: global scale"
    );
    assert!(a.g_idx.is_none() && b.g_idx.is_none(), "{what}: g_idx");
    assert!(a.nested.is_none() && b.nested.is_none(), "{what}: nested");
}

#[test]
fn quantize_into_matches_quantize_on_dirty_reused_buffers() {
    let names = [
        "int4-g128-asym",
        "nvfp4",
        "int4-g128-sym",
        "mxfp4",
        "nf4-g64",
        "fp8-pc",
        "int8-pc",
        "fp8-b128",
        "int3-g32-sym",
        "mxfp8-e5m2",
        "int4-g32-asym",
        "nf4-g16",
        "ternary",
    ];
    let shapes = [(7usize, 300usize), (3, 4096), (16, 131), (1, 17)];
    let opts = QuantOptions::default();
    // one tensor reused across every scheme and shape, its buffers scribbled on between uses
    let mut q = quantize(
        &data(64, 1),
        2,
        32,
        &Scheme::from_name("int8-pc").unwrap(),
        &opts,
    )
    .unwrap();
    let mut cases = 0;
    for (k, name) in names.iter().enumerate() {
        let scheme = Scheme::from_name(name).unwrap();
        for (si, &(rows, cols)) in shapes.iter().enumerate() {
            let w = data(rows * cols, (k * 10 + si) as u64 + 3);
            let want = quantize(&w, rows, cols, &scheme, &opts).unwrap();
            // twice: into whatever the last case left, then into its own (same-length) buffers
            for pass in 0..2 {
                q.data.iter_mut().for_each(|b| *b = 0xA5);
                q.scales.iter_mut().for_each(|s| *s = f32::NAN);
                if let Some(z) = &mut q.zero_points {
                    z.iter_mut().for_each(|b| *b = 0x5A);
                }
                quantize_into(&w, rows, cols, &scheme, &opts, &mut q).unwrap();
                same(&q, &want, &format!("{name} {rows}x{cols} pass {pass}"));
                cases += 1;
            }
        }
    }
    assert_eq!(cases, names.len() * shapes.len() * 2);
}

#[test]
fn quantize_into_reports_errors_like_quantize() {
    let scheme = Scheme::from_name("int4-g128-asym").unwrap();
    let opts = QuantOptions::default();
    let mut q = quantize(&data(256, 9), 2, 128, &scheme, &opts).unwrap();
    let mut w = data(256, 10);
    w[77] = f32::NAN;
    let a = quantize(&w, 2, 128, &scheme, &opts).unwrap_err();
    let b = quantize_into(&w, 2, 128, &scheme, &opts, &mut q).unwrap_err();
    assert_eq!(format!("{a}"), format!("{b}"));
    assert!(quantize_into(&w[..100], 2, 128, &scheme, &opts, &mut q).is_err());
    // the tensor is still usable afterwards
    let w = data(256, 11);
    quantize_into(&w, 2, 128, &scheme, &opts, &mut q).unwrap();
    same(
        &q,
        &quantize(&w, 2, 128, &scheme, &opts).unwrap(),
        "after errors",
    );
}
