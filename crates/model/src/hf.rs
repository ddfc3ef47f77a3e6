//! Hugging Face model folders: tensors from single or sharded `*.safetensors` files
//! (memory-mapped; the shard map comes from `model.safetensors.index.json`), converted from
//! f32 / f16 / bf16 to f32. `config.json` parsing lives in [`crate::config`].

use crate::{Error, Result};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn get(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One parsed `.safetensors` file (header validated, data memory-mapped).
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    header_len: usize,
    meta: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.meta.tensors().len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-map and validate one file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private map of a checkpoint file that this process does not modify;
        // an external truncation while mapped could fault, the accepted contract of mmap'd
        // checkpoints (the safetensors crate documents the same usage).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mmap(map))
    }

    /// Parse a file held in memory (tests, fuzzing). `name` is used in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(PathBuf::from(name), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let (header_len, meta) =
            SafeTensors::read_metadata(bytes.get()).map_err(|e| Error::Safetensors {
                path: path.clone(),
                what: format!("invalid header: {e}"),
            })?;
        Ok(SafetensorsFile {
            path,
            bytes,
            header_len,
            meta,
        })
    }

    /// Tensor names in data order.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// (dtype name, shape, raw little-endian bytes) of one tensor.
    pub fn tensor_raw(&self, name: &str) -> Result<(String, Vec<usize>, &[u8])> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let (s, e) = info.data_offsets;
        let start = 8 + self.header_len;
        // Offsets were validated against the buffer by `read_metadata`.
        let data =
            self.bytes
                .get()
                .get(start + s..start + e)
                .ok_or_else(|| Error::Safetensors {
                    path: self.path.clone(),
                    what: format!("tensor `{name}` data {s}..{e} lies outside the file"),
                })?;
        Ok((format!("{:?}", info.dtype), info.shape.clone(), data))
    }

    /// One tensor converted to f32 (F32, F16 and BF16 are supported).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let dtype = info.dtype;
        let (_, shape, data) = self.tensor_raw(name)?;
        let v: Vec<f32> = match dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedType {
                    tensor: name.to_string(),
                    ty: format!("{other:?} (only F32, F16, BF16 convert to f32)"),
                })
            }
        };
        Ok((shape, v))
    }

    /// The free-form `__metadata__` map of the header.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }
}

/// A Hugging Face model folder's tensors across one or more safetensors shards.
#[derive(Debug)]
pub struct SafetensorsFolder {
    dir: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// Tensor name -> shard index, in a stable (shard, data) order.
    names: Vec<(String, usize)>,
    index: HashMap<String, usize>,
}

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl SafetensorsFolder {
    /// Open a folder: `model.safetensors.index.json` when present (its `weight_map` names the
    /// shard of every tensor), else `model.safetensors`, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self> {
        let err = |what: String| Error::Safetensors {
            path: dir.to_path_buf(),
            what,
        };
        let index_path = dir.join(INDEX_FILE);
        let mut files: Vec<String>;
        let mut weight_map: Option<Vec<(String, String)>> = None;
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                    path: index_path.clone(),
                    what: format!("not JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    what: "no `weight_map` object".into(),
                })?;
            let mut wm = Vec::with_capacity(map.len());
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    what: format!("weight_map entry `{name}` is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::Safetensors {
                        path: index_path.clone(),
                        what: format!(
                            "weight_map entry `{name}` names `{file}` outside the folder"
                        ),
                    });
                }
                wm.push((name.clone(), file.to_string()));
            }
            files = wm.iter().map(|(_, f)| f.clone()).collect();
            files.sort();
            files.dedup();
            weight_map = Some(wm);
        } else if dir.join("model.safetensors").is_file() {
            files = vec!["model.safetensors".into()];
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            files = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
        }
        if files.is_empty() {
            return Err(err(
                "no *.safetensors files (and no model.safetensors.index.json)".into(),
            ));
        }
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            shards.push(SafetensorsFile::open(&dir.join(f))?);
        }
        let mut names = Vec::new();
        let mut index = HashMap::new();
        match weight_map {
            Some(wm) => {
                for (name, file) in wm {
                    let si = files
                        .iter()
                        .position(|f| *f == file)
                        .expect("file list built from the map");
                    if shards[si].meta.info(&name).is_none() {
                        return Err(err(format!(
                            "index maps `{name}` to {file}, which does not contain it"
                        )));
                    }
                    index.insert(name.clone(), si);
                    names.push((name, si));
                }
                names.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            }
            None => {
                for (si, s) in shards.iter().enumerate() {
                    for name in s.names() {
                        if index.insert(name.clone(), si).is_some() {
                            return Err(err(format!(
                                "tensor `{name}` appears in more than one file"
                            )));
                        }
                        names.push((name, si));
                    }
                }
            }
        }
        Ok(SafetensorsFolder {
            dir: dir.to_path_buf(),
            shards,
            names,
            index,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name (shard by shard).
    pub fn names(&self) -> Vec<String> {
        self.names.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn shard(&self, name: &str) -> Result<&SafetensorsFile> {
        self.index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// (shape, values) of one tensor converted to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        self.shard(name)?.tensor_f32(name)
    }

    /// (dtype name such as `"BF16"`, shape, raw bytes) of one tensor.
    pub fn tensor_raw(&self, name: &str) -> Result<(String, Vec<usize>, &[u8])> {
        self.shard(name)?.tensor_raw(name)
    }
}
