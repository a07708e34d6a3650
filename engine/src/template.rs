//! Chat templates: the Jinja template a model ships (Hugging Face style), rendered with minijinja.
//!
//! The context is what `transformers`' `apply_chat_template` passes: `messages` (a list of
//! `{role, content}`), `add_generation_prompt` (always true here), `bos_token`, `eos_token`, and the
//! function `raise_exception(message)`. Blocks are trimmed as transformers does (`trim_blocks`,
//! `lstrip_blocks`).

use minijinja::{context, Environment, Error, ErrorKind};

use crate::api::Message;

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the template may insert.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(NAME.to_string(), source.to_string())
            .map_err(|e| format!("chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
                _ => format!("chat template failed: {e:#}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its tokenizer_config.json ships it.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn smollm2_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>")).unwrap();
        let p = t.render(&[msg("user", "Hi there")]).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_own_system_prompt_and_turns() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>")).unwrap();
        let p =
            t.render(&[msg("system", "Be brief."), msg("user", "A"), msg("assistant", "B"), msg("user", "C")]).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA<|im_end|>\n\
             <|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_tokens() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                   {{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(t.render(&[msg("user", "x")]).unwrap(), "<s>x</s>");
        assert_eq!(t.render(&[msg("system", "x")]).unwrap_err(), "first must be user");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
