//! Options that change how a loaded model runs, shared by `eval`, `generate` and `bench model`:
//! `--head SCHEME` (quantize the output head) and `--act8` (INT8 block activations on the packed
//! linears whose codes have an integer path: INT4..INT8, MXFP4/NVFP4, NF4).

use anyhow::{Context, Result};
use lowbit_model::llama::Model;

/// Apply `--head` and `--act8` to `model`, saying on stderr what `--act8` changed.
pub fn apply(model: &mut Model, head: Option<&str>, act8: bool) -> Result<()> {
    if let Some(h) = head {
        let scheme = lowbit_numerics::Scheme::from_name(h)
            .with_context(|| format!("unknown --head scheme `{h}` (e.g. int8-pc, fp8-pc)"))?;
        model.quantize_head(&scheme)?;
    }
    if act8 {
        let mut n = 0;
        for name in model.linear_names() {
            if let Some(l) = model.linear_mut(&name) {
                n += usize::from(l.set_act8(true)?);
            }
        }
        eprintln!("--act8: INT8 block activations on {n} linear layers");
    }
    Ok(())
}
