//! The JSON options of `load_by_name_with_config` and of `set_input` index 1, with the names
//! WasmEdge's GGML plugin reads (`n-predict`, `ctx-size`, `temp`, `top-p`, `repeat-penalty`,
//! `seed`, ...). Unknown keys are ignored, as there; a known key of the wrong type is an error.

use serde_json::Value;

use crate::llm::generate::Options;

/// Largest `ctx-size` accepted (the model's own context length caps it further).
pub const MAX_CTX: usize = 8192;

/// Applies the keys of `json` (an object) to `options`.
pub fn apply(options: &mut Options, json: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("the options are not JSON: {e}"))?;
    let obj = v.as_object().ok_or("the options are not a JSON object")?;
    let uint = |k: &str, v: &Value| v.as_u64().ok_or_else(|| format!("{k} must be a non-negative integer"));
    let float = |k: &str, v: &Value| v.as_f64().map(|f| f as f32).ok_or_else(|| format!("{k} must be a number"));
    for (k, v) in obj {
        match k.as_str() {
            "n-predict" | "n_predict" => {
                // WasmEdge: -1 means "until the context is full".
                options.n_predict = if v.as_i64() == Some(-1) { usize::MAX } else { uint(k, v)? as usize };
            }
            "ctx-size" | "ctx_size" => options.ctx_size = (uint(k, v)? as usize).clamp(1, MAX_CTX),
            "temp" | "temperature" => options.sampling.temperature = float(k, v)?.max(0.0),
            "top-p" | "top_p" => options.sampling.top_p = float(k, v)?.clamp(0.0, 1.0),
            "repeat-penalty" | "repeat_penalty" => options.sampling.repeat_penalty = float(k, v)?.max(0.0),
            "repeat-last-n" => options.sampling.repeat_last_n = uint(k, v)? as usize,
            "seed" => options.sampling.seed = v.as_i64().map(|s| s as u64).ok_or("seed must be an integer")?,
            "stream-stdout" if v.as_bool() == Some(true) => {
                return Err("stream-stdout is not supported (the output goes through get_output)".into());
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasmedge_names_apply_and_bad_types_are_refused() {
        let mut o = Options::default();
        apply(&mut o, br#"{"n-predict": 7, "ctx-size": 64, "temp": 0.5, "top-p": 0.9, "seed": 3, "enable-log": false}"#).unwrap();
        assert_eq!((o.n_predict, o.ctx_size, o.sampling.temperature, o.sampling.seed), (7, 64, 0.5, 3));
        assert!(apply(&mut o, br#"{"n-predict": "x"}"#).is_err());
        assert!(apply(&mut o, b"[1]").is_err());
        assert!(apply(&mut o, br#"{"stream-stdout": true}"#).is_err());
    }
}
