//! A byte-level BPE tokenizer trained in the test (no files from elsewhere)
//! and a ChatML-style chat template, shared by the text and conversion tests.

#![allow(dead_code)] // each test binary uses its own subset

use ksa::text::TextTokenizer;

/// Special tokens of the test tokenizer: EOS first (id 0).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Text with accents, CJK and an emoji: byte-level BPE splits some of
/// these characters over several ids, which the streaming tests need.
pub fn corpus() -> Vec<String> {
    let lines = [
        "The quick brown fox jumps over the lazy dog.",
        "Déjà vu: a naïve café serves crème brûlée.",
        "日本語のテキストと中文文本。",
        "Rust 🦀 is fast ✓ and safe; ünïcödé everywhere.",
        "Summaries compress each chunk of the context.",
    ];
    (0..20)
        .map(|i| {
            format!(
                "{} {}",
                lines[i % lines.len()],
                lines[(i * 3 + 1) % lines.len()]
            )
        })
        .collect()
}

/// The test tokenizer: 256 byte tokens, 3 specials and the merges learned
/// from [`corpus`] up to `vocab` tokens.
pub fn tokenizer(vocab: usize) -> TextTokenizer {
    let texts = corpus();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    TextTokenizer::train_byte_level(&refs, vocab, &SPECIALS).unwrap()
}

/// A ChatML template (Qwen's format) using a Python string method and
/// `raise_exception`, as real templates do.
pub const CHATML: &str = "{% for message in messages %}\
{% if message.role not in ['system', 'user', 'assistant'] %}\
{{ raise_exception('unknown role ' ~ message.role) }}{% endif %}\
<|im_start|>{{ message.role }}\n{{ message.content.strip() }}<|im_end|>\n\
{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
