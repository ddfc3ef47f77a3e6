//! GGUF reader/writer: round trip of every value type, and hostile input.

use lowbit_model::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use lowbit_model::Error;

fn every_type_writer(alignment: Option<u32>) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", GgufValue::String("llama".into()));
    if let Some(a) = alignment {
        w.add_kv("general.alignment", GgufValue::U32(a));
    }
    w.add_kv("t.u8", GgufValue::U8(200))
        .add_kv("t.i8", GgufValue::I8(-5))
        .add_kv("t.u16", GgufValue::U16(60000))
        .add_kv("t.i16", GgufValue::I16(-30000))
        .add_kv("t.u32", GgufValue::U32(4_000_000_000))
        .add_kv("t.i32", GgufValue::I32(-2_000_000_000))
        .add_kv("t.f32", GgufValue::F32(0.15625))
        .add_kv("t.bool", GgufValue::Bool(true))
        .add_kv("t.str", GgufValue::String("héllo wörld".into()))
        .add_kv("t.u64", GgufValue::U64(u64::MAX - 3))
        .add_kv("t.i64", GgufValue::I64(i64::MIN + 1))
        .add_kv("t.f64", GgufValue::F64(1.0 / 3.0))
        .add_kv(
            "t.arr_i32",
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]),
        )
        .add_kv(
            "t.arr_str",
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String(String::new()),
            ]),
        )
        .add_kv(
            "t.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::F32(1.5), GgufValue::F32(-2.0)]),
                GgufValue::Array(vec![GgufValue::F32(3.0)]),
            ]),
        );
    let f32s: Vec<u8> = (0..15)
        .flat_map(|i| (i as f32 * 0.5 - 3.0).to_le_bytes())
        .collect();
    w.add_tensor("a.weight", &[5, 3], GgmlType::F32, f32s)
        .unwrap();
    let f16s: Vec<u8> = (0..7)
        .flat_map(|i| half::f16::from_f32(i as f32 - 2.5).to_le_bytes())
        .collect();
    w.add_tensor("b.bias", &[7], GgmlType::F16, f16s).unwrap();
    let bf16s: Vec<u8> = (0..4)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 8.0).to_le_bytes())
        .collect();
    w.add_tensor("c.norm", &[2, 2], GgmlType::BF16, bf16s)
        .unwrap();
    // One Q8_0 block with d = 1.0 and q = 0..32, i.e. the values 0..31.
    let mut q8 = half::f16::from_f32(1.0).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| i as u8));
    w.add_tensor("d.q8", &[32, 1], GgmlType::Q8_0, q8).unwrap();
    w
}

#[test]
fn round_trip_every_value_type() {
    for align in [None, Some(64u32)] {
        let w = every_type_writer(align);
        let bytes = w.to_bytes().unwrap();
        let f = GgufFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), align.map_or(32, u64::from));
        assert_eq!(f.get("t.u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("t.i8"), Some(&GgufValue::I8(-5)));
        assert_eq!(f.get("t.u16").unwrap().as_u64(), Some(60000));
        assert_eq!(f.get("t.i16").unwrap().as_i64(), Some(-30000));
        assert_eq!(f.get_u64("t.u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get("t.i32"), Some(&GgufValue::I32(-2_000_000_000)));
        assert_eq!(f.get_f32("t.f32").unwrap(), 0.15625);
        assert_eq!(f.get("t.bool").unwrap().as_bool(), Some(true));
        assert_eq!(f.get_str("t.str").unwrap(), "héllo wörld");
        assert_eq!(f.get("t.u64"), Some(&GgufValue::U64(u64::MAX - 3)));
        assert_eq!(f.get("t.i64"), Some(&GgufValue::I64(i64::MIN + 1)));
        assert_eq!(f.get("t.f64").unwrap().as_f64(), Some(1.0 / 3.0));
        assert_eq!(
            f.get("t.arr_str").unwrap().as_array().unwrap()[0].as_str(),
            Some("a")
        );
        let nested = f.get("t.nested").unwrap().as_array().unwrap();
        assert_eq!(nested[0].as_array().unwrap()[1], GgufValue::F32(-2.0));
        let i = f
            .metadata()
            .iter()
            .position(|(k, _)| k == "t.nested")
            .unwrap();
        assert_eq!(f.metadata_types()[i], vec![9, 9, 6]);
        let i = f
            .metadata()
            .iter()
            .position(|(k, _)| k == "t.arr_i32")
            .unwrap();
        assert_eq!(f.metadata_types()[i], vec![9, 5]);

        assert_eq!(f.tensors().len(), 4);
        for t in f.tensors() {
            assert_eq!(t.offset_abs % f.alignment(), 0, "{}", t.name);
            assert!(t.offset_abs >= f.data_start());
        }
        let a = f.tensor_f32("a.weight").unwrap();
        assert_eq!(a.len(), 15);
        assert_eq!(a[3], 3.0 * 0.5 - 3.0);
        assert_eq!(
            f.tensor_f32("b.bias").unwrap(),
            vec![-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
        );
        assert_eq!(f.tensor_f32("c.norm").unwrap(), vec![0.0, 8.0, 16.0, 24.0]);
        let q = f.tensor_info("d.q8").unwrap();
        assert_eq!((q.dims.clone(), q.n_bytes), (vec![32, 1], 34));
        assert_eq!(f.tensor_bytes("d.q8").unwrap()[2..6], [0, 1, 2, 3]);
        let q8: Vec<f32> = (0..32).map(|i| i as f32).collect();
        assert_eq!(f.tensor_f32("d.q8").unwrap(), q8);
        assert!(matches!(f.tensor_bytes("nope"), Err(Error::MissingTensor(n)) if n == "nope"));

        // Re-writing the parsed content gives the same bytes.
        let mut w2 = GgufWriter::new();
        for (k, v) in f.metadata() {
            w2.add_kv(k.clone(), v.clone());
        }
        for t in f.tensors() {
            w2.add_tensor(
                t.name.clone(),
                &t.dims,
                t.ggml_type,
                f.tensor_bytes(&t.name).unwrap().to_vec(),
            )
            .unwrap();
        }
        assert_eq!(w2.to_bytes().unwrap(), bytes);
    }
}

#[test]
fn open_from_disk_uses_the_same_parser() {
    let bytes = every_type_writer(None).to_bytes().unwrap();
    let dir = std::env::temp_dir().join(format!("lowbit-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("x.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.path(), Some(p.as_path()));
    assert_eq!(f.tensor_f32("b.bias").unwrap()[0], -2.5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = every_type_writer(None).to_bytes().unwrap();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let last = f
        .tensors()
        .iter()
        .map(|t| t.offset_abs + t.n_bytes)
        .max()
        .unwrap() as usize;
    for n in 0..bytes.len() {
        let r = GgufFile::from_bytes(bytes[..n].to_vec());
        if n < last {
            let e = r.expect_err(&format!("truncated at {n} must fail"));
            assert!(matches!(e, Error::GgufTruncated { .. }), "at {n}: {e}");
        } else {
            r.unwrap_or_else(|e| panic!("only trailing padding cut at {n}: {e}"));
        }
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let bytes = every_type_writer(Some(64)).to_bytes().unwrap();
    for i in 0..bytes.len() {
        for mask in [0xffu8, 0x80, 0x01] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            if let Ok(f) = GgufFile::from_bytes(b) {
                for t in f.tensors() {
                    let _ = f.tensor_f32(&t.name);
                }
            }
        }
    }
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

#[test]
fn hostile_counts_fail_before_allocating() {
    let e = GgufFile::from_bytes(header(0, 1 << 60)).unwrap_err();
    assert!(e.to_string().contains("metadata_kv_count"), "{e}");
    let e = GgufFile::from_bytes(header(u64::MAX, 0)).unwrap_err();
    assert!(e.to_string().contains("tensor_count"), "{e}");

    // A string claiming 2^62 bytes.
    let mut b = header(0, 1);
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(matches!(e, Error::GgufTruncated { offset: 32, .. }), "{e}");

    // An array of 2^59 u64 under key "k".
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&10u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 59).to_le_bytes());
    b.extend_from_slice(&[0u8; 8]);
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");

    // Arrays nested without bound.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'n');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("nested"), "{e}");
}

#[test]
fn bad_magic_version_and_tensor_fields_are_named() {
    let e = GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec()).unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
    let mut b = header(0, 0);
    b[4] = 9;
    assert!(GgufFile::from_bytes(b)
        .unwrap_err()
        .to_string()
        .contains("version 9"));

    // A tensor whose data lies past the end of the file.
    let mut w = GgufWriter::new();
    w.add_tensor("big", &[4], GgmlType::F32, vec![0; 16])
        .unwrap();
    let mut bytes = w.to_bytes().unwrap();
    bytes.truncate(bytes.len() - 20);
    let e = GgufFile::from_bytes(bytes).unwrap_err();
    assert!(e.to_string().contains("`big`"), "{e}");

    // Unknown ggml type and misaligned offset.
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]).unwrap();
    let good = w.to_bytes().unwrap();
    let type_at = 24 + 8 + 1 + 4 + 8;
    let mut b = good.clone();
    b[type_at] = 99;
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(
        matches!(&e, Error::GgufInvalid { offset, .. } if *offset == type_at as u64),
        "{e}"
    );
    let mut b = good;
    b[type_at + 4] = 4;
    assert!(GgufFile::from_bytes(b)
        .unwrap_err()
        .to_string()
        .contains("alignment"));
}

#[test]
fn writer_rejects_wrong_sizes() {
    let mut w = GgufWriter::new();
    assert!(w.add_tensor("x", &[3], GgmlType::F32, vec![0; 8]).is_err());
    assert!(w
        .add_tensor("q", &[31], GgmlType::Q8_0, vec![0; 34])
        .is_err());
}

/// Opens the real SmolLM2 file when `LOWBIT_SHARED` is set (skipped otherwise).
#[test]
fn real_smollm2_file_when_available() {
    let Some(shared) = std::env::var_os("LOWBIT_SHARED") else {
        return;
    };
    let p = std::path::Path::new(&shared).join("models/smollm2-135m-instruct-q4_1.gguf");
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.tensors().len(), 272);
    let n: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(n, 134_515_008);
    assert_eq!(f.tensor_f32("output_norm.weight").unwrap().len(), 576);
}
