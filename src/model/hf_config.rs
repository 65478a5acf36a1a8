//! Hugging Face `config.json` of a Llama-style model, read into a
//! [`ModelConfig`] and written from one.
//!
//! Read: `hidden_size`, `intermediate_size`, `num_hidden_layers`,
//! `num_attention_heads`, `num_key_value_heads` (default: the heads),
//! `head_dim` (default: hidden / heads), `vocab_size`, `rms_norm_eps`,
//! `rope_theta` (or `rope_parameters.rope_theta`), `max_position_embeddings`,
//! `tie_word_embeddings` and `hidden_act` (`silu`: SwiGLU,
//! `gelu_pytorch_tanh`: gated GELU). What the family does not compute is
//! refused by name: RoPE scaling, biases, sliding windows, another
//! activation or model type. Two keys of fapool's own carry what a Llama
//! config cannot say, so exported checkpoints of every model read back:
//! `fapool_positions = "sinusoidal"` and `fapool_ffn = "gelu"` (a two-matrix
//! FFN). This module must not read weights (see `checkpoint`).

use super::{FfnKind, ModelConfig, PositionKind};
use crate::rules::{violation, Violation};
use serde_json::{json, Map, Value};
use std::path::Path;

fn unreadable(path: &Path, why: impl std::fmt::Display) -> Violation {
    violation("model-config-readable", format!("{}: {why}", path.display()))
}

fn unsupported(path: &Path, why: impl std::fmt::Display) -> Violation {
    violation("model-config-supported", format!("{}: {why}", path.display()))
}

/// The model a `config.json` describes (seeded weights unless the job
/// names a checkpoint; `weights_seed` 1).
pub fn read(path: &Path) -> Result<ModelConfig, Violation> {
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| unreadable(path, format!("not JSON: {e}")))?;
    let o = v.as_object().ok_or_else(|| unreadable(path, "not a JSON object"))?;
    from_json(o).map_err(|(rule, why)| if rule == "model-config-readable" { unreadable(path, why) } else { unsupported(path, why) })
}

type Refusal = (&'static str, String);

fn from_json(o: &Map<String, Value>) -> Result<ModelConfig, Refusal> {
    let missing = |k: &str| ("model-config-readable", format!("no `{k}` (a positive integer)"));
    let uint = |k: &str| o.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let need = |k: &str| uint(k).filter(|&x| x > 0).ok_or_else(|| missing(k));
    let refuse = |why: String| ("model-config-supported", why);
    match o.get("model_type").and_then(Value::as_str) {
        None | Some("llama") | Some("mistral") => {}
        Some(other) => return Err(refuse(format!("model_type `{other}`: only Llama-style models (llama, mistral) are read"))),
    }
    let set = |k: &str| o.get(k).is_some_and(|x| !x.is_null() && x != &Value::Bool(false));
    for k in ["rope_scaling", "attention_bias", "mlp_bias", "sliding_window"] {
        if set(k) {
            return Err(refuse(format!("`{k}` is set; the model family has no {}", k.replace('_', " "))));
        }
    }
    if let Some(t) = o.get("rope_parameters").and_then(|p| p.get("rope_type")).and_then(Value::as_str) {
        if t != "default" {
            return Err(refuse(format!("rope_parameters.rope_type `{t}`: only unscaled RoPE (`default`) is computed")));
        }
    }
    let (d, heads) = (need("hidden_size")?, need("num_attention_heads")?);
    let ffn_kind = match (o.get("fapool_ffn").and_then(Value::as_str), o.get("hidden_act").and_then(Value::as_str).unwrap_or("silu")) {
        (Some("gelu"), _) => FfnKind::Gelu,
        (Some(other), _) => return Err(refuse(format!("fapool_ffn `{other}` (expected gelu)"))),
        (None, "silu") => FfnKind::Swiglu,
        (None, "gelu_pytorch_tanh" | "gelu_new") => FfnKind::GatedGelu,
        (None, other) => return Err(refuse(format!("hidden_act `{other}`: the FFN computes silu (SwiGLU) or the tanh GELU (gelu_pytorch_tanh)"))),
    };
    let positions = match o.get("fapool_positions").and_then(Value::as_str) {
        None | Some("rope") => PositionKind::Rope,
        Some("sinusoidal") => PositionKind::Sinusoidal,
        Some(other) => return Err(refuse(format!("fapool_positions `{other}` (expected rope or sinusoidal)"))),
    };
    let theta = o.get("rope_theta").or_else(|| o.get("rope_parameters").and_then(|p| p.get("rope_theta"))).and_then(Value::as_f64).unwrap_or(10_000.0);
    let name = o.get("_name_or_path").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or("hf-config").to_string();
    Ok(ModelConfig {
        name,
        layers: need("num_hidden_layers")?,
        d_model: d,
        heads,
        kv_heads: uint("num_key_value_heads").unwrap_or(heads),
        head_dim: uint("head_dim").unwrap_or(d / heads),
        ffn: need("intermediate_size")?,
        ffn_kind,
        experts: None,
        vocab: need("vocab_size")?,
        norm_eps: o.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
        positions,
        rope_theta: theta,
        tie_embeddings: o.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        max_seq_len: uint("max_position_embeddings").unwrap_or(4096),
        weights_seed: 1,
        weights: None,
        weight_values: super::WeightValues::Real,
    })
}

/// The `config.json` of `cfg` (its weights stored as `torch_dtype`).
pub fn to_json(cfg: &ModelConfig, torch_dtype: &str) -> Value {
    let act = if cfg.ffn_kind == FfnKind::Swiglu { "silu" } else { "gelu_pytorch_tanh" };
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": cfg.name,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": act,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": torch_dtype,
    });
    let o = v.as_object_mut().expect("an object");
    if cfg.ffn_kind == FfnKind::Gelu {
        o.insert("fapool_ffn".into(), json!("gelu"));
    }
    if cfg.positions == PositionKind::Sinusoidal {
        o.insert("fapool_positions".into(), json!("sinusoidal"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Map<String, Value> {
        json!({
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": false,
            "rope_scaling": null, "attention_bias": false
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn a_llama_3_8b_config_reads_as_the_preset_shape() {
        let m = from_json(&llama()).unwrap();
        let p = ModelConfig::llama_3_8b();
        assert_eq!((m.layers, m.d_model, m.heads, m.kv_heads, m.head_dim, m.ffn, m.vocab), (p.layers, p.d_model, p.heads, p.kv_heads, p.head_dim, p.ffn, p.vocab));
        assert_eq!((m.ffn_kind, m.positions, m.rope_theta, m.tie_embeddings, m.max_seq_len), (FfnKind::Swiglu, PositionKind::Rope, 500000.0, false, 8192));
        assert!((m.norm_eps - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn rope_scaling_biases_and_other_activations_are_refused_by_name() {
        for (k, v) in [("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})), ("attention_bias", json!(true)), ("hidden_act", json!("gelu")), ("model_type", json!("gpt2"))] {
            let mut o = llama();
            o.insert(k.into(), v);
            let (rule, why) = from_json(&o).unwrap_err();
            assert_eq!(rule, "model-config-supported", "{k}: {why}");
        }
        let mut o = llama();
        o.remove("hidden_size");
        assert_eq!(from_json(&o).unwrap_err().0, "model-config-readable");
    }

    #[test]
    fn the_newer_rope_parameters_key_gives_theta() {
        let mut o = llama();
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 1e6}));
        assert_eq!(from_json(&o).unwrap().rope_theta, 1e6);
    }

    #[test]
    fn every_model_round_trips_through_its_config() {
        for m in [ModelConfig::dense_4l(), ModelConfig { ffn_kind: FfnKind::GatedGelu, tie_embeddings: true, ..ModelConfig::tiny() }, ModelConfig::llama_3_70b()] {
            let back = from_json(to_json(&m, "float32").as_object().unwrap()).unwrap();
            assert_eq!(back, m);
        }
    }
}
