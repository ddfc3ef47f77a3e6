//! The [`Method`] driver: every method runs on a group, calibrated methods beat RTN on the
//! group's output error, and stats rescaling matches recomputed statistics.

mod common;

use common::{layer, scheme};
use lowbit_calibration::*;

#[test]
fn every_method_runs_and_calibrated_ones_beat_rtn() {
    let a = layer(48, 256, 1024, 3, 10.0, 41);
    let b = layer(32, 256, 1, 0, 1.0, 42);
    let mut st = InputStats::new(256);
    st.add_rows(&a.x, a.n).unwrap();
    let lin = [
        LinearWeight { w: &a.w, rows: 48 },
        LinearWeight { w: &b.w, rows: 32 },
    ];
    let s = scheme("int4-g64-asym");
    let err = |r: &GroupResult| -> f64 {
        lin.iter()
            .zip(&r.linears)
            .map(|(l, q)| {
                let eff: Vec<f32> = match &r.scales {
                    Some(sc) => q
                        .dequantized
                        .chunks(256)
                        .flat_map(|row| row.iter().zip(sc).map(|(x, s)| x / s))
                        .collect(),
                    None => q.dequantized.clone(),
                };
                relative_output_error(l.w, &eff, l.rows, 256, &a.x, a.n).unwrap()
            })
            .sum()
    };
    let rtn_err = err(&quantize_group(
        &lin,
        256,
        None,
        &s,
        &[true, true],
        &Method::from_name("rtn").unwrap(),
    )
    .unwrap());
    for name in ["gptq", "awq", "hqq", "sq"] {
        let m = Method::from_name(name).unwrap();
        assert_eq!(m.needs_calibration(), name != "hqq");
        let r = quantize_group(&lin, 256, Some(&st), &s, &[true, true], &m).unwrap();
        let e = err(&r);
        eprintln!("{name}: {e:.5} (rtn {rtn_err:.5})");
        if name == "gptq" || name == "awq" {
            assert!(e < rtn_err, "{name}: {e} vs {rtn_err}");
        }
        assert_eq!(r.scales.is_some(), name == "awq" || name == "sq");
    }
    let sq_gptq = Method::SmoothQuant(SqConfig::default(), Some(GptqConfig::default()));
    let r = quantize_group(
        &lin,
        256,
        Some(&st),
        &scheme("int8-pc"),
        &[true, true],
        &sq_gptq,
    )
    .unwrap();
    let sq_rtn = quantize_group(
        &lin,
        256,
        Some(&st),
        &scheme("int8-pc"),
        &[true, true],
        &Method::from_name("sq").unwrap(),
    )
    .unwrap();
    assert!(
        err(&r) < err(&sq_rtn),
        "SQ+GPTQ {} vs SQ+RTN {}",
        err(&r),
        err(&sq_rtn)
    );
    assert!(matches!(
        quantize_group(
            &lin,
            256,
            None,
            &s,
            &[true, true],
            &Method::from_name("gptq").unwrap()
        ),
        Err(Error::NoData(_))
    ));
    assert!(Method::from_name("nope").is_err());
}

#[test]
fn divided_stats_equal_stats_of_divided_inputs() {
    let l = layer(4, 40, 300, 2, 8.0, 43);
    let s: Vec<f32> = (0..40).map(|j| 0.5 + (j % 7) as f32 * 0.75).collect();
    let mut a = InputStats::new(40);
    a.add_rows(&l.x, l.n).unwrap();
    a.divide_channels(&s).unwrap();
    let xs: Vec<f32> =
        l.x.chunks(40)
            .flat_map(|r| r.iter().zip(&s).map(|(x, f)| x / f))
            .collect();
    let mut b = InputStats::new(40);
    b.add_rows(&xs, l.n).unwrap();
    let (ha, hb) = (a.hessian.hessian().unwrap(), b.hessian.hessian().unwrap());
    for (x, y) in ha.iter().zip(&hb) {
        assert!((x - y).abs() <= 1e-4 * y.abs().max(1e-3), "{x} vs {y}");
    }
    for (x, y) in a.abs_max().unwrap().iter().zip(&b.abs_max().unwrap()) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-6));
    }
    for (x, y) in a.abs_mean().unwrap().iter().zip(&b.abs_mean().unwrap()) {
        assert!((x - y).abs() <= 1e-4 * y.abs().max(1e-6));
    }
}
