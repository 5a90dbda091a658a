//! Chat formatting on real models: the GGUF's own template, default system prompts, and the
//! instruction / post-instruction token spans (issue 2, item 3).

mod common;

use common::*;
use persona_gate::chat::{Prompt, SystemPrompt};

fn render(file: &str, sys: SystemPrompt, user: &str) -> Prompt {
    let m = load(file, 1);
    let t = m.chat_template(None).unwrap();
    Prompt::new(&m, t.render(&sys, user).unwrap()).unwrap()
}

fn pieces(file: &str, p: &Prompt, r: std::ops::Range<usize>) -> String {
    let m = load(file, 1);
    let bytes: Vec<u8> = p.tokens[r]
        .iter()
        .flat_map(|&t| m.token_text_bytes(t))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn qwen_inserts_its_default_system_prompt() {
    let p = render(
        QWEN05,
        SystemPrompt::TemplateDefault,
        "How do I bake bread?",
    );
    assert_eq!(
        p.text,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    );
    // <|im_start|> system \n ... ; special tokens are single ids.
    assert_eq!(&p.tokens[..3], &[151644, 8948, 198]);
    assert_eq!(
        pieces(QWEN05, &p, p.instruction.clone()),
        "How do I bake bread?"
    );
    // Post-instruction: <|im_end|> \n <|im_start|> assistant \n
    assert_eq!(
        &p.tokens[p.post_instruction.clone()],
        &[151645, 198, 151644, 77091, 198]
    );
}

#[test]
fn qwen_no_system_and_custom_system() {
    let p = render(QWEN05, SystemPrompt::Empty, "Hi");
    assert!(
        p.text
            .starts_with("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>"),
        "{:?}",
        p.text
    );
    let p = render(QWEN05, SystemPrompt::Text("You are terse.".into()), "Hi");
    assert!(
        p.text
            .starts_with("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi"),
        "{:?}",
        p.text
    );
    assert_eq!(pieces(QWEN05, &p, p.instruction.clone()), "Hi");
}

#[test]
fn smollm2_template_and_spans() {
    let p = render(SMOL, SystemPrompt::TemplateDefault, "How do I bake bread?");
    assert_eq!(
        p.text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(p.tokens[0], 1, "<|im_start|> is token 1 in SmolLM2");
    assert_eq!(
        pieces(SMOL, &p, p.instruction.clone()),
        "How do I bake bread?"
    );
    assert_eq!(
        pieces(SMOL, &p, p.post_instruction.clone()),
        "<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        p.tokens[p.post_instruction.start], 2,
        "<|im_end|> is token 2 in SmolLM2"
    );
    assert_eq!(p.post_instruction.end, p.tokens.len());
}

#[test]
fn spans_cover_the_prompt_in_order() {
    for f in [SMOL, QWEN05] {
        for s in [
            "a",
            "Write a poem about the sea.",
            "  spaced  ",
            "Émile's café — naïve 😀?",
        ] {
            let p = render(f, SystemPrompt::TemplateDefault, s);
            assert!(
                p.instruction.start < p.instruction.end,
                "{f} {s:?}: empty instruction span"
            );
            assert_eq!(p.instruction.end, p.post_instruction.start);
            assert_eq!(pieces(f, &p, p.instruction.clone()).trim(), s.trim(), "{f}");
        }
    }
}
