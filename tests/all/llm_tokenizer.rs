//! The GGUF tokenizer (src/llm/tokenizer.rs) on SmolLM2-135M-Instruct's vocabulary: byte-exact with
//! llama.cpp's prompt tokens (tests/reference/) and with Hugging Face `tokenizers` on a corpus of
//! 3,000 varied strings (tests/data/llm/smollm2_tokenizer.json, written by
//! scripts/tokenizer-reference); decoding gives the text back; the GGUF's chat template renders.
//!
//! Needs the model file (scripts/fetch-model); skips without it unless REQUIRE_MODEL=1 or CI.

use ao_gpu_worker::gguf::Gguf;
use ao_gpu_worker::llm::Tokenizer;
use ao_gpu_worker::llm::chat::{ChatTemplate, Message};
use serde_json::Value;

const CORPUS: &str = include_str!("../data/llm/smollm2_tokenizer.json");
const REFERENCE: &str = include_str!("../reference/smollm2_llamacpp_greedy.json");

fn load(test: &str) -> Option<(Gguf, Tokenizer)> {
    let path = crate::smollm2::model_path(test)?;
    let g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    Some((g, tok))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| u32::try_from(t.as_u64().unwrap()).unwrap()).collect()
}

#[test]
fn prompts_tokenize_as_llama_cpp_does() {
    let Some((_, tok)) = load("prompts_tokenize_as_llama_cpp_does") else { return };
    let refs: Value = serde_json::from_str(REFERENCE).unwrap();
    for r in refs.as_array().unwrap() {
        let prompt = r["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true), ids(&r["prompt_tokens"]), "{prompt:?}");
        // llama.cpp's greedy text is the detokenized greedy tokens.
        assert_eq!(tok.decode(&ids(&r["greedy_tokens"]), false), r["text"].as_str().unwrap(), "{prompt:?}");
    }
}

#[test]
fn corpus_tokenizes_as_hugging_face_tokenizers_does() {
    let Some((_, tok)) = load("corpus_tokenizes_as_hugging_face_tokenizers_does") else { return };
    let doc: Value = serde_json::from_str(CORPUS).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 3000, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = tok.encode(text, true);
        if got != want {
            wrong.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // Byte-level BPE loses nothing: the ids decode to the text (control tokens rendered).
        assert_eq!(tok.decode(&got, true), text);
    }
    assert!(wrong.is_empty(), "{} of {} cases differ, first: {}", wrong.len(), cases.len(), wrong[..wrong.len().min(5)].join("\n"));
    // Without special parsing a control token's text is plain text.
    assert_ne!(tok.encode("<|im_start|>", false), tok.encode("<|im_start|>", true));
    assert_eq!(tok.encode("<|im_start|>", true), [1]);
}

#[test]
fn the_ggufs_chat_template_renders_the_reference_prompt() {
    let Some((g, tok)) = load("the_ggufs_chat_template_renders_the_reference_prompt") else { return };
    let t = ChatTemplate::from_gguf(&g).unwrap();
    let user = Message { role: "user".into(), content: "Name three primary colors.".into() };
    let system = Message { role: "system".into(), content: "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into() };
    // With the default system message the template inserts, and with none when one is given.
    let rendered = t.render(std::slice::from_ref(&user), true);
    assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{rendered}");
    assert_eq!(rendered, t.render(&[system, user.clone()], true));
    let refs: Value = serde_json::from_str(REFERENCE).unwrap();
    let reference_prompt = refs[0]["prompt"].as_str().unwrap();
    let without_system = rendered.split_once("<|im_end|>\n").unwrap().1;
    assert_eq!(without_system, reference_prompt);
    assert_eq!(tok.encode(without_system, true), ids(&refs[0]["prompt_tokens"]));
    assert!(tok.is_end_of_generation(2) && tok.is_end_of_generation(0) && !tok.is_end_of_generation(1));
}
