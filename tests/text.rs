//! Text in and out: the tokenizer of a model folder (trained here), chat
//! templates, EOS ids, the UTF-8-safe streaming decoder, and text
//! generation over the cache with its typed errors.

mod model_common;
mod text_common;

use candle_core::{DType, Device};
use ksa::text::{generate_text, ChatMessage, TextTokenizer};
use ksa::{Error, GenerateOptions, KsaCache, Qwen3Ksa};
use model_common::{random_checkpoint, temp_dir, tiny_config, with};
use serde_json::json;
use text_common::{corpus, tokenizer, CHATML, SPECIALS};

const SAMPLE: &str = "Déjà vu: 日本語 🦀 naïve ✓ brûlée.";

#[test]
fn tokenizer_round_trips_through_a_folder() {
    let tok = tokenizer(300).with_chat_template(CHATML);
    let dir = temp_dir("tok-roundtrip");
    tok.save(&dir).unwrap();
    let loaded = TextTokenizer::from_folder(&dir).unwrap();
    let ids = tok.encode(SAMPLE).unwrap();
    assert_eq!(loaded.encode(SAMPLE).unwrap(), ids);
    assert_eq!(loaded.decode(&ids).unwrap(), SAMPLE);
    assert!(ids.len() < SAMPLE.len(), "merges were learned: {ids:?}");
    assert_eq!(loaded.eos_ids(), &[0]);
    assert_eq!(loaded.chat_template(), Some(CHATML));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stream_never_splits_a_character() {
    let tok = tokenizer(300);
    let ids = tok.encode(SAMPLE).unwrap();
    // The test means something only if some id is part of a character.
    let partial = ids
        .iter()
        .filter(|&&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(partial >= 2, "no id splits a character: {ids:?}");
    let mut stream = tok.stream();
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            pieces.push(piece);
        }
    }
    pieces.push(stream.finish().unwrap());
    for piece in &pieces {
        assert!(!piece.contains('\u{FFFD}'), "split character in {pieces:?}");
    }
    assert_eq!(pieces.concat(), SAMPLE);
    assert!(pieces.len() > 5, "streamed in pieces: {pieces:?}");

    // A generation that stops inside a character: the held-back bytes come
    // out at the end, as one replacement character.
    let crab = ids
        .iter()
        .position(|&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'))
        .unwrap();
    let cut = &ids[..=crab];
    let mut stream = tok.stream();
    let mut text = String::new();
    for &id in cut {
        text.extend(stream.push(id).unwrap());
    }
    text.push_str(&stream.finish().unwrap());
    assert_eq!(text, tok.decode(cut).unwrap());
    assert!(text.ends_with('\u{FFFD}'));
}

#[test]
fn eos_ids_come_from_generation_config_then_config_then_tokenizer_config() {
    let dir = temp_dir("tok-eos");
    tokenizer(300).save(&dir).unwrap();
    assert_eq!(TextTokenizer::from_folder(&dir).unwrap().eos_ids(), &[0]);
    std::fs::write(dir.join("config.json"), r#"{"eos_token_id": 2}"#).unwrap();
    assert_eq!(TextTokenizer::from_folder(&dir).unwrap().eos_ids(), &[2]);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 1]}"#,
    )
    .unwrap();
    assert_eq!(TextTokenizer::from_folder(&dir).unwrap().eos_ids(), &[2, 1]);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    assert!(matches!(
        TextTokenizer::from_folder(&dir),
        Err(Error::ModelConfig(m)) if m.contains("eos_token_id")
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chat_template_renders_with_special_tokens() {
    let tok = tokenizer(300).with_chat_template(CHATML);
    let messages = [ChatMessage::system("  Be brief. "), ChatMessage::user("Hi")];
    let text = tok.render_chat(&messages, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode_chat(&messages, true).unwrap();
    let start = tok.inner().token_to_id(SPECIALS[1]).unwrap();
    let end = tok.inner().token_to_id(SPECIALS[2]).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == end).count(), 2);
    assert_eq!(ids[0], start);
}

#[test]
fn chat_template_errors_are_typed() {
    let no_template = tokenizer(300);
    assert!(matches!(
        no_template.render_chat(&[ChatMessage::user("x")], true),
        Err(Error::ChatTemplate(m)) if m.contains("no chat template")
    ));
    let tok = tokenizer(300).with_chat_template(CHATML);
    let odd = ChatMessage {
        role: "tool".into(),
        content: "x".into(),
    };
    assert!(matches!(
        tok.render_chat(&[odd], true),
        Err(Error::ChatTemplate(m)) if m.contains("unknown role tool")
    ));
    let broken = tokenizer(300).with_chat_template("{% for m in messages %}{{ m.content }");
    assert!(matches!(
        broken.render_chat(&[ChatMessage::user("x")], true),
        Err(Error::ChatTemplate(_))
    ));
    // A template that would loop (almost) forever runs out of fuel.
    let endless = tokenizer(300).with_chat_template(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    assert!(matches!(
        endless.render_chat(&[], false),
        Err(Error::ChatTemplate(_))
    ));
}

#[test]
fn missing_or_malformed_tokenizer_is_a_typed_error() {
    let dir = temp_dir("tok-missing");
    assert!(matches!(
        TextTokenizer::from_folder(&dir),
        Err(Error::Tokenizer(m)) if m.contains("tokenizer.json") && m.contains("does not exist")
    ));
    std::fs::write(dir.join("tokenizer.json"), r#"{"model": {"type": "BPE""#).unwrap();
    assert!(matches!(
        TextTokenizer::from_folder(&dir),
        Err(Error::Tokenizer(m)) if m.contains("malformed")
    ));
    std::fs::write(dir.join("tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
    assert!(matches!(
        TextTokenizer::from_folder(&dir),
        Err(Error::Tokenizer(_))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// A tiny random KSA model whose text vocabulary holds the test tokenizer
/// (300 ids), with the tokenizer files in its folder.
fn text_model(tag: &str) -> (std::path::PathBuf, Qwen3Ksa) {
    let c = with(
        &tiny_config(),
        json!({"vocab_size": 302, "truncate_predict_nums": 300, "summary_token_begin": 300,
               "eos_token_id": null}),
    );
    let (dir, _) = random_checkpoint(tag, &c, 7);
    tokenizer(300).save(&dir).unwrap();
    let model = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    (dir, model)
}

#[test]
fn generated_text_streams_and_stops_at_eos() {
    let (dir, model) = text_model("gen-text");
    let tok = TextTokenizer::from_folder(&dir).unwrap();
    let prompt = tok.encode(&corpus()[0]).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    // A first run with an EOS that never comes (id 0 is a special token the
    // random model is unlikely to pick; checked below).
    let mut cache = KsaCache::new(&model, 1).unwrap();
    let mut streamed = String::new();
    let first = generate_text(&model, &tok, &mut cache, &prompt, &options, |p| {
        streamed.push_str(p)
    })
    .unwrap();
    assert_eq!(first.tokens.len(), 12);
    assert!(!first.stopped_at_eos && !first.tokens.contains(&0));
    assert_eq!(streamed, first.text);
    assert_eq!(first.text, tok.decode(&first.tokens).unwrap());
    assert_eq!(cache.seq_len(0).unwrap(), prompt.len() + 11);

    // Now make the 4th generated id the EOS: greedy decoding repeats the
    // same ids and stops right there.
    let eos = first.tokens[3];
    let stop = first.tokens.iter().position(|&t| t == eos).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        format!(r#"{{"eos_token_id": {eos}}}"#),
    )
    .unwrap();
    let tok = TextTokenizer::from_folder(&dir).unwrap();
    let mut cache = KsaCache::new(&model, 1).unwrap();
    let second = generate_text(&model, &tok, &mut cache, &prompt, &options, |_| {}).unwrap();
    assert!(second.stopped_at_eos);
    assert_eq!(second.tokens, first.tokens[..=stop]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn prompt_longer_than_the_cache_is_a_typed_error() {
    let (dir, model) = text_model("gen-long");
    let tok = TextTokenizer::from_folder(&dir).unwrap();
    let prompt = tok.encode(&corpus()[1]).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    let capacity = prompt.len() + 3;
    let mut cache = KsaCache::with_capacity(&model, 1, capacity).unwrap();
    let err = generate_text(&model, &tok, &mut cache, &prompt, &options, |_| {}).unwrap_err();
    assert!(
        matches!(err, Error::PromptTooLong { tokens, new_tokens: 4, capacity: c }
            if tokens == prompt.len() && c == capacity),
        "{err}"
    );
    assert_eq!(cache.seq_len(0).unwrap(), 0, "the cache is unchanged");
    // One token less fits.
    let options = GenerateOptions {
        max_new_tokens: 3,
        ..options
    };
    let out = generate_text(&model, &tok, &mut cache, &prompt, &options, |_| {}).unwrap();
    assert_eq!(out.tokens.len(), 3);
    let _ = std::fs::remove_dir_all(dir);
}
