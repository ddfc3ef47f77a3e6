//! `cargo xtask quantize`: quantize a model layer by layer and write a compressed-tensors folder.

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lowbit_model::ct::{self, WriteOptions};
use lowbit_model::quantize::{
    self, model_to_checkpoint, quantize_model, read_calibration_files, sample_windows, CalibConfig,
    Event, Method, ModelToCheckpoint, PipelineOptions, Recipe,
};
use lowbit_model::Model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

const AFTER_HELP: &str = "\
SCHEMES (--scheme):
  int4-g128-sym   INT4, groups of 128 input columns, symmetric (absmax/7), f16 scales
  int4-g128-asym  INT4, groups of 128, asymmetric (min/max, integer zero point)
  int3-g128-sym   INT3, groups of 128, symmetric
  int2-g64-asym   INT2, groups of 64, asymmetric
  int8-pc         INT8 per output channel, symmetric
  fp8-pc          FP8 E4M3 per output channel
  fp8-b128        FP8 E4M3 with 128x128 block scales
  nvfp4           NVFP4: FP4 E2M1, blocks of 16, E4M3 scales + f32 global scale
  mxfp4           MXFP4: FP4 E2M1, blocks of 32, E8M0 scales
  nf4-g64         bitsandbytes NF4, blocks of 64
  w8a8-int8       INT8 per-channel weights + per-token dynamic INT8 activations
  w8a8-fp8        FP8 per-channel weights + per-token dynamic FP8 activations
  w4a4-int        INT4 g128 sym weights + per-token INT4 activations (with --rotate; docs/rotations.md)
  w4a8-int        INT4 g128 sym weights + per-token INT8 activations
  w4a4-nvfp4      NVFP4 weights + NVFP4 activations;  w4a4-mxfp4: MXFP4 weights + activations
  (w8a8-int8 with --rotate quarot|spinquant also goes through the rotation path)

ROTATION (--rotate none|quarot|spinquant, --act-clip, --spin-loss e2e|layer, --spin-iters; --method rtn|gptq, --clip
  absmax|mse): norms folded, R1/R2 folded into the weights, the head untied, an online Hadamard
  before down_proj; lowbit-rotation.json in the folder makes `cargo xtask eval --model OUT` run
  the same online Hadamard and activation quantizers.
  --act-static absmax|percentile:99.9|mse: per-tensor static activation scales, one per decoder
  linear, calibrated on --calib (needed) and stored in lowbit-rotation.json (INT/FP8 only).
  (any other name lowbit_numerics::Scheme::from_name accepts, e.g. int4-g32-asym, works too)

RECIPE (--config FILE, JSON): {\"scheme\": ..., \"targets\": [globs], \"ignore\": [globs],
  \"overrides\": [{\"layers\": [0, 1, -2, -1], \"scheme\": \"int8-pc\"}, {\"modules\": \"*.k_proj\", \"skip\": true}]}
  Embeddings and lm_head are kept unquantized by default. The recipe is saved as lowbit-recipe.json.

OUTPUT: a compressed-tensors folder (config.json with quantization_config, model.safetensors,
  tokenizer, lowbit-report.json); `cargo xtask eval --model OUT` loads it. See docs/checkpoints.md.

EXAMPLE:
  cargo xtask quantize --model ../shared/models/smollm2-135m-instruct-q4_1.gguf --method gptq \\
      --scheme int4-g128-sym --calib ../shared/data/calib/en_sherlock_holmes.txt --out out/smollm-gptq";

/// Arguments of `cargo xtask quantize`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The model: a .gguf file or a Hugging Face folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Algorithm: rtn, gptq, awq, smoothquant, hqq.
    #[arg(long, default_value = "gptq")]
    pub method: String,
    /// Weight scheme (see the list below).
    #[arg(long, default_value = "int4-g128-sym")]
    pub scheme: String,
    /// Calibration text files (UTF-8). Never the evaluation text.
    #[arg(long, num_args = 1..)]
    pub calib: Vec<PathBuf>,
    /// Output folder (written atomically: a temporary sibling renamed at the end).
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Seed of the window sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON recipe: targets, ignore patterns, per-layer / per-module overrides.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The evaluation text you will measure on: calibration files equal to it are refused.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// GPTQ column order: static (llm-compressor default), group (g_idx stored), off.
    #[arg(long, default_value = "static")]
    pub act_order: String,
    /// GPTQ relative damping.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// RTN clipping: absmax or mse.
    #[arg(long, default_value = "absmax")]
    pub clip: String,
    /// SmoothQuant migration strength.
    #[arg(long, default_value_t = 0.8)]
    pub alpha: f32,
    /// One capture pass per layer for all seven linears instead of q/k/v -> o -> gate/up -> down
    /// stages (about twice as fast, slightly less accurate).
    #[arg(long)]
    pub layer_sequential: bool,
    /// Emit the summary as one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Load the whole f32 model into memory first (the pre-streaming path). By default a GGUF
    /// file or safetensors folder is streamed: each decoder layer is dequantized from the
    /// memory-mapped file only when its turn comes and written out (a safetensors shard at a
    /// time) once quantized, so memory stays near one layer's f32 weights plus the calibration
    /// activations. The results are bit-identical.
    #[arg(long)]
    pub in_memory: bool,
    /// Rotation / weight+activation options (docs/rotations.md).
    #[command(flatten)]
    pub rot: RotateArgs,
}

/// `--rotate` and the weight+activation schemes (`w4a4-int`, `w4a8-int`, `w8a8-int8`,
/// `w4a4-nvfp4`, `w4a4-mxfp4`): the model is rotated (norms folded, R1/R2 folded, online
/// Hadamard before down_proj), its weights quantized with --method rtn|gptq (block scales by
/// --clip), and a sidecar `lowbit-rotation.json` makes `cargo xtask eval --model OUT` run the
/// same online Hadamard and activation quantizers.
#[derive(clap::Args, Debug, Clone)]
pub struct RotateArgs {
    /// Rotation: none, quarot (randomized Hadamard) or spinquant (learned on --calib).
    #[arg(long, default_value = "none")]
    pub rotate: String,
    /// Per-token activation clipping ratio in (0, 1] for the weight+activation schemes
    /// (QuaRot uses 0.9).
    #[arg(long, default_value_t = 1.0)]
    pub act_clip: f32,
    /// Static per-tensor activation scales instead of per-token dynamic ones: one scale per
    /// decoder linear, calibrated on --calib through the rotated, weight-quantized model and
    /// saved in lowbit-rotation.json: `absmax`, `percentile:P` (e.g. `percentile:99.9`) or
    /// `mse`. INT / FP8 activation schemes only (not w4a4-nvfp4 / w4a4-mxfp4), without
    /// --act-clip.
    #[arg(long)]
    pub act_static: Option<String>,
    /// SpinQuant options (`--spin-loss`, `--spin-iters`, ...; the held-out windows of
    /// `--spin-select` are drawn in addition to --samples).
    #[command(flatten)]
    pub spin: crate::spin_args::SpinArgs,
}

impl Default for RotateArgs {
    fn default() -> Self {
        RotateArgs {
            rotate: "none".into(),
            act_clip: 1.0,
            act_static: None,
            spin: crate::spin_args::SpinArgs::default(),
        }
    }
}

/// Whether `args` asks for the rotation / weight+activation path ([`RotateArgs`]): a rotation,
/// or a scheme with 4-bit or block-format activations (`w8a8-int8` without a rotation stays on
/// the standard pipeline, SmoothQuant included).
/// Tokenize `--calib` (refusing the `--eval` text), draw `--samples` windows of `--seqlen`
/// tokens with `--seed`, and describe each source file (path, sha256, bytes, tokens) for the
/// report.
fn calibration_windows(args: &Args, tokenizer: &Tok) -> Result<(Vec<Vec<u32>>, Vec<Value>)> {
    let files = read_calibration_files(&args.calib, args.eval.as_deref())?;
    let mut toks = Vec::new();
    let mut srcs = Vec::new();
    for (text, s) in &files {
        let ids = tokenizer
            .encode(text)
            .with_context(|| format!("tokenizing {}", s.path.display()))?;
        srcs.push(
            json!({"path": s.path, "sha256": s.sha256, "bytes": s.bytes, "tokens": ids.len()}),
        );
        toks.extend(ids);
    }
    let cfg = CalibConfig {
        samples: args.samples,
        seqlen: args.seqlen,
        seed: args.seed,
    };
    Ok((sample_windows(&toks, &cfg)?, srcs))
}

fn wants_rotation_path(args: &Args) -> bool {
    let s = args.scheme.trim().to_ascii_lowercase();
    !args.rot.rotate.trim().eq_ignore_ascii_case("none")
        || args.rot.act_static.is_some()
        || matches!(
            s.as_str(),
            "w4a4-int" | "w4a8-int" | "w4a4-nvfp4" | "w4a4-mxfp4"
        )
}

/// The rotation / weight+activation path of [`quantize_to_folder`].
fn quantize_rotated(args: &Args, quiet: bool) -> Result<RunOutput> {
    use lowbit_model::rotate::{
        parse_wa_scheme, parse_weight_clip, prepare, rotated_checkpoint, PrepareOptions,
        RotateMethod, WeightMethod,
    };
    let t_all = Instant::now();
    let rotate = RotateMethod::parse(&args.rot.rotate)?;
    let scheme = parse_wa_scheme(&args.scheme, args.rot.act_clip)?;
    if scheme.quant.is_none() {
        bail!(
            "--rotate needs a weight+activation scheme: {}",
            lowbit_model::rotate::WA_SCHEMES[1..].join(", ")
        );
    }
    let weight_method = WeightMethod::parse(&args.method)
        .with_context(|| "--rotate and the weight+activation schemes take --method rtn or gptq")?;
    if args.config.is_some() {
        bail!("--config recipes are not supported with --rotate / weight+activation schemes");
    }
    let t_load = Instant::now();
    let src = load_source(&args.model)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let act_static = args
        .rot
        .act_static
        .as_deref()
        .map(lowbit_calibration::actquant::StaticCalib::parse)
        .transpose()?;
    let needs = rotate == RotateMethod::Spinquant
        || weight_method == WeightMethod::Gptq
        || act_static.is_some();
    if needs && args.calib.is_empty() {
        bail!(
            "--rotate spinquant, --act-static and --method gptq need --calib FILE (never the \
             evaluation text)"
        );
    }
    let (windows, sources) = if needs {
        let mut a = args.clone();
        if rotate == RotateMethod::Spinquant {
            a.samples += args.rot.spin.spin_select;
        }
        calibration_windows(&a, &src.tokenizer)?
    } else {
        (Vec::new(), Vec::new())
    };
    let spin_opts = args.rot.spin.options()?;
    let opts = PrepareOptions {
        rotate,
        scheme,
        weight_method,
        weight_clipping: parse_weight_clip(&args.clip)?,
        spin: spin_opts.clone(),
        seed: args.seed,
        act_static,
    };
    let mut model = src.model;
    let t = Instant::now();
    let rep = prepare(&mut model, &opts, &windows, &mut |m| {
        if !quiet {
            eprintln!("[{:6.1} s] {m}", t.elapsed().as_secs_f64())
        }
    })?;
    let spin = |r: &Option<lowbit_calibration::spinquant::SpinReport>| {
        r.as_ref().map(|r| {
            json!({"loss_start": r.loss_start, "loss_end": r.loss_end, "iters": r.iters,
                   "seconds": r.seconds, "orthogonality_error": r.orthogonality_error})
        })
    };
    let mut summary = json!({
        "command": "quantize",
        "model": args.model,
        "method": args.method,
        "scheme": args.scheme,
        "rotate": rotate.name(),
        "act_clip": args.rot.act_clip,
        "act_static": args.rot.act_static,
        "activations": opts.scheme.quant.as_ref().map(|(_, a)| format!("{a:?}")),
        "calibration": {
            "files": sources, "samples": windows.len(), "seqlen": args.seqlen, "seed": args.seed,
        },
        "options": { "clip": args.clip, "spin_loss": args.rot.spin.spin_loss, "spin_iters": spin_opts.iters, "spin_lr": spin_opts.lr },
        "spin_r1": spin(&rep.spin_r1),
        "spin_r2": spin(&rep.spin_r2),
        "spin_selection": rep.spin_selection.as_ref().map(|s| json!({
            "windows": s.windows, "seconds": s.seconds, "chosen": s.candidates[s.chosen].name,
            "candidates": s.candidates.iter().map(|c| json!({
                "name": c.name, "kl": c.kl, "nll": c.nll})).collect::<Vec<_>>()})),
        "mean_rel_error": Value::Null,
        "layers": [],
        "timings": { "load_secs": load_secs, "rotate_secs": rep.rotate_seconds,
                     "quantize_secs": rep.quantize_seconds,
                     "act_static_secs": rep.act_static_seconds },
        "threads": rayon::current_num_threads(),
    });
    let t_write = Instant::now();
    let mut extra = src.tokenizer_files.clone();
    summary["timings"]["total_secs_before_write"] = json!(t_all.elapsed().as_secs_f64());
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    extra.push((
        "lowbit-report.json".into(),
        serde_json::to_vec_pretty(&summary)?,
    ));
    let ck = rotated_checkpoint(&model, &opts, &rep, extra)?;
    ct::write_checkpoint(&args.out, &ck, &WriteOptions::default())
        .with_context(|| format!("writing {}", args.out.display()))?;
    summary["timings"]["write_secs"] = json!(t_write.elapsed().as_secs_f64());
    summary["timings"]["total_secs"] = json!(t_all.elapsed().as_secs_f64());
    summary["out"] = json!(args.out);
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    Ok(RunOutput { model, summary })
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The tokenizer of a model file or folder: a GGUF's embedded tokenizer, a folder's
/// `lowbit-tokenizer.gguf` (lowbit checkpoints made from a GGUF), or its `tokenizer.json`.
pub struct Tok(lowbit_model::tokenizer::Tokenizer);

impl Tok {
    /// The tokenizer of a model file or folder.
    pub fn from_model_path(path: &Path) -> Result<Self> {
        use lowbit_model::gguf::GgufFile;
        use lowbit_model::tokenizer::Tokenizer;
        if path.is_file() {
            return Ok(Tok(Tokenizer::from_gguf(&GgufFile::open(path)?)?));
        }
        let g = path.join("lowbit-tokenizer.gguf");
        if g.is_file() {
            return Ok(Tok(Tokenizer::from_gguf(&GgufFile::open(&g)?)?));
        }
        let j = path.join("tokenizer.json");
        if j.is_file() {
            return Ok(Tok(Tokenizer::from_hf_file(&j)?));
        }
        bail!(
            "{}: no tokenizer (expected tokenizer.json or lowbit-tokenizer.gguf)",
            path.display()
        )
    }

    /// Token ids of `text` as one piece, no BOS added (the evaluation protocol).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.0.encode(text)?)
    }
}

/// A loaded source model with what is needed to tokenize and to re-ship its tokenizer.
pub struct Source {
    /// The model.
    pub model: Model,
    /// Tokenizer.
    pub tokenizer: Tok,
    /// Files to copy into a quantized checkpoint so it can tokenize on its own.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
}

/// Load a model (GGUF file or HF folder) with its tokenizer.
pub fn load_source(path: &Path) -> Result<Source> {
    if !path.exists() {
        bail!(
            "model {} not found: pass a .gguf file or a Hugging Face folder \
             (the default model lives in $LOWBIT_SHARED/models/smollm2-135m-instruct-q4_1.gguf)",
            path.display()
        );
    }
    let model = lowbit_model::load::load_model(path)
        .with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = Tok::from_model_path(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    Ok(Source {
        model,
        tokenizer,
        tokenizer_files: tokenizer_files(path)?,
    })
}

/// The tokenizer files a quantized checkpoint of the model at `path` ships: a folder's
/// tokenizer / generation files, or a vocab-only GGUF made from a GGUF file.
fn tokenizer_files(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "lowbit-tokenizer.gguf",
        ] {
            let p = path.join(f);
            if p.is_file() {
                files.push((f.to_string(), std::fs::read(&p)?));
            }
        }
    } else {
        files.push(("lowbit-tokenizer.gguf".to_string(), vocab_only_gguf(path)?));
    }
    Ok(files)
}

/// A vocab-only GGUF holding the source GGUF's `general.architecture` and every `tokenizer.*`
/// key, so a quantized folder made from a GGUF can tokenize exactly like its source.
pub fn vocab_only_gguf(path: &Path) -> Result<Vec<u8>> {
    use lowbit_model::gguf::{GgufFile, GgufValue, GgufWriter};
    let g = GgufFile::open(path)?;
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        if k.starts_with("tokenizer.") || k == "general.architecture" || k == "general.name" {
            w.add_kv(k.clone(), v.clone());
        }
    }
    w.add_kv("general.type", GgufValue::String("vocab".into()));
    Ok(w.to_bytes()?)
}

fn style(t: &str) -> ProgressStyle {
    ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Everything one quantization run produced, for the summary and the demo.
pub struct RunOutput {
    /// The quantized model (still in memory).
    pub model: Model,
    /// The summary object (also saved as lowbit-report.json).
    pub summary: Value,
}

/// Quantize with `args`, write the folder, return the summary.
pub fn quantize_to_folder(args: &Args, quiet: bool) -> Result<RunOutput> {
    if wants_rotation_path(args) {
        return quantize_rotated(args, quiet);
    }
    let t_all = Instant::now();
    let setup = pipeline_setup(args)?;
    let t_load = Instant::now();
    let src = load_source(&args.model)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    // Calibration windows.
    let (windows, sources) = if setup.needs_calib(args) {
        calibration_windows(args, &src.tokenizer)?
    } else {
        (Vec::new(), Vec::new())
    };
    let mut model = src.model;
    let bars = Bars::new(quiet, setup.method, model.config.n_layers, windows.len());
    let report = quantize_model(&mut model, &windows, &setup.opts, &mut |e| bars.on_event(e))?;
    bars.finish();
    let mut summary = run_summary(args, &setup, &sources, windows.len(), &report, load_secs);
    // Write the checkpoint.
    let t_write = Instant::now();
    let mut extra = src.tokenizer_files.clone();
    extra.push((
        "lowbit-recipe.json".into(),
        serde_json::to_vec_pretty(&setup.recipe.to_json())?,
    ));
    let mut ck = model_to_checkpoint(
        &model,
        &ModelToCheckpoint {
            input_activations: setup.act,
            extra_files: extra,
        },
    )?;
    summary["timings"]["total_secs_before_write"] = json!(t_all.elapsed().as_secs_f64());
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    ck.extra_files.push((
        "lowbit-report.json".into(),
        serde_json::to_vec_pretty(&summary)?,
    ));
    ct::write_checkpoint(&args.out, &ck, &WriteOptions::default())
        .with_context(|| format!("writing {}", args.out.display()))?;
    summary["timings"]["write_secs"] = json!(t_write.elapsed().as_secs_f64());
    summary["timings"]["total_secs"] = json!(t_all.elapsed().as_secs_f64());
    summary["out"] = json!(args.out);
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    Ok(RunOutput { model, summary })
}

/// Whether `args` can take the streaming path of [`quantize_streamed`]: the standard pipeline
/// (no rotation), an existing GGUF file or a plain Hugging Face safetensors folder (not a
/// compressed-tensors checkpoint), and no `--in-memory`.
pub fn can_stream(args: &Args) -> bool {
    let p = &args.model;
    !args.in_memory
        && !wants_rotation_path(args)
        && (p.is_file()
            || (p.is_dir()
                && p.join("config.json").is_file()
                && !lowbit_model::quantize::checkpoint::is_compressed_tensors(p)))
}

/// The streaming form of [`quantize_to_folder`] (the default of `cargo xtask quantize`, see
/// [`Args::in_memory`]): the model file is memory-mapped, each decoder layer is dequantized to
/// f32 only when the pipeline reaches it and is written out (a safetensors shard closes once
/// it holds one f32 layer's worth of bytes) as soon as it is quantized. Same tensors, same
/// `config.json` and report as the in-memory path; returns the summary.
pub fn quantize_streamed(args: &Args, quiet: bool) -> Result<Value> {
    use lowbit_model::gguf::GgufFile;
    use lowbit_model::hf::SafetensorsFolder;
    use lowbit_model::load::{config_from_gguf, GgufSource, HfSource};
    use lowbit_model::quantize::{quantize_streaming, CheckpointSink};
    use lowbit_model::weights::TensorSource;
    use lowbit_model::ModelConfig;
    let t_all = Instant::now();
    let setup = pipeline_setup(args)?;
    let path = &args.model;
    let t_load = Instant::now();
    let gguf;
    let folder;
    let (config, mut src): (ModelConfig, Box<dyn TensorSource + '_>) = if path.is_file() {
        gguf = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
        let c = config_from_gguf(&gguf)?;
        (c.clone(), Box::new(GgufSource::new(&gguf, c)))
    } else {
        folder = SafetensorsFolder::open(path)?;
        let c = ModelConfig::from_hf_file(&path.join("config.json"))?;
        (c, Box::new(HfSource::new(&folder)))
    };
    // Fail before any work when the architecture has no checkpoint form.
    lowbit_model::quantize::checkpoint::hf_config_json(&config)?;
    let tokenizer = Tok::from_model_path(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    let tok_files = tokenizer_files(path)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let (windows, sources) = if setup.needs_calib(args) {
        calibration_windows(args, &tokenizer)?
    } else {
        (Vec::new(), Vec::new())
    };
    drop(tokenizer);
    let write_opts = WriteOptions::default();
    let c = &config;
    let layer_f32_bytes =
        4 * c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate_size);
    let flush_bytes = layer_f32_bytes.min(write_opts.shard_bytes);
    let writer = ct::StreamingWriter::create(&args.out, &write_opts)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let mut sink = CheckpointSink::new(writer, flush_bytes, setup.act);
    let bars = Bars::new(quiet, setup.method, config.n_layers, windows.len());
    let report = quantize_streaming(
        &config,
        src.as_mut(),
        &windows,
        &setup.opts,
        &mut sink,
        &mut |e| bars.on_event(e),
    )?;
    bars.finish();
    drop(src);
    let mut summary = run_summary(args, &setup, &sources, windows.len(), &report, load_secs);
    summary["streaming"] = json!({
        "layer_f32_bytes": layer_f32_bytes, "flush_bytes": flush_bytes,
        "shards_before_head": sink.shards_written(),
    });
    let t_write = Instant::now();
    let mut extra = tok_files;
    extra.push((
        "lowbit-recipe.json".into(),
        serde_json::to_vec_pretty(&setup.recipe.to_json())?,
    ));
    summary["timings"]["total_secs_before_write"] = json!(t_all.elapsed().as_secs_f64());
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    extra.push((
        "lowbit-report.json".into(),
        serde_json::to_vec_pretty(&summary)?,
    ));
    sink.finish(&config, &extra)
        .with_context(|| format!("writing {}", args.out.display()))?;
    summary["timings"]["write_secs"] = json!(t_write.elapsed().as_secs_f64());
    summary["timings"]["total_secs"] = json!(t_all.elapsed().as_secs_f64());
    summary["out"] = json!(args.out);
    summary["peak_rss_mib"] = json!(peak_rss_mib());
    Ok(summary)
}

/// Method, scheme, recipe and pipeline options from the command line.
struct Setup {
    method: Method,
    act: Option<lowbit_model::ct::ActivationQuant>,
    recipe: Recipe,
    opts: PipelineOptions,
}

impl Setup {
    fn needs_calib(&self, args: &Args) -> bool {
        !args.calib.is_empty() || !matches!(self.method, Method::Rtn | Method::Hqq)
    }
}

fn pipeline_setup(args: &Args) -> Result<Setup> {
    let method = Method::parse(&args.method)?;
    let (_, act) = quantize::parse_scheme(&args.scheme)?;
    let recipe = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Recipe::from_json(&text, &args.scheme)?
        }
        None => Recipe::new(&args.scheme),
    };
    if method == Method::SmoothQuant && act.is_none() {
        eprintln!("note: smoothquant with a weight-only scheme; use --scheme w8a8-int8 for W8A8");
    }
    let mut opts = PipelineOptions::new(method, recipe.clone());
    opts.gptq.damp_percent = args.damp;
    opts.gptq.act_order = match args.act_order.as_str() {
        "static" => lowbit_calibration::ActOrder::Static,
        "group" => lowbit_calibration::ActOrder::Group,
        "off" => lowbit_calibration::ActOrder::Off,
        o => bail!("--act-order {o}: choose static, group or off"),
    };
    opts.rtn_clipping = match args.clip.as_str() {
        "absmax" => lowbit_calibration::Clipping::AbsMax,
        "mse" => lowbit_calibration::Clipping::Mse {
            grid: 20,
            min_ratio: 0.5,
        },
        o => bail!("--clip {o}: choose absmax or mse"),
    };
    opts.true_sequential = !args.layer_sequential;
    opts.smooth_alpha = args.alpha;
    Ok(Setup {
        method,
        act,
        recipe,
        opts,
    })
}

/// Progress bars: layers, and the current pass over the windows.
struct Bars {
    _mp: MultiProgress,
    lb: ProgressBar,
    pb: ProgressBar,
}

impl Bars {
    fn new(quiet: bool, method: Method, n_layers: usize, windows: usize) -> Self {
        let mp = MultiProgress::new();
        if quiet {
            mp.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let lb = mp.add(ProgressBar::new(n_layers as u64));
        lb.set_style(style(
            "{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} layers {msg}",
        ));
        lb.set_prefix(method.name());
        let pb = mp.add(ProgressBar::new(windows.max(1) as u64));
        pb.set_style(style("{prefix:>9} {bar:30} {pos}/{len} {msg}"));
        Bars { _mp: mp, lb, pb }
    }

    fn on_event(&self, e: &Event) {
        let (lb, pb) = (&self.lb, &self.pb);
        match e {
            Event::LayerStart { layer, .. } => lb.set_message(format!("layer {layer}")),
            Event::Pass {
                layer,
                what,
                done,
                total,
            } => {
                pb.set_length(*total as u64);
                pb.set_position(*done as u64);
                pb.set_prefix(format!("L{layer}"));
                pb.set_message(*what);
            }
            Event::Module(m) => {
                let e = m
                    .rel_error
                    .map_or(String::new(), |e| format!(" err {e:.4}"));
                pb.set_message(format!("{}{e}", m.name.rsplit('.').next().unwrap_or("")));
            }
            Event::LayerDone(_) => lb.inc(1),
            _ => {}
        }
    }

    fn finish(&self) {
        self.pb.finish_and_clear();
        self.lb.finish_and_clear();
    }
}

/// The summary object of a standard-pipeline run (saved as `lowbit-report.json`).
fn run_summary(
    args: &Args,
    setup: &Setup,
    sources: &[Value],
    samples: usize,
    report: &lowbit_model::quantize::PipelineReport,
    load_secs: f64,
) -> Value {
    let layers: Vec<Value> = report
        .layers
        .iter()
        .map(|l| {
            json!({
                "layer": l.layer, "mean_rel_error": l.mean_rel_error, "secs": l.secs,
                "modules": l.modules,
            })
        })
        .collect();
    let errs: Vec<f64> = report
        .layers
        .iter()
        .filter_map(|l| l.mean_rel_error)
        .collect();
    json!({
        "command": "quantize",
        "model": args.model,
        "method": setup.method.name(),
        "scheme": args.scheme,
        "activations": setup.act.map(|a| format!("{a:?}")),
        "calibration": {
            "files": sources, "samples": samples, "seqlen": args.seqlen, "seed": args.seed,
            "tokens": report.calib_tokens,
        },
        "options": {
            "act_order": args.act_order, "damp": args.damp, "clip": args.clip,
            "true_sequential": !args.layer_sequential, "alpha": args.alpha,
        },
        "recipe": setup.recipe.to_json(),
        "mean_rel_error": if errs.is_empty() { Value::Null } else { json!(errs.iter().sum::<f64>() / errs.len() as f64) },
        "layers": layers,
        "timings": { "load_secs": load_secs, "quantize_secs": report.secs },
        "threads": rayon::current_num_threads(),
    })
}

/// Print the per-layer table of a run.
pub fn print_table(summary: &Value) {
    println!(
        "{} {} on {} -> {}",
        summary["method"].as_str().unwrap_or(""),
        summary["scheme"].as_str().unwrap_or(""),
        summary["model"].as_str().unwrap_or(""),
        summary["out"].as_str().unwrap_or("")
    );
    println!(
        "{:>5}  {:>9}  {:>9}  {:>9}  {:>9}  {:>7}",
        "layer", "mean err", "attn max", "mlp max", "worst", "secs"
    );
    if let Some(ls) = summary["layers"].as_array() {
        for l in ls {
            let mods = l["modules"].as_array().cloned().unwrap_or_default();
            let max_of = |pat: &str| {
                mods.iter()
                    .filter(|m| m["name"].as_str().unwrap_or("").contains(pat))
                    .filter_map(|m| m["rel_error"].as_f64())
                    .fold(f64::NAN, f64::max)
            };
            let worst = mods
                .iter()
                .filter(|m| m["rel_error"].is_f64())
                .max_by(|a, b| {
                    a["rel_error"]
                        .as_f64()
                        .partial_cmp(&b["rel_error"].as_f64())
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .and_then(|m| {
                    m["name"]
                        .as_str()
                        .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
                })
                .unwrap_or_else(|| "-".into());
            println!(
                "{:>5}  {:>9.5}  {:>9.5}  {:>9.5}  {:>9}  {:>7.1}",
                l["layer"],
                l["mean_rel_error"].as_f64().unwrap_or(f64::NAN),
                max_of("self_attn"),
                max_of("mlp"),
                worst,
                l["secs"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "mean relative output error {:.5}; quantize {:.1} s, total {:.1} s; peak RSS {:.0} MiB",
        summary["mean_rel_error"].as_f64().unwrap_or(f64::NAN),
        summary["timings"]["quantize_secs"].as_f64().unwrap_or(0.0),
        summary["timings"]["total_secs"].as_f64().unwrap_or(0.0),
        summary["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let summary = if can_stream(&args) {
        quantize_streamed(&args, false)?
    } else {
        quantize_to_folder(&args, false)?.summary
    };
    print_table(&summary);
    if args.json {
        let mut s = summary.clone();
        // Keep the JSON line compact: per-module details stay in lowbit-report.json.
        if let Some(ls) = s["layers"].as_array_mut() {
            for l in ls {
                l.as_object_mut().map(|o| o.remove("modules"));
            }
        }
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}
