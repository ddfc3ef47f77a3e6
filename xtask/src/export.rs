//! `cargo xtask export`: write a model as a llama.cpp GGUF file or a compressed-tensors folder.

use crate::quantize::{load_source, peak_rss_mib};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::ct::{self, WriteOptions};
use lowbit_model::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use lowbit_model::quantize::{
    model_to_checkpoint, parse_scheme, quantize_model, Method, ModelToCheckpoint, PipelineOptions,
    Recipe,
};
use lowbit_model::{Arch, Model};
use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `cargo xtask export`.
#[derive(clap::Args)]
#[command(after_help = "\
GGUF: llama-architecture metadata, the source's tokenizer (GGUF source, or a lowbit folder made from
  one), tensors named as llama.cpp expects (Q/K rows permuted back to llama.cpp order).
  Quantized linears map exactly where the GGUF block holds the same numbers: INT4 sym g32 f16 -> Q4_0,
  INT8 sym g32 f16 -> Q8_0. Everything else is re-quantized from the dequantized weights to --gguf-type
  (reported per tensor as `requantized`). Dense linears use --gguf-type too; norms stay F32.
COMPRESSED-TENSORS: the model as a compressed-tensors folder; with --scheme its linears are
  RTN-quantized first (use `cargo xtask quantize` for calibrated methods).")]
pub struct Args {
    /// The model: .gguf file, Hugging Face folder, or a lowbit/compressed-tensors folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Target format: gguf or compressed-tensors.
    #[arg(long)]
    pub to: String,
    /// Output file (gguf) or folder (compressed-tensors).
    #[arg(long)]
    pub out: PathBuf,
    /// compressed-tensors: RTN-quantize the linears with this scheme first.
    #[arg(long)]
    pub scheme: Option<String>,
    /// gguf: block type for tensors without an exact mapping (Q8_0, Q4_0, Q4_1, F16, F32 ...).
    #[arg(long, default_value = "Q8_0")]
    pub gguf_type: String,
    /// gguf: type of the token embedding.
    #[arg(long, default_value = "Q8_0")]
    pub embed_type: String,
    /// Emit machine-readable JSON (one object on the last stdout line).
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let summary = match args.to.as_str() {
        "gguf" => export_gguf(&args)?,
        "compressed-tensors" | "ct" => export_ct(&args)?,
        o => bail!("--to {o}: choose gguf or compressed-tensors"),
    };
    let mut s = summary;
    s["secs"] = json!(t0.elapsed().as_secs_f64());
    s["peak_rss_mib"] = json!(peak_rss_mib());
    println!(
        "wrote {} ({}) in {:.1} s",
        args.out.display(),
        args.to,
        t0.elapsed().as_secs_f64()
    );
    if let Some(n) = s["requantized"].as_array().map(|a| a.len()) {
        if n > 0 {
            println!(
                "{n} tensors had no exact GGUF block type and were re-quantized to {}",
                args.gguf_type
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

fn export_ct(args: &Args) -> Result<serde_json::Value> {
    let src = load_source(&args.model)?;
    let mut model = src.model;
    let mut act = None;
    if let Some(scheme) = &args.scheme {
        act = parse_scheme(scheme)?.1;
        let opts = PipelineOptions::new(Method::Rtn, Recipe::new(scheme));
        quantize_model(&mut model, &[], &opts, &mut |_| {})?;
    }
    let ck = model_to_checkpoint(
        &model,
        &ModelToCheckpoint {
            input_activations: act,
            extra_files: src.tokenizer_files.clone(),
        },
    )?;
    ct::write_checkpoint(&args.out, &ck, &WriteOptions::default())?;
    Ok(
        json!({"command": "export", "to": "compressed-tensors", "out": args.out, "scheme": args.scheme,
              "quantized_modules": ck.quantized.len()}),
    )
}

/// llama.cpp's Q/K row order: within each head, GGUF row `2j + s` holds HF row `s*half + j`.
fn permute_rows<T: Clone>(w: &[T], n_heads: usize, head_dim: usize, cols: usize) -> Vec<T> {
    let mut out = w.to_vec();
    let half = head_dim / 2;
    for h in 0..n_heads {
        for j in 0..half {
            for s in 0..2 {
                let dst = (h * head_dim + 2 * j + s) * cols;
                let src = (h * head_dim + s * half + j) * cols;
                out[dst..dst + cols].clone_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Exact GGUF blocks for a quantized tensor whose numbers a GGUF block type holds exactly.
fn exact_gguf(q: &QuantizedTensor) -> Option<(GgmlType, Vec<u8>)> {
    let s = &q.scheme;
    if s.asymmetric || s.global_scale || q.g_idx.is_some() || s.scale_dtype != ScaleDtype::F16 {
        return None;
    }
    if s.granularity != Granularity::PerGroup(32) || q.cols % 32 != 0 {
        return None;
    }
    let bits = match s.elem {
        ElemFormat::Int { bits: b @ (4 | 8) } => b,
        _ => return None,
    };
    let rb = q.row_bytes();
    let gpr = q.cols / 32;
    let mut out = Vec::new();
    for r in 0..q.rows {
        let row = &q.data[r * rb..(r + 1) * rb];
        for b in 0..gpr {
            let d = half::f16::from_f32(q.scales[r * gpr + b]);
            out.extend_from_slice(&d.to_le_bytes());
            if bits == 4 {
                // Q4_0: byte j = element j (low nibble) | element j+16 (high nibble); code u = q+8.
                let code = |i: usize| {
                    let c = b * 32 + i;
                    (row[c / 2] >> ((c % 2) * 4)) & 0x0F
                };
                for j in 0..16 {
                    out.push(code(j) | (code(j + 16) << 4));
                }
            } else {
                // Q8_0: int8 = u - 128.
                for i in 0..32 {
                    out.push(row[b * 32 + i] ^ 0x80);
                }
            }
        }
    }
    Some((
        if bits == 4 {
            GgmlType::Q4_0
        } else {
            GgmlType::Q8_0
        },
        out,
    ))
}

fn requant(ty: GgmlType, w: &[f32], rows: usize, cols: usize) -> Result<(GgmlType, Vec<u8>)> {
    let block = ty.block_size();
    let ty = if cols % block != 0 { GgmlType::F16 } else { ty };
    let mut out = Vec::new();
    for r in 0..rows {
        lowbit_numerics::gguf::quantize(ty, &w[r * cols..(r + 1) * cols], &mut out)?;
    }
    Ok((ty, out))
}

fn tokenizer_source(model: &Path) -> Result<GgufFile> {
    if model.is_file() {
        return Ok(GgufFile::open(model)?);
    }
    let p = model.join("lowbit-tokenizer.gguf");
    if p.is_file() {
        return Ok(GgufFile::open(&p)?);
    }
    bail!(
        "GGUF export needs the tokenizer as GGUF metadata: export from a .gguf model or from a \
         lowbit folder quantized from one (it holds lowbit-tokenizer.gguf)"
    )
}

fn export_gguf(args: &Args) -> Result<serde_json::Value> {
    let fallback = GgmlType::from_name(&args.gguf_type)?;
    let embed_ty = GgmlType::from_name(&args.embed_type)?;
    let tok = tokenizer_source(&args.model)?;
    let src = load_source(&args.model)?;
    let m: &Model = &src.model;
    let c = &m.config;
    if c.qkv_bias || !matches!(c.arch, Arch::Llama | Arch::Mistral) {
        bail!("GGUF export supports the llama architecture (no q/k/v bias) only");
    }
    let mut w = GgufWriter::new();
    let arch = "llama";
    w.add_kv("general.architecture", GgufValue::String(arch.into()));
    w.add_kv("general.name", GgufValue::String("lowbit export".into()));
    w.add_kv("general.alignment", GgufValue::U32(32));
    let u = |x: usize| GgufValue::U32(x as u32);
    w.add_kv(format!("{arch}.context_length"), u(c.max_ctx));
    w.add_kv(format!("{arch}.embedding_length"), u(c.hidden_size));
    w.add_kv(format!("{arch}.block_count"), u(c.n_layers));
    w.add_kv(
        format!("{arch}.feed_forward_length"),
        u(c.intermediate_size),
    );
    w.add_kv(format!("{arch}.attention.head_count"), u(c.n_heads));
    w.add_kv(format!("{arch}.attention.head_count_kv"), u(c.n_kv_heads));
    w.add_kv(format!("{arch}.attention.key_length"), u(c.head_dim));
    w.add_kv(format!("{arch}.attention.value_length"), u(c.head_dim));
    w.add_kv(format!("{arch}.rope.dimension_count"), u(c.head_dim));
    w.add_kv(
        format!("{arch}.rope.freq_base"),
        GgufValue::F32(c.rope_theta as f32),
    );
    w.add_kv(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        GgufValue::F32(c.rms_eps),
    );
    w.add_kv(format!("{arch}.vocab_size"), u(c.vocab_size));
    for (k, v) in tok.metadata() {
        if k.starts_with("tokenizer.") {
            w.add_kv(k.clone(), v.clone());
        }
    }
    let mut exact = Vec::new();
    let mut requantized = Vec::new();
    let n_tensors = 2 + c.n_layers * 9 + usize::from(m.lm_head.is_some());
    let pb = ProgressBar::new(n_tensors as u64);
    pb.set_style(
        ProgressStyle::with_template("export {bar:30} {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let h = c.hidden_size as u64;
    let (et, eb) = requant(embed_ty, &m.embed, c.vocab_size, c.hidden_size)?;
    w.add_tensor("token_embd.weight", &[h, c.vocab_size as u64], et, eb)?;
    pb.inc(1);
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    w.add_tensor("output_norm.weight", &[h], GgmlType::F32, f32b(&m.norm))?;
    pb.inc(1);
    let map = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    for (i, layer) in m.layers.iter().enumerate() {
        w.add_tensor(
            format!("blk.{i}.attn_norm.weight"),
            &[h],
            GgmlType::F32,
            f32b(&layer.attn_norm),
        )?;
        w.add_tensor(
            format!("blk.{i}.ffn_norm.weight"),
            &[h],
            GgmlType::F32,
            f32b(&layer.mlp_norm),
        )?;
        pb.inc(2);
        for (hf, gg) in map {
            let lin = layer.linear(hf).expect("linear");
            let (rows, cols) = (lin.out, lin.inp);
            let heads = match hf {
                "self_attn.q_proj" => Some(c.n_heads),
                "self_attn.k_proj" => Some(c.n_kv_heads),
                _ => None,
            };
            let name = format!("blk.{i}.{gg}.weight");
            let hit = lin.quantized().and_then(|q| {
                let q = match heads {
                    Some(nh) => {
                        // Permute whole rows of codes and their per-row scales.
                        let rb = q.row_bytes();
                        let gpr = q.scales.len() / q.rows;
                        let rows_codes: Vec<Vec<u8>> =
                            q.data.chunks(rb).map(|r| r.to_vec()).collect();
                        let rows_scales: Vec<Vec<f32>> =
                            q.scales.chunks(gpr).map(|r| r.to_vec()).collect();
                        let pc = permute_rows(&rows_codes, nh, c.head_dim, 1);
                        let ps = permute_rows(&rows_scales, nh, c.head_dim, 1);
                        let mut q2 = q.clone();
                        q2.data = pc.concat();
                        q2.scales = ps.concat();
                        q2
                    }
                    None => q.clone(),
                };
                exact_gguf(&q)
            });
            let (ty, bytes) = match hit {
                Some(x) => {
                    exact.push(name.clone());
                    x
                }
                None => {
                    if lin.is_quantized() {
                        requantized.push(name.clone());
                    }
                    let wf = lin.weight_f32();
                    let wf = match heads {
                        Some(nh) => permute_rows(wf, nh, c.head_dim, cols),
                        None => wf.to_vec(),
                    };
                    requant(fallback, &wf, rows, cols)?
                }
            };
            w.add_tensor(name, &[cols as u64, rows as u64], ty, bytes)?;
            pb.inc(1);
        }
    }
    if let Some(l) = &m.lm_head {
        let (ty, b) = requant(fallback, l.weight_f32(), l.out, l.inp)?;
        w.add_tensor("output.weight", &[l.inp as u64, l.out as u64], ty, b)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(p) = args.out.parent() {
        if !p.as_os_str().is_empty() {
            std::fs::create_dir_all(p)?;
        }
    }
    let tmp = args.out.with_extension("gguf.partial");
    w.write_file(&tmp)?;
    std::fs::rename(&tmp, &args.out)?;
    Ok(
        json!({"command": "export", "to": "gguf", "out": args.out, "exact": exact, "requantized": requantized,
              "fallback_type": args.gguf_type}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_unpermute() {
        let w: Vec<f32> = (0..(2 * 8 * 3)).map(|x| x as f32).collect();
        let p = permute_rows(&w, 2, 8, 3);
        assert_eq!(lowbit_model::load::unpermute_rows(&p, 2, 8, 3), w);
    }

    #[test]
    fn int4_g32_sym_maps_exactly_to_q4_0() {
        let scheme = lowbit_numerics::Scheme::from_name("int4-g32-sym-f16").unwrap();
        let x: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let q = lowbit_numerics::quantize(&x, 2, 64, &scheme, &Default::default()).unwrap();
        let (ty, bytes) = exact_gguf(&q).expect("exact");
        assert_eq!(ty, GgmlType::Q4_0);
        let mut out = vec![0f32; 128];
        lowbit_numerics::gguf::dequantize(ty, &bytes, &mut out).unwrap();
        assert_eq!(out, q.dequantize().unwrap());
    }
}
