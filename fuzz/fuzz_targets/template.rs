//! Chat templates (a GGUF's `tokenizer.chat_template`, `--chat-template FILE`): compiling
//! and rendering any source ends in a template or an error, within the fuel and output
//! caps, never a panic or a hang; a rendering that succeeds contains its instruction.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::chat::{ChatTemplate, SystemPrompt};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(src.to_string(), "<s>".into(), "</s>".into()) else {
        return;
    };
    for sys in [
        SystemPrompt::TemplateDefault,
        SystemPrompt::Empty,
        SystemPrompt::Text("You are terse.".into()),
    ] {
        if let Ok(f) = t.render(&sys, "Name a colour.") {
            assert!(f.instruction.end <= f.text.len());
            assert!(f.text.is_char_boundary(f.instruction.start));
        }
    }
});
