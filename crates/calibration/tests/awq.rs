//! AWQ against RTN on output error, its Gram-matrix objective against a replay of the raw
//! inputs, and the folding identity.

mod common;

use common::{layer, scheme, Layer};
use lowbit_calibration::*;

fn stats(l: &Layer) -> InputStats {
    let mut s = InputStats::new(l.cols);
    for (i, chunk) in l.x.chunks(700 * l.cols).enumerate() {
        let _ = i;
        s.add_rows(chunk, chunk.len() / l.cols).unwrap();
    }
    s
}

/// Effective weight of an AWQ result in the original space: `Q(W diag(s)) diag(s)⁻¹`.
fn unscale(dq: &[f32], cols: usize, s: &[f32]) -> Vec<f32> {
    dq.chunks(cols)
        .flat_map(|r| r.iter().zip(s).map(|(a, b)| a / b))
        .collect()
}

#[test]
fn awq_beats_rtn_on_output_error() {
    // Two linears reading the same input (like gate/up), a few outlier input channels.
    let a = layer(96, 320, 2048, 5, 12.0, 11);
    let b = layer(64, 320, 1, 0, 1.0, 12);
    let st = stats(&a);
    let lin = [
        LinearWeight {
            w: &a.w,
            rows: a.rows,
        },
        LinearWeight {
            w: &b.w,
            rows: b.rows,
        },
    ];
    for name in [
        "int4-g128-sym",
        "int4-g128-asym",
        "int3-g128-sym",
        "nvfp4",
        "mxfp4",
        "nf4-g64",
    ] {
        let s = scheme(name);
        let res = awq(&lin, &st, &s, &[true, true], &AwqConfig::default()).unwrap();
        let mut tot_awq = 0.0;
        let mut tot_rtn = 0.0;
        for (k, (w, rows)) in [(&a.w, a.rows), (&b.w, b.rows)].into_iter().enumerate() {
            let r = rtn_dequantized(w, rows, a.cols, &s, &RtnConfig::default()).unwrap();
            let e_rtn = relative_output_error(w, &r, rows, a.cols, &a.x, a.n).unwrap();
            let eff = unscale(&res.linears[k].dequantized, a.cols, &res.scales.scales);
            let e_awq = relative_output_error(w, &eff, rows, a.cols, &a.x, a.n).unwrap();
            // The Gram-matrix error equals the replayed one.
            let e_rep = res.linears[k].rel_error;
            assert!(
                (e_rep - e_awq).abs() <= 1e-3 * e_awq + 1e-7,
                "{name}: {e_rep} vs {e_awq}"
            );
            assert_eq!(
                res.linears[k].tensor.dequantize().unwrap(),
                res.linears[k].dequantized
            );
            tot_awq += e_awq;
            tot_rtn += e_rtn;
        }
        eprintln!(
            "{name}: alpha {:?} rtn {tot_rtn:.5} awq {tot_awq:.5} (search: rtn {:.5} scaled {:.5})",
            res.scales.alpha, res.scales.rel_error_rtn, res.scales.rel_error
        );
        assert!(res.scales.alpha.is_some(), "{name}: scaling never helped");
        assert!(res.scales.rel_error < res.scales.rel_error_rtn);
        assert!(
            tot_awq < 0.95 * tot_rtn,
            "{name}: awq {tot_awq} vs rtn {tot_rtn}"
        );
    }
}

#[test]
fn clipping_never_hurts_the_objective() {
    let l = layer(64, 256, 1024, 2, 6.0, 13);
    let st = stats(&l);
    let lin = [LinearWeight {
        w: &l.w,
        rows: l.rows,
    }];
    let s = scheme("int3-g128-asym");
    let with = awq(&lin, &st, &s, &[true], &AwqConfig::default()).unwrap();
    let without = awq(&lin, &st, &s, &[false], &AwqConfig::default()).unwrap();
    eprintln!(
        "clip {} no clip {}",
        with.linears[0].rel_error, without.linears[0].rel_error
    );
    assert!(with.linears[0].rel_error <= without.linears[0].rel_error * (1.0 + 1e-6));
}

#[test]
fn folding_preserves_the_function() {
    // y = W (γ ⊙ x)  ==  (W diag(s)) ((γ / s) ⊙ x)
    let l = layer(8, 16, 4, 0, 1.0, 14);
    let gamma: Vec<f32> = (0..16).map(|j| 0.5 + j as f32 * 0.1).collect();
    let s: Vec<f32> = (0..16).map(|j| 0.25 + (j % 5) as f32).collect();
    let mut ws = l.w.clone();
    fold::scale_columns(&mut ws, 8, 16, &s).unwrap();
    let mut g2 = gamma.clone();
    fold::divide_norm_weight(&mut g2, &s).unwrap();
    for t in 0..l.n {
        let x = &l.x[t * 16..(t + 1) * 16];
        for r in 0..8 {
            let y0: f32 = (0..16).map(|j| l.w[r * 16 + j] * gamma[j] * x[j]).sum();
            let y1: f32 = (0..16).map(|j| ws[r * 16 + j] * g2[j] * x[j]).sum();
            assert!((y0 - y1).abs() <= 1e-5 * (1.0 + y0.abs()));
        }
    }
    assert!(fold::scale_columns(&mut ws, 8, 16, &[0.0; 16]).is_err());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let l = layer(8, 32, 64, 0, 1.0, 15);
    let s = scheme("int4-g32-sym");
    let empty = InputStats::new(32);
    let lin = [LinearWeight { w: &l.w, rows: 8 }];
    assert!(matches!(
        awq(&lin, &empty, &s, &[true], &AwqConfig::default()),
        Err(Error::NoData(_))
    ));
    let st = stats(&l);
    let bad = [LinearWeight {
        w: &l.w[..100],
        rows: 8,
    }];
    assert!(matches!(
        awq(&bad, &st, &s, &[true], &AwqConfig::default()),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        awq(&lin, &st, &s, &[], &AwqConfig::default()),
        Err(Error::Shape(_))
    ));
}
