//! `cargo xtask fetch ORG/NAME`: download a model from the Hugging Face Hub (or a mirror named
//! by HF_ENDPOINT) into the standard hub cache, with the `hf-hub` crate (sync API, ureq).
//!
//! Without `--file` it fetches `config.json`, the tokenizer files, and the safetensors weights
//! (the shards named by `model.safetensors.index.json`, or `model.safetensors`). With
//! `--file NAME` (repeatable) it fetches exactly those files, e.g. one `.gguf`.
//! `HF_HUB_OFFLINE=1` never touches the network: it only reports what the cache holds.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use lowbit_model::resolve::{
    cached_snapshot, hub_cache_dir, hub_offline, resolve_model, ModelSource, RepoId,
};
use std::path::{Path, PathBuf};

/// Arguments of `cargo xtask fetch`.
#[derive(clap::Args)]
pub struct Args {
    /// Repository id ORG/NAME (e.g. HuggingFaceTB/SmolLM2-135M-Instruct); `@REV` may be appended.
    pub repo: String,
    /// Branch, tag or commit to fetch (default: main, or the `@REV` of the repo id).
    #[arg(long)]
    pub revision: Option<String>,
    /// Fetch only this file (repeatable), e.g. `--file model-q4_k_m.gguf`.
    #[arg(long)]
    pub file: Vec<String>,
    /// Hub cache folder (default: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Hub endpoint (default: HF_ENDPOINT, else https://huggingface.co).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Emit one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
}

/// Files fetched besides the weights when present in the repo.
const CONFIG_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
const INDEX: &str = "model.safetensors.index.json";

/// What a fetch produced.
#[derive(Debug, serde::Serialize)]
pub struct Fetched {
    /// `ORG/NAME`.
    pub repo: String,
    /// The revision asked for.
    pub revision: String,
    /// The snapshot folder in the cache.
    pub snapshot: PathBuf,
    /// Files now in the snapshot (name, bytes); files already cached are not downloaded again.
    pub files: Vec<(String, u64)>,
}

fn what_to_do(endpoint: &str) -> String {
    format!(
        "could not reach the hub at {endpoint}. No machine in this project reaches huggingface.co: set \
         HF_ENDPOINT (or --endpoint) to a reachable mirror, e.g. `HF_ENDPOINT=http://mirror:8080 cargo xtask \
         fetch ...`, or skip fetching and pass a local folder or .gguf file with --model \
         (e.g. --model ../shared/models/smollm2-135m-instruct-q4_1.gguf)"
    )
}

fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(b) if matches!(**b, ureq::Error::StatusCode(404)))
}

fn api_err(endpoint: &str, file: &str, e: ApiError) -> anyhow::Error {
    match &e {
        ApiError::RequestError(b) => match &**b {
            ureq::Error::StatusCode(404) => anyhow!("{file}: not found at {endpoint} (404)"),
            ureq::Error::StatusCode(401 | 403) => {
                anyhow!("{file}: access denied by {endpoint}: a gated repo needs HF_TOKEN set to a token with access")
            }
            ureq::Error::StatusCode(c) => anyhow!("{file}: HTTP {c} from {endpoint}"),
            other => anyhow!("{file}: {other}: {}", what_to_do(endpoint)),
        },
        _ => anyhow!("{file}: {e}"),
    }
}

/// The weight files of a repo: index shards, else `model.safetensors`.
fn weight_files(repo: &ApiRepo, listed: Option<&[String]>, endpoint: &str) -> Result<Vec<String>> {
    let has = |f: &str| listed.is_none_or(|l| l.iter().any(|x| x == f));
    if has(INDEX) {
        match repo.get(INDEX) {
            Ok(p) => {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
                    .with_context(|| format!("{INDEX} is not JSON"))?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .context("index without weight_map")?;
                let mut shards: Vec<String> = map
                    .values()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                shards.sort();
                shards.dedup();
                let mut out = vec![INDEX.to_string()];
                out.extend(shards);
                return Ok(out);
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(endpoint, INDEX, e)),
        }
    }
    if let Some(l) = listed {
        let st: Vec<String> = l
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect();
        if !st.is_empty() {
            return Ok(st);
        }
    }
    Ok(vec!["model.safetensors".to_string()])
}

/// Fetch into `hub` from `endpoint` (never called when offline).
pub fn fetch_online(
    id: &RepoId,
    files: &[String],
    hub: &Path,
    endpoint: &str,
    progress: bool,
) -> Result<Fetched> {
    let api = ApiBuilder::new()
        .with_cache_dir(hub.to_path_buf())
        .with_endpoint(endpoint.trim_end_matches('/').to_string())
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .with_progress(progress)
        .with_retries(0)
        .build()
        .map_err(|e| anyhow!("cannot set up the hub client: {e}"))?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let (required, optional): (Vec<String>, Vec<String>) = if files.is_empty() {
        // The file list, when the endpoint has the API; mirrors without it still serve files.
        let listed = match repo.info() {
            Ok(info) => Some(
                info.siblings
                    .into_iter()
                    .map(|s| s.rfilename)
                    .collect::<Vec<_>>(),
            ),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(api_err(endpoint, &format!("repo info of {}", id.repo), e)),
        };
        let mut req = vec!["config.json".to_string()];
        req.extend(weight_files(&repo, listed.as_deref(), endpoint)?);
        let opt = CONFIG_FILES[1..]
            .iter()
            .filter(|f| listed.as_ref().is_none_or(|l| l.iter().any(|x| x == *f)))
            .map(|f| f.to_string())
            .collect();
        (req, opt)
    } else {
        (files.to_vec(), vec![])
    };
    let mut got = Vec::new();
    for f in &required {
        let p = repo.get(f).map_err(|e| api_err(endpoint, f, e))?;
        got.push((f.clone(), p));
    }
    for f in &optional {
        match repo.get(f) {
            Ok(p) => got.push((f.clone(), p)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(endpoint, f, e)),
        }
    }
    let snapshot = got
        .first()
        .and_then(|(f, p)| {
            p.ancestors()
                .nth(Path::new(f).components().count())
                .map(Path::to_path_buf)
        })
        .context("nothing fetched")?;
    let files = got
        .iter()
        .map(|(f, p)| {
            Ok((
                f.clone(),
                std::fs::metadata(p)
                    .with_context(|| format!("{}", p.display()))?
                    .len(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Fetched {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        snapshot,
        files,
    })
}

/// Offline: report what the cache holds for the repo (and the named files), or fail saying why.
pub fn fetch_offline(id: &RepoId, files: &[String], hub: &Path) -> Result<Fetched> {
    let snap = cached_snapshot(hub, id).ok_or_else(|| {
        anyhow!(
            "HF_HUB_OFFLINE is set and revision `{}` of {} is not in the cache {}: unset HF_HUB_OFFLINE (with \
             HF_ENDPOINT pointing at a reachable mirror) or pass a local path with --model",
            id.revision,
            id.repo,
            hub.display()
        )
    })?;
    let names: Vec<String> = if files.is_empty() {
        let mut v: Vec<String> = std::fs::read_dir(&snap)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        v.sort();
        v
    } else {
        files.to_vec()
    };
    let mut out = Vec::new();
    for f in names {
        let p = snap.join(&f);
        let len = std::fs::metadata(&p)
            .map_err(|_| {
                anyhow!(
                    "HF_HUB_OFFLINE is set and {f} of {} is not cached in {}",
                    id.repo,
                    snap.display()
                )
            })?
            .len();
        out.push((f, len));
    }
    if files.is_empty() {
        resolve_model(snap.to_str().context("non-UTF-8 cache path")?, None)
            .map_err(|e| anyhow!("the cached snapshot is incomplete: {e}"))?;
    }
    Ok(Fetched {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        snapshot: snap,
        files: out,
    })
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let mut id = RepoId::parse(&args.repo).ok_or_else(|| {
        anyhow!(
            "`{}` is not a repo id of the form ORG/NAME[@REVISION]",
            args.repo
        )
    })?;
    if let Some(r) = &args.revision {
        id.revision = r.clone();
    }
    let hub = args.cache_dir.clone().unwrap_or_else(hub_cache_dir);
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    let fetched = if hub_offline() {
        fetch_offline(&id, &args.file, &hub)?
    } else {
        eprintln!(
            "fetching {}@{} from {endpoint} into {}",
            id.repo,
            id.revision,
            hub.display()
        );
        fetch_online(&id, &args.file, &hub, &endpoint, !args.json)?
    };
    let source = resolve_model(fetched.snapshot.to_str().unwrap_or_default(), None).ok();
    if args.json {
        let mut v = serde_json::to_value(&fetched)?;
        v["model"] = match &source {
            Some(ModelSource::HfFolder(p)) | Some(ModelSource::Gguf(p)) => {
                p.display().to_string().into()
            }
            None => serde_json::Value::Null,
        };
        println!("{v}");
    } else {
        for (f, n) in &fetched.files {
            println!("{n:>14}  {f}");
        }
        println!("snapshot: {}", fetched.snapshot.display());
        match source {
            Some(s) => println!(
                "use it with: --model {}   (or --model {})",
                s.path().display(),
                args.repo
            ),
            None if !args.file.is_empty() => {}
            None => bail!(
                "the snapshot at {} does not look like a model folder",
                fetched.snapshot.display()
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;

    const COMMIT: &str = "1111222233334444555566667777888899990000";

    /// A minimal hub mirror on 127.0.0.1: the repo API and `resolve/` with Range support.
    fn serve(files: HashMap<String, Vec<u8>>, with_api: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let files = files.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut w = stream;
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut range_start = None;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            range_start = v
                                .trim()
                                .split('-')
                                .next()
                                .and_then(|s| s.parse::<usize>().ok());
                            let end = v
                                .trim()
                                .split('-')
                                .nth(1)
                                .and_then(|s| s.parse::<usize>().ok());
                            if end == Some(0) {
                                range_start = Some(usize::MAX); // the 1-byte metadata probe
                            }
                        }
                    }
                    let api_prefix = "/api/models/org/tiny/revision/main";
                    let (status, body, extra) = if path == api_prefix && with_api {
                        let sib: Vec<_> = files
                            .keys()
                            .map(|k| serde_json::json!({"rfilename": k}))
                            .collect();
                        let j = serde_json::json!({"sha": COMMIT, "siblings": sib}).to_string();
                        ("200 OK", j.into_bytes(), String::new())
                    } else if let Some(f) = path
                        .strip_prefix("/org/tiny/resolve/main/")
                        .and_then(|n| files.get(n))
                    {
                        let etag = format!(
                            "\"{:016x}\"",
                            f.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64)
                                .wrapping_mul(0x100000001b3))
                        );
                        let (s, body) = match range_start {
                            Some(usize::MAX) => (0, f[..1].to_vec()),
                            Some(s) => (s, f[s..].to_vec()),
                            None => (0, f.clone()),
                        };
                        let end = s + body.len().max(1) - 1;
                        let extra = format!(
                            "ETag: {etag}\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {s}-{end}/{}\r\n",
                            f.len()
                        );
                        ("206 Partial Content", body, extra)
                    } else {
                        ("404 Not Found", b"not found".to_vec(), String::new())
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                        body.len()
                    );
                    let _ = w.write_all(head.as_bytes());
                    let _ = w.write_all(&body);
                });
            }
        });
        format!("http://{addr}")
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lowbit-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn repo_files() -> HashMap<String, Vec<u8>> {
        let mut m = HashMap::new();
        m.insert(
            "config.json".to_string(),
            br#"{"architectures":["LlamaForCausalLM"]}"#.to_vec(),
        );
        m.insert("tokenizer.json".to_string(), b"{\"model\":{}}".to_vec());
        m.insert(
            INDEX.to_string(),
            br#"{"weight_map":{"a":"model-1.safetensors","b":"model-2.safetensors"}}"#.to_vec(),
        );
        m.insert("model-1.safetensors".to_string(), vec![7u8; 3000]);
        m.insert("model-2.safetensors".to_string(), vec![9u8; 10]);
        m.insert("extra.gguf".to_string(), b"GGUF\x03\0\0\0".to_vec());
        m
    }

    #[test]
    fn fetches_a_sharded_repo_from_a_local_mirror_into_the_hub_layout() {
        for with_api in [true, false] {
            let endpoint = serve(repo_files(), with_api);
            let hub = tmp(&format!("hub-{with_api}"));
            let id = RepoId::parse("org/tiny").unwrap();
            let f = fetch_online(&id, &[], &hub, &endpoint, false).unwrap();
            let mut names: Vec<&str> = f.files.iter().map(|(n, _)| n.as_str()).collect();
            names.sort();
            assert_eq!(
                names,
                [
                    "config.json",
                    "model-1.safetensors",
                    "model-2.safetensors",
                    INDEX,
                    "tokenizer.json"
                ]
            );
            assert_eq!(
                f.snapshot,
                hub.join("models--org--tiny/snapshots").join(COMMIT)
            );
            assert_eq!(
                std::fs::read(f.snapshot.join("model-1.safetensors")).unwrap(),
                vec![7u8; 3000]
            );
            assert_eq!(
                std::fs::read_to_string(hub.join("models--org--tiny/refs/main")).unwrap(),
                COMMIT
            );
            // The model crate resolves the repo id through the same cache.
            assert_eq!(
                resolve_model("org/tiny", Some(&hub)).unwrap(),
                ModelSource::HfFolder(f.snapshot.clone())
            );
            // A single named file.
            let g = fetch_online(&id, &["extra.gguf".to_string()], &hub, &endpoint, false).unwrap();
            assert_eq!(g.files, vec![("extra.gguf".to_string(), 8)]);
            // Offline: served from the cache; a file that is not cached is an error naming it.
            let o = fetch_offline(&id, &["config.json".to_string()], &hub).unwrap();
            assert_eq!(o.files[0].0, "config.json");
            let e = fetch_offline(&id, &["nope.bin".to_string()], &hub)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("nope.bin") && e.contains("HF_HUB_OFFLINE"),
                "{e}"
            );
            std::fs::remove_dir_all(&hub).unwrap();
        }
    }

    #[test]
    fn missing_files_and_unreachable_endpoints_say_what_to_do() {
        let endpoint = serve(repo_files(), true);
        let hub = tmp("missing");
        let id = RepoId::parse("org/tiny").unwrap();
        let e = fetch_online(&id, &["absent.gguf".to_string()], &hub, &endpoint, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.gguf") && e.contains("404"), "{e}");
        // A port nobody listens on.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let e = fetch_online(&id, &[], &hub, &dead, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_ENDPOINT") && e.contains("--model"), "{e}");
        let e = fetch_offline(&RepoId::parse("org/other").unwrap(), &[], &hub)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HF_HUB_OFFLINE") && e.contains("org/other"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&hub);
    }
}
