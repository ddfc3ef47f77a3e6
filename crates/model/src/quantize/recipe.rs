//! What to quantize and how: a default scheme, target/ignore patterns and per-layer or
//! per-module overrides, read from a JSON recipe file and saved into the output folder.
//!
//! ```json
//! {
//!   "scheme": "int4-g128-sym",
//!   "targets": ["model.layers.*"],
//!   "ignore": ["lm_head"],
//!   "overrides": [
//!     { "layers": [0, 1, -2, -1], "scheme": "int8-pc" },
//!     { "modules": "*.mlp.down_proj", "scheme": "int4-g64-sym" },
//!     { "modules": "*.self_attn.k_proj", "skip": true }
//!   ]
//! }
//! ```
//! Patterns are globs over canonical module names (`*` matches any run of characters).
//! Negative layer indices count from the end (`-1` is the last layer). Later overrides win.
//! `lm_head` and the embeddings are never quantized unless a target names `lm_head` explicitly.

use crate::error::{Error, Result};
use lowbit_numerics::Scheme;
use serde_json::{json, Value};

/// Match `name` against a glob with `*` wildcards.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None, 0usize);
    while ni < n.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// One override rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Layer indices it applies to (negative: from the end); empty = every layer.
    pub layers: Vec<i64>,
    /// Module glob it applies to; `None` = every module.
    pub modules: Option<String>,
    /// Scheme name for the matched modules (`None` keeps the current one).
    pub scheme: Option<String>,
    /// Leave the matched modules unquantized.
    pub skip: bool,
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Default scheme name for every target.
    pub scheme: String,
    /// Target globs (default: every decoder-layer linear).
    pub targets: Vec<String>,
    /// Ignore globs.
    pub ignore: Vec<String>,
    /// Overrides, applied in order.
    pub overrides: Vec<Override>,
}

impl Recipe {
    /// The default recipe for one scheme: every decoder linear, `lm_head` kept.
    pub fn new(scheme: &str) -> Self {
        Recipe {
            scheme: scheme.to_string(),
            targets: vec!["model.layers.*".into()],
            ignore: vec!["lm_head".into()],
            overrides: Vec::new(),
        }
    }

    /// Parse a recipe file's text (JSON). `default_scheme` is used when it names none.
    pub fn from_json(text: &str, default_scheme: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Quantize(format!("recipe is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Quantize("recipe must be a JSON object".into()))?;
        for k in obj.keys() {
            if !["scheme", "targets", "ignore", "overrides"].contains(&k.as_str()) {
                return Err(Error::Quantize(format!(
                    "recipe: unknown key `{k}` (known: scheme, targets, ignore, overrides)"
                )));
            }
        }
        let strs = |key: &str| -> Result<Option<Vec<String>>> {
            match obj.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str().map(String::from).ok_or_else(|| {
                            Error::Quantize(format!("recipe: `{key}` must hold strings"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(_) => Err(Error::Quantize(format!(
                    "recipe: `{key}` must be a list of globs"
                ))),
            }
        };
        let mut r = Recipe::new(
            obj.get("scheme")
                .and_then(Value::as_str)
                .unwrap_or(default_scheme),
        );
        if let Some(t) = strs("targets")? {
            r.targets = t;
        }
        if let Some(i) = strs("ignore")? {
            r.ignore = i;
        }
        if let Some(ov) = obj.get("overrides") {
            let arr = ov
                .as_array()
                .ok_or_else(|| Error::Quantize("recipe: `overrides` must be a list".into()))?;
            for (k, o) in arr.iter().enumerate() {
                let bad = |w: &str| Error::Quantize(format!("recipe: override {k}: {w}"));
                let layers = match o.get("layers") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_i64().ok_or_else(|| bad("`layers` must hold integers")))
                        .collect::<Result<Vec<_>>>()?,
                    Some(Value::Number(n)) => vec![n.as_i64().ok_or_else(|| bad("bad layer"))?],
                    Some(_) => return Err(bad("`layers` must be a list of integers")),
                };
                let modules = o.get("modules").and_then(Value::as_str).map(String::from);
                let scheme = o.get("scheme").and_then(Value::as_str).map(String::from);
                let skip = o.get("skip").and_then(Value::as_bool).unwrap_or(false);
                if scheme.is_none() && !skip {
                    return Err(bad("needs a `scheme` or `\"skip\": true`"));
                }
                r.overrides.push(Override {
                    layers,
                    modules,
                    scheme,
                    skip,
                });
            }
        }
        r.validate()?;
        Ok(r)
    }

    /// Check every scheme name parses.
    pub fn validate(&self) -> Result<()> {
        super::parse_scheme(&self.scheme)?;
        for o in &self.overrides {
            if let Some(s) = &o.scheme {
                super::parse_scheme(s)?;
            }
        }
        Ok(())
    }

    /// The scheme name for module `name` of layer `layer` (of `n_layers`), or `None` when it is
    /// not quantized.
    pub fn scheme_for(&self, name: &str, layer: Option<usize>, n_layers: usize) -> Option<String> {
        let targeted = self.targets.iter().any(|t| glob_match(t, name))
            && !self.ignore.iter().any(|i| glob_match(i, name));
        if !targeted {
            return None;
        }
        let mut cur = Some(self.scheme.clone());
        for o in &self.overrides {
            let layer_hit = o.layers.is_empty()
                || layer.is_some_and(|l| {
                    o.layers.iter().any(|&x| {
                        let idx = if x < 0 { n_layers as i64 + x } else { x };
                        idx == l as i64
                    })
                });
            let mod_hit = o.modules.as_ref().is_none_or(|m| glob_match(m, name));
            if layer_hit && mod_hit {
                if o.skip {
                    cur = None;
                } else if let Some(s) = &o.scheme {
                    cur = Some(s.clone());
                }
            }
        }
        cur
    }

    /// The recipe as JSON (the same format [`Recipe::from_json`] reads).
    pub fn to_json(&self) -> Value {
        json!({
            "scheme": self.scheme,
            "targets": self.targets,
            "ignore": self.ignore,
            "overrides": self.overrides.iter().map(|o| {
                let mut v = json!({});
                if !o.layers.is_empty() { v["layers"] = json!(o.layers); }
                if let Some(m) = &o.modules { v["modules"] = json!(m); }
                if let Some(s) = &o.scheme { v["scheme"] = json!(s); }
                if o.skip { v["skip"] = json!(true); }
                v
            }).collect::<Vec<_>>(),
        })
    }
}

/// Parse a scheme name; also accepts the W8A8 names (weights part only).
pub fn weight_scheme(name: &str) -> Result<Scheme> {
    Ok(super::parse_scheme(name)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("model.layers.*", "model.layers.3.mlp.up_proj"));
        assert!(glob_match("*.down_proj", "model.layers.3.mlp.down_proj"));
        assert!(!glob_match("*.down_proj", "model.layers.3.mlp.up_proj"));
        assert!(glob_match("lm_head", "lm_head"));
        assert!(!glob_match("lm_head", "lm_head2"));
        assert!(glob_match("*layers.1.*", "model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn overrides_first_and_last_layers() {
        let r = Recipe::from_json(
            r#"{"overrides":[{"layers":[0,1,-2,-1],"scheme":"int8-pc"},
                {"modules":"*.k_proj","skip":true}]}"#,
            "int4-g128-sym",
        )
        .unwrap();
        let n = 30;
        assert_eq!(
            r.scheme_for("model.layers.0.mlp.up_proj", Some(0), n)
                .as_deref(),
            Some("int8-pc")
        );
        assert_eq!(
            r.scheme_for("model.layers.29.mlp.up_proj", Some(29), n)
                .as_deref(),
            Some("int8-pc")
        );
        assert_eq!(
            r.scheme_for("model.layers.5.mlp.up_proj", Some(5), n)
                .as_deref(),
            Some("int4-g128-sym")
        );
        assert_eq!(
            r.scheme_for("model.layers.5.self_attn.k_proj", Some(5), n),
            None
        );
        assert_eq!(r.scheme_for("lm_head", None, n), None);
        // Saved and re-read identically.
        let back = Recipe::from_json(&r.to_json().to_string(), "x").unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn bad_recipes_are_errors() {
        assert!(Recipe::from_json("[]", "int4-g128-sym").is_err());
        assert!(Recipe::from_json(r#"{"scheme":"int9-g7"}"#, "int4-g128-sym").is_err());
        assert!(Recipe::from_json(r#"{"overrides":[{"layers":[1]}]}"#, "int4-g128-sym").is_err());
        assert!(Recipe::from_json(r#"{"tragets":[]}"#, "int4-g128-sym").is_err());
    }
}
