//! Safetensors folders (single, sharded with an index) and model resolution through a hub
//! cache laid out by the test.

use lowbit_model::hf::{SafetensorsFile, SafetensorsFolder};
use lowbit_model::resolve::{hub_cache_dir_from, resolve_model, ModelSource, RepoId};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowbit-hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// (name, dtype, shape, values) -> safetensors bytes.
fn st_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, v)| {
            let bytes: Vec<u8> = match d {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
                _ => unreachable!(),
            };
            (n.to_string(), *d, s.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn single_file_folder_converts_every_float_dtype() {
    let d = tmp("single");
    let bytes = st_bytes(&[
        (
            "a",
            Dtype::F32,
            vec![2, 3],
            vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0],
        ),
        ("b", Dtype::F16, vec![4], vec![0.5, -1.5, 2048.0, 0.0]),
        ("c", Dtype::BF16, vec![2, 1], vec![-3.0, 256.0]),
        ("i", Dtype::I32, vec![1], vec![7.0]),
    ]);
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    let f = SafetensorsFolder::open(&d).unwrap();
    let mut names = f.names();
    names.sort();
    assert_eq!(names, ["a", "b", "c", "i"]);
    assert_eq!(
        f.tensor_f32("a").unwrap(),
        (vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0])
    );
    assert_eq!(f.tensor_f32("b").unwrap().1, vec![0.5, -1.5, 2048.0, 0.0]);
    assert_eq!(f.tensor_f32("c").unwrap(), (vec![2, 1], vec![-3.0, 256.0]));
    let (dt, shape, raw) = f.tensor_raw("c").unwrap();
    assert_eq!((dt.as_str(), shape, raw.len()), ("BF16", vec![2, 1], 4));
    let e = f.tensor_f32("i").unwrap_err().to_string();
    assert!(e.contains("`i`") && e.contains("I32"), "{e}");
    assert!(f.tensor_f32("zzz").unwrap_err().to_string().contains("zzz"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn sharded_folder_follows_the_index() {
    let d = tmp("sharded");
    std::fs::write(
        d.join("model-00001-of-00002.safetensors"),
        st_bytes(&[("x.w", Dtype::F32, vec![2], vec![1.0, 2.0])]),
    )
    .unwrap();
    std::fs::write(
        d.join("model-00002-of-00002.safetensors"),
        st_bytes(&[
            ("y.w", Dtype::BF16, vec![1], vec![4.0]),
            ("z.w", Dtype::F16, vec![1], vec![-1.0]),
        ]),
    )
    .unwrap();
    let index = r#"{"metadata": {"total_size": 10}, "weight_map": {
        "x.w": "model-00001-of-00002.safetensors",
        "y.w": "model-00002-of-00002.safetensors",
        "z.w": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(d.join("model.safetensors.index.json"), index).unwrap();
    let f = SafetensorsFolder::open(&d).unwrap();
    assert_eq!(f.names(), ["x.w", "y.w", "z.w"]);
    assert_eq!(f.tensor_f32("y.w").unwrap().1, vec![4.0]);
    assert_eq!(f.tensor_f32("x.w").unwrap().1, vec![1.0, 2.0]);

    // An index that maps a tensor to the wrong shard is rejected, naming the tensor.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        index.replace("\"y.w\": \"model-00002", "\"y.w\": \"model-00001"),
    )
    .unwrap();
    let e = SafetensorsFolder::open(&d).unwrap_err().to_string();
    assert!(e.contains("y.w"), "{e}");
    // ... and one that escapes the folder.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../x.safetensors"}}"#,
    )
    .unwrap();
    assert!(SafetensorsFolder::open(&d).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hostile_safetensors_bytes_give_errors_not_panics() {
    let good = st_bytes(&[
        ("a", Dtype::F32, vec![2], vec![1.0, 2.0]),
        ("b", Dtype::F16, vec![3], vec![1.0, 2.0, 3.0]),
    ]);
    SafetensorsFile::from_bytes("good", good.clone()).unwrap();
    for n in 0..good.len() {
        let e = SafetensorsFile::from_bytes("t", good[..n].to_vec())
            .expect_err("truncated file must fail");
        assert!(e.to_string().contains("safetensors t"), "{e}");
    }
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0xff;
        if let Ok(f) = SafetensorsFile::from_bytes("t", b) {
            for n in f.names() {
                let _ = f.tensor_f32(&n);
            }
        }
    }
    // A header length of 2^60.
    let mut b = (1u64 << 60).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    assert!(SafetensorsFile::from_bytes("huge", b).is_err());
}

fn lay_out_cache(hub: &Path, repo: &str, commit: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let root = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snap = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs").join("main"), commit).unwrap();
    for (n, b) in files {
        std::fs::write(snap.join(n), b).unwrap();
    }
    snap
}

#[test]
fn resolves_paths_and_cached_repo_ids() {
    let d = tmp("resolve");
    let hub = d.join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = lay_out_cache(
        &hub,
        "Org/Tiny-Model",
        commit,
        &[("config.json", b"{}"), ("tokenizer.json", b"{}")],
    );
    assert_eq!(
        resolve_model("Org/Tiny-Model", Some(&hub)).unwrap(),
        ModelSource::HfFolder(snap.clone())
    );
    assert_eq!(
        resolve_model(&format!("Org/Tiny-Model@{commit}"), Some(&hub)).unwrap(),
        ModelSource::HfFolder(snap.clone())
    );
    // A tag ref pointing at the same snapshot.
    std::fs::write(
        hub.join("models--Org--Tiny-Model/refs/v1"),
        format!("{commit}\n"),
    )
    .unwrap();
    assert_eq!(
        resolve_model("Org/Tiny-Model@v1", Some(&hub))
            .unwrap()
            .path(),
        snap
    );

    // Missing repo / revision: the error says what to do.
    let e = resolve_model("Org/Other", Some(&hub))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cargo xtask fetch Org/Other")
            && e.contains("HF_ENDPOINT")
            && e.contains("--model"),
        "{e}"
    );
    assert!(resolve_model("Org/Tiny-Model@nope", Some(&hub)).is_err());
    assert!(resolve_model("not a model", Some(&hub))
        .unwrap_err()
        .to_string()
        .contains("ORG/NAME"));

    // Local paths: a GGUF file, a folder with one GGUF, an HF folder, a non-GGUF file.
    let g = d.join("m.gguf");
    std::fs::write(&g, b"GGUF\x03\0\0\0").unwrap();
    assert_eq!(
        resolve_model(g.to_str().unwrap(), None).unwrap(),
        ModelSource::Gguf(g.clone())
    );
    assert_eq!(
        resolve_model(d.to_str().unwrap(), None).unwrap(),
        ModelSource::Gguf(g.clone())
    );
    assert_eq!(
        resolve_model(snap.to_str().unwrap(), None).unwrap(),
        ModelSource::HfFolder(snap.clone())
    );
    let txt = d.join("notes.txt");
    std::fs::write(&txt, b"hello").unwrap();
    assert!(resolve_model(txt.to_str().unwrap(), None)
        .unwrap_err()
        .to_string()
        .contains("GGUF"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn repo_ids_and_cache_dir_rules() {
    assert_eq!(RepoId::parse("a/b").unwrap().revision, "main");
    assert_eq!(
        RepoId::parse("HuggingFaceTB/SmolLM2-135M@v1.0")
            .unwrap()
            .revision,
        "v1.0"
    );
    for bad in ["a", "a/b/c", "../b", "a/b@", "/abs/path", "a b/c"] {
        assert!(RepoId::parse(bad).is_none(), "{bad}");
    }
    assert_eq!(RepoId::parse("a/b").unwrap().cache_folder(), "models--a--b");
    let s = |x: &str| Some(std::ffi::OsString::from(x));
    assert_eq!(
        hub_cache_dir_from(s("/c"), s("/h"), None, s("/home")),
        PathBuf::from("/c")
    );
    assert_eq!(
        hub_cache_dir_from(None, s("/h"), s("/x"), s("/home")),
        PathBuf::from("/h/hub")
    );
    assert_eq!(
        hub_cache_dir_from(None, None, s("/x"), s("/home")),
        PathBuf::from("/x/huggingface/hub")
    );
    assert_eq!(
        hub_cache_dir_from(s(""), None, None, s("/home")),
        PathBuf::from("/home/.cache/huggingface/hub")
    );
}
