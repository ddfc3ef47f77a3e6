//! Mapping between lowbit's [`Scheme`] and the compressed-tensors `quantization_config` schema.
//!
//! Every config group names one weight format. Standard formats (`pack-quantized`,
//! `int-quantized`, `float-quantized`, `nvfp4-pack-quantized`, `mxfp4-pack-quantized`) use the
//! compressed-tensors argument names only, so vLLM can read them; everything else (NF4, 2-D block
//! integer scales, ternary, FP6 ...) uses the lowbit-specific format [`LOWBIT_PACKED`]. In both
//! cases lowbit also writes the exact scheme of every group to the sidecar file
//! [`SCHEMES_FILE`] so that a round trip is lossless; a reader without the sidecar derives the
//! scheme from the standard arguments and the stored dtypes.

use lowbit_numerics::{ElemFormat, FloatFormat, Granularity, ScaleDtype, Scheme};
use serde_json::{json, Value};

/// The lowbit-specific compressed-tensors format name used for formats the schema lacks.
pub const LOWBIT_PACKED: &str = "lowbit-packed";
/// Sidecar file with the exact lowbit scheme of every config group.
pub const SCHEMES_FILE: &str = "lowbit-schemes.json";

/// Which compressed-tensors tensor layout a scheme is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtFormat {
    /// INT2..INT7: `weight_packed` int32 (dense LSB-first along the input dim).
    PackQuantized,
    /// INT8: `weight` int8 (+ `weight_zero_point` int8 when asymmetric).
    IntQuantized,
    /// FP8 E4M3 / E5M2: `weight` in the FP8 dtype.
    FloatQuantized,
    /// NVFP4: `weight_packed` u8, `weight_scale` E4M3, `weight_global_scale` f32.
    Nvfp4PackQuantized,
    /// MXFP4: `weight_packed` u8, `weight_scale` u8 (E8M0).
    Mxfp4PackQuantized,
    /// lowbit's own layout: `weight_packed` u8 in [`lowbit_numerics::QuantizedTensor`] row
    /// layout, `weight_scale` f32, `weight_zero_point` u8.
    LowbitPacked,
}

impl CtFormat {
    /// The `format` string in `quantization_config`.
    pub fn name(self) -> &'static str {
        match self {
            CtFormat::PackQuantized => "pack-quantized",
            CtFormat::IntQuantized => "int-quantized",
            CtFormat::FloatQuantized => "float-quantized",
            CtFormat::Nvfp4PackQuantized => "nvfp4-pack-quantized",
            CtFormat::Mxfp4PackQuantized => "mxfp4-pack-quantized",
            CtFormat::LowbitPacked => LOWBIT_PACKED,
        }
    }

    /// Parse a `format` string.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "pack-quantized" => CtFormat::PackQuantized,
            "int-quantized" | "naive-quantized" => CtFormat::IntQuantized,
            "float-quantized" => CtFormat::FloatQuantized,
            "nvfp4-pack-quantized" => CtFormat::Nvfp4PackQuantized,
            "mxfp4-pack-quantized" => CtFormat::Mxfp4PackQuantized,
            LOWBIT_PACKED => CtFormat::LowbitPacked,
            _ => return None,
        })
    }
}

fn standard_scale_dtype(d: ScaleDtype) -> bool {
    matches!(d, ScaleDtype::F32 | ScaleDtype::F16 | ScaleDtype::Bf16)
}

/// The compressed-tensors format a scheme is written in.
pub fn format_for(s: &Scheme) -> CtFormat {
    let std_gran = matches!(
        s.granularity,
        Granularity::PerTensor | Granularity::PerChannel | Granularity::PerGroup(_)
    );
    match s.elem {
        ElemFormat::Int { bits }
            if std_gran && standard_scale_dtype(s.scale_dtype) && !s.global_scale =>
        {
            if bits == 8 {
                CtFormat::IntQuantized
            } else {
                CtFormat::PackQuantized
            }
        }
        ElemFormat::Float(FloatFormat::E4M3 | FloatFormat::E5M2)
            if standard_scale_dtype(s.scale_dtype) && !s.global_scale && !s.asymmetric =>
        {
            CtFormat::FloatQuantized
        }
        ElemFormat::Float(FloatFormat::E2M1)
            if s.granularity == Granularity::PerGroup(16)
                && s.scale_dtype == ScaleDtype::E4M3
                && s.global_scale =>
        {
            CtFormat::Nvfp4PackQuantized
        }
        ElemFormat::Float(FloatFormat::E2M1)
            if s.granularity == Granularity::PerGroup(32)
                && s.scale_dtype == ScaleDtype::E8M0
                && !s.global_scale =>
        {
            CtFormat::Mxfp4PackQuantized
        }
        _ => CtFormat::LowbitPacked,
    }
}

fn scale_dtype_name(d: ScaleDtype) -> &'static str {
    match d {
        ScaleDtype::F32 => "float32",
        ScaleDtype::F16 => "float16",
        ScaleDtype::Bf16 => "bfloat16",
        ScaleDtype::E8M0 => "uint8",
        ScaleDtype::E4M3 => "float8_e4m3fn",
        _ => "float32",
    }
}

fn scale_dtype_from_name(s: &str) -> Option<ScaleDtype> {
    Some(match s {
        "float32" | "torch.float32" | "f32" => ScaleDtype::F32,
        "float16" | "torch.float16" | "f16" => ScaleDtype::F16,
        "bfloat16" | "torch.bfloat16" | "bf16" => ScaleDtype::Bf16,
        "uint8" | "torch.uint8" | "e8m0" => ScaleDtype::E8M0,
        "float8_e4m3fn" | "torch.float8_e4m3fn" | "e4m3" => ScaleDtype::E4M3,
        _ => return None,
    })
}

/// The compressed-tensors `weights` arguments of a config group (QuantizationArgs).
pub fn weights_args(s: &Scheme, actorder: bool) -> Value {
    let (num_bits, ty) = match s.elem {
        ElemFormat::Int { bits } => (bits as u32, "int"),
        ElemFormat::Float(f) => (f.total_bits(), "float"),
        ElemFormat::Nf4 => (4, "float"),
        ElemFormat::Ternary => (2, "int"),
        ElemFormat::Binary => (1, "int"),
        _ => (s.elem.bits(), "int"),
    };
    let mut v = json!({
        "num_bits": num_bits,
        "type": ty,
        "symmetric": !s.asymmetric,
        "dynamic": false,
        "observer": "minmax",
        "scale_dtype": scale_dtype_name(s.scale_dtype),
        "actorder": if actorder { Value::from("group") } else { Value::Null },
    });
    let o = v.as_object_mut().expect("object literal");
    match s.granularity {
        Granularity::PerTensor => {
            o.insert("strategy".into(), "tensor".into());
        }
        Granularity::PerChannel => {
            o.insert("strategy".into(), "channel".into());
        }
        Granularity::PerGroup(g) => {
            let strat = if s.global_scale {
                "tensor_group"
            } else {
                "group"
            };
            o.insert("strategy".into(), strat.into());
            o.insert("group_size".into(), g.into());
        }
        Granularity::Block2d { rows, cols } => {
            o.insert("strategy".into(), "block".into());
            o.insert("block_structure".into(), json!([rows, cols]));
        }
        _ => {}
    }
    if s.asymmetric {
        o.insert("zp_dtype".into(), "int8".into());
    }
    v
}

/// Derive a scheme from standard compressed-tensors weight arguments (used when the lowbit
/// sidecar is absent, e.g. for llm-compressor checkpoints). Returns `None` for combinations
/// lowbit does not represent.
pub fn scheme_from_args(format: CtFormat, args: &Value) -> Option<Scheme> {
    let num_bits = args.get("num_bits")?.as_u64()? as u8;
    let ty = args.get("type").and_then(Value::as_str).unwrap_or("int");
    let symmetric = args
        .get("symmetric")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let strategy = args
        .get("strategy")
        .and_then(Value::as_str)
        .unwrap_or("tensor");
    let group = args
        .get("group_size")
        .and_then(Value::as_u64)
        .map(|g| g as usize);
    let granularity = match strategy {
        "tensor" => Granularity::PerTensor,
        "channel" => Granularity::PerChannel,
        "group" | "tensor_group" => Granularity::PerGroup(group?),
        "block" => {
            let b = args.get("block_structure")?.as_array()?;
            Granularity::Block2d {
                rows: b.first()?.as_u64()? as usize,
                cols: b.get(1)?.as_u64()? as usize,
            }
        }
        _ => return None,
    };
    let declared = args
        .get("scale_dtype")
        .and_then(Value::as_str)
        .and_then(scale_dtype_from_name);
    let elem = match (format, ty, num_bits) {
        (CtFormat::Nvfp4PackQuantized | CtFormat::Mxfp4PackQuantized, _, 4) => {
            ElemFormat::Float(FloatFormat::E2M1)
        }
        (_, "int", b) if (2..=8).contains(&b) => ElemFormat::Int { bits: b },
        (_, "float", 8) => ElemFormat::Float(FloatFormat::E4M3),
        _ => return None,
    };
    let (scale_dtype, global_scale) = match format {
        CtFormat::Nvfp4PackQuantized => (ScaleDtype::E4M3, true),
        CtFormat::Mxfp4PackQuantized => (ScaleDtype::E8M0, false),
        _ => (declared.unwrap_or(ScaleDtype::F32), false),
    };
    Some(Scheme {
        elem,
        granularity,
        scale_dtype,
        asymmetric: !symmetric && matches!(elem, ElemFormat::Int { .. }),
        global_scale,
    })
}

/// lowbit's exact JSON description of a scheme (the sidecar format).
pub fn scheme_to_json(s: &Scheme) -> Value {
    let elem = match s.elem {
        ElemFormat::Int { bits } => format!("int{bits}"),
        ElemFormat::Float(f) => float_name(f).to_string(),
        ElemFormat::Nf4 => "nf4".into(),
        ElemFormat::Ternary => "ternary".into(),
        ElemFormat::Binary => "binary".into(),
        _ => "unknown".into(),
    };
    let gran = match s.granularity {
        Granularity::PerTensor => json!("tensor"),
        Granularity::PerChannel => json!("channel"),
        Granularity::PerGroup(g) => json!({ "group": g }),
        Granularity::Block2d { rows, cols } => json!({ "block": [rows, cols] }),
        _ => json!("unknown"),
    };
    let sd = match s.scale_dtype {
        ScaleDtype::F32 => "f32",
        ScaleDtype::F16 => "f16",
        ScaleDtype::Bf16 => "bf16",
        ScaleDtype::E8M0 => "e8m0",
        ScaleDtype::E4M3 => "e4m3",
        _ => "unknown",
    };
    json!({
        "elem": elem,
        "granularity": gran,
        "scale_dtype": sd,
        "asymmetric": s.asymmetric,
        "global_scale": s.global_scale,
    })
}

fn float_name(f: FloatFormat) -> &'static str {
    match f {
        FloatFormat::E4M3 => "e4m3",
        FloatFormat::E5M2 => "e5m2",
        FloatFormat::E2M3 => "e2m3",
        FloatFormat::E3M2 => "e3m2",
        FloatFormat::E2M1 => "e2m1",
        FloatFormat::E8M0 => "e8m0",
        _ => "unknown",
    }
}

/// Parse [`scheme_to_json`]'s output.
pub fn scheme_from_json(v: &Value) -> Option<Scheme> {
    let elem = match v.get("elem")?.as_str()? {
        "nf4" => ElemFormat::Nf4,
        "ternary" => ElemFormat::Ternary,
        "binary" => ElemFormat::Binary,
        "e4m3" => ElemFormat::Float(FloatFormat::E4M3),
        "e5m2" => ElemFormat::Float(FloatFormat::E5M2),
        "e2m3" => ElemFormat::Float(FloatFormat::E2M3),
        "e3m2" => ElemFormat::Float(FloatFormat::E3M2),
        "e2m1" => ElemFormat::Float(FloatFormat::E2M1),
        "e8m0" => ElemFormat::Float(FloatFormat::E8M0),
        s => ElemFormat::Int {
            bits: s.strip_prefix("int")?.parse().ok()?,
        },
    };
    let g = v.get("granularity")?;
    let granularity = if let Some(s) = g.as_str() {
        match s {
            "tensor" => Granularity::PerTensor,
            "channel" => Granularity::PerChannel,
            _ => return None,
        }
    } else if let Some(n) = g.get("group") {
        Granularity::PerGroup(n.as_u64()? as usize)
    } else {
        let b = g.get("block")?.as_array()?;
        Granularity::Block2d {
            rows: b.first()?.as_u64()? as usize,
            cols: b.get(1)?.as_u64()? as usize,
        }
    };
    let scale_dtype = scale_dtype_from_name(v.get("scale_dtype")?.as_str()?)?;
    Some(Scheme {
        elem,
        granularity,
        scale_dtype,
        asymmetric: v.get("asymmetric")?.as_bool()?,
        global_scale: v.get("global_scale")?.as_bool()?,
    })
}

/// Per-token dynamic activation quantization (W8A8) as compressed-tensors `input_activations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationQuant {
    /// INT8, symmetric, one scale per token computed at run time.
    Int8PerToken,
    /// FP8 E4M3, one scale per token computed at run time.
    Fp8PerToken,
}

impl ActivationQuant {
    /// The `input_activations` arguments.
    pub fn args(self) -> Value {
        let ty = match self {
            ActivationQuant::Int8PerToken => "int",
            ActivationQuant::Fp8PerToken => "float",
        };
        json!({
            "num_bits": 8, "type": ty, "symmetric": true, "strategy": "token",
            "dynamic": true, "observer": null, "group_size": null, "actorder": null,
        })
    }

    /// Parse `input_activations` arguments (only per-token dynamic 8-bit is understood).
    pub fn from_args(v: &Value) -> Option<Self> {
        if v.get("dynamic").and_then(Value::as_bool) != Some(true)
            || v.get("strategy").and_then(Value::as_str) != Some("token")
            || v.get("num_bits").and_then(Value::as_u64) != Some(8)
        {
            return None;
        }
        match v.get("type").and_then(Value::as_str)? {
            "int" => Some(ActivationQuant::Int8PerToken),
            "float" => Some(ActivationQuant::Fp8PerToken),
            _ => None,
        }
    }
}
