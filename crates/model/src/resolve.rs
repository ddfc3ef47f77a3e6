//! Resolving `--model` specs: a local Hugging Face folder, a `.gguf` file, or a repo id
//! `ORG/NAME[@REVISION]` looked up in the standard Hugging Face hub cache
//! (`<hub>/models--ORG--NAME/{refs/<rev>, snapshots/<commit>/...}`). No network access here:
//! `cargo xtask fetch` fills the cache.

use crate::{Error, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face layout folder (`config.json`, `*.safetensors`, `tokenizer.json`).
    HfFolder(PathBuf),
}

impl ModelSource {
    /// The file or folder path.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfFolder(p) => p,
        }
    }
}

/// The hub cache folder from explicit variable values: `HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `$XDG_CACHE_HOME/huggingface/hub`, else `$HOME/.cache/huggingface/hub`.
pub fn hub_cache_dir_from(
    hf_hub_cache: Option<OsString>,
    hf_home: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let nonempty = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(p) = nonempty(hf_hub_cache) {
        return p;
    }
    if let Some(p) = nonempty(hf_home) {
        return p.join("hub");
    }
    if let Some(p) = nonempty(xdg_cache_home) {
        return p.join("huggingface").join("hub");
    }
    nonempty(home)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// The hub cache folder from the environment (see [`hub_cache_dir_from`]).
pub fn hub_cache_dir() -> PathBuf {
    let v = |k: &str| std::env::var_os(k);
    hub_cache_dir_from(
        v("HF_HUB_CACHE"),
        v("HF_HOME"),
        v("XDG_CACHE_HOME"),
        v("HOME"),
    )
}

/// Whether `HF_HUB_OFFLINE` asks for no network access (`1`, `true`, `yes`, `on`).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// A parsed repo id: `ORG/NAME` plus an optional `@REVISION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl RepoId {
    /// Parse `ORG/NAME[@REV]`; None when the text is not shaped like a repo id.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, rev) = match spec.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !ok(org) || !ok(name) || rev.contains("..") || rev.starts_with('/') {
            return None;
        }
        Some(RepoId {
            repo: repo.to_string(),
            revision: rev.to_string(),
        })
    }

    /// The cache folder name, `models--ORG--NAME`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// The snapshot folder of a repo in a hub cache, if the revision is there.
pub fn cached_snapshot(hub: &Path, id: &RepoId) -> Option<PathBuf> {
    let root = hub.join(id.cache_folder());
    let rev = &id.revision;
    if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        let p = root.join("snapshots").join(rev);
        return p.is_dir().then_some(p);
    }
    let commit = std::fs::read_to_string(root.join("refs").join(rev)).ok()?;
    let commit = commit.trim();
    if commit.is_empty() || commit.contains('/') || commit.contains("..") {
        return None;
    }
    let p = root.join("snapshots").join(commit);
    p.is_dir().then_some(p)
}

/// Classify a local file or folder.
fn classify(p: &Path) -> Result<ModelSource> {
    if p.is_file() {
        let mut magic = [0u8; 4];
        let is_gguf = std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|_| &magic == b"GGUF");
        if is_gguf {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        return Err(Error::Resolve(format!(
            "{} is a file but not a GGUF file (no `GGUF` magic)",
            p.display()
        )));
    }
    let has = |n: &str| p.join(n).is_file();
    let list = |ext: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|x| x.to_string_lossy().ends_with(ext))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    if has("config.json") || !list(".safetensors").is_empty() {
        return Ok(ModelSource::HfFolder(p.to_path_buf()));
    }
    let ggufs = list(".gguf");
    match ggufs.len() {
        1 => Ok(ModelSource::Gguf(ggufs[0].clone())),
        0 => Err(Error::Resolve(format!(
            "{} holds neither config.json/*.safetensors nor a .gguf file",
            p.display()
        ))),
        _ => Err(Error::Resolve(format!(
            "{} holds several .gguf files; pass one of them: {}",
            p.display(),
            ggufs
                .iter()
                .map(|g| g.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Resolve a `--model` spec: an existing path (GGUF file, HF folder, or folder with one GGUF),
/// else a repo id `ORG/NAME[@REV]` in the hub cache (`cache_dir`, or [`hub_cache_dir`]).
pub fn resolve_model(spec: &str, cache_dir: Option<&Path>) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.exists() {
        return classify(p);
    }
    let hub = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(hub_cache_dir);
    let Some(id) = RepoId::parse(spec) else {
        return Err(Error::Resolve(format!(
            "model `{spec}` is not an existing path and not a repo id of the form ORG/NAME[@REVISION]"
        )));
    };
    match cached_snapshot(&hub, &id) {
        Some(snap) => classify(&snap),
        None => Err(Error::Resolve(format!(
            "model `{spec}` is not a local path and revision `{}` of {} is not in the Hugging Face cache {} \
             (looked for {}/refs/{}). Fetch it with `cargo xtask fetch {} --revision {}` (set HF_ENDPOINT \
             to a reachable mirror; huggingface.co is not reachable from every machine), or pass a local \
             folder or .gguf file with --model",
            id.revision,
            id.repo,
            hub.display(),
            id.cache_folder(),
            id.revision,
            id.repo,
            id.revision
        ))),
    }
}
