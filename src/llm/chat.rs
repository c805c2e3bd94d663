//! Chat prompts: messages rendered with the chat template a GGUF ships
//! (`tokenizer.chat_template`).
//!
//! No Jinja engine: a template is recognized as one of the known families and rendered by
//! code written for it. Supported: ChatML (`<|im_start|>role\ncontent<|im_end|>\n`, with an
//! optional default system message inserted when the first message is not a system one, as
//! SmolLM2's template does). Any other template is refused with [`ChatError::Unsupported`]; a
//! caller can still send a raw prompt.

use super::tokenizer::Tokenizer;
use crate::gguf::Gguf;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("the GGUF has no tokenizer.chat_template: send a raw prompt instead")]
    NoTemplate,
    #[error("the chat template is not one this worker renders (ChatML is): send a raw prompt instead. Template starts {0:?}")]
    Unsupported(String),
}

/// A recognized chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML; `default_system` is inserted first when the conversation has no system message.
    ChatMl { default_system: Option<String> },
}

impl ChatTemplate {
    /// The template of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ChatError> {
        let t = g.get("tokenizer.chat_template").and_then(|v| v.as_str()).ok_or(ChatError::NoTemplate)?;
        Self::recognize(t)
    }

    /// Recognizes a Jinja chat template's source.
    pub fn recognize(source: &str) -> Result<Self, ChatError> {
        let unsupported = || ChatError::Unsupported(source.chars().take(80).collect());
        // Whitespace aside (Jinja strings may hold a newline or its escape), the ChatML markers.
        let compact: String = source.replace("\\n", "\n").chars().filter(|c| !c.is_whitespace()).collect();
        let chatml =
            ["'<|im_start|>'+message['role']+'", "message['content']+'<|im_end|>", "add_generation_prompt", "'<|im_start|>assistant'"]
                .iter()
                .all(|marker| compact.contains(marker));
        if !chatml {
            return Err(unsupported());
        }
        // SmolLM2: {% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nSYSTEM<|im_end|>\n' }}{% endif %}
        let default_system = match source.find("messages[0]['role'] != 'system'") {
            None => None,
            Some(at) => {
                let rest = &source[at..];
                let open = "'<|im_start|>system";
                let start = rest.find(open).ok_or_else(unsupported)? + open.len();
                let body = rest[start..].strip_prefix('\n').or_else(|| rest[start..].strip_prefix("\\n")).ok_or_else(unsupported)?;
                let end = body.find("<|im_end|>").ok_or_else(unsupported)?;
                Some(body[..end].to_owned())
            }
        };
        Ok(Self::ChatMl { default_system })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let Self::ChatMl { default_system } = self;
        let mut out = String::new();
        if let (Some(system), Some(first)) = (default_system, messages.first())
            && first.role != "system"
        {
            out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        for m in messages {
            out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }

    /// The token ids of a rendered conversation (special tokens parsed).
    pub fn encode(&self, tok: &Tokenizer, messages: &[Message], add_generation_prompt: bool) -> Vec<u32> {
        tok.encode(&self.render(messages, add_generation_prompt), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_like_jinja() {
        let t = ChatTemplate::recognize(SMOLLM2).unwrap();
        let user = Message { role: "user".into(), content: "Hi".into() };
        assert_eq!(
            t.render(std::slice::from_ref(&user), true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = Message { role: "system".into(), content: "Be brief.".into() };
        assert_eq!(t.render(&[sys, user], false), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn other_templates_are_refused() {
        let llama3 = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}";
        assert!(matches!(ChatTemplate::recognize(llama3), Err(ChatError::Unsupported(_))));
    }
}
