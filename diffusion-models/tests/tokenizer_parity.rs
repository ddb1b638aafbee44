//! Tokenizers against transformers 5.24: the full 49408-token CLIP vocabulary on
//! `clip-tokenizer-full/prompts.json` (both pad conventions), the 1000-token tokenizers of the
//! tiny pipelines on their recorded `input_ids`, and a tiny T5 (Unigram) tokenizer from both
//! `tokenizer.json` and `spiece.model`.

use std::path::PathBuf;

use diffusion_core::ModelDir;
use diffusion_models::tokenizer::{ClipTokenizer, T5Tokenizer};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn full_clip_vocabulary_matches_transformers_for_both_pad_tokens() {
    let dir = fixture("clip-tokenizer-full");
    let doc = read_json(dir.join("prompts.json"));
    let sd1 = ClipTokenizer::from_folder(&dir).unwrap();
    assert_eq!(sd1.vocab_size(), 49408);
    assert_eq!(sd1.bos_id() as u64, doc["bos_id"].as_u64().unwrap());
    assert_eq!(sd1.eos_id() as u64, doc["eos_id"].as_u64().unwrap());
    assert_eq!(sd1.pad_id() as u64, doc["pad_id_sd1"].as_u64().unwrap());

    // The SD2 convention: the same files with pad token "!".
    let tmp = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(dir.join(name), tmp.path().join(name)).unwrap();
    }
    let mut config = read_json(dir.join("tokenizer_config.json"));
    config["pad_token"] = Value::String("!".into());
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let sd2 = ClipTokenizer::from_folder(tmp.path()).unwrap();
    assert_eq!(sd2.pad_id() as u64, doc["pad_id_sd2"].as_u64().unwrap());

    let prompts = doc["prompts"].as_array().unwrap();
    let (mut agree_sd1, mut agree_sd2, mut agree_full) = (0, 0, 0);
    let mut failures = Vec::new();
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let got = sd1.encode(text).unwrap();
        if got == ids(&p["ids_sd1"]) {
            agree_sd1 += 1;
        } else {
            failures.push(format!("sd1 {text:?}: got {got:?}"));
        }
        let got = sd2.encode(text).unwrap();
        if got == ids(&p["ids_sd2"]) {
            agree_sd2 += 1;
        } else {
            failures.push(format!("sd2 {text:?}: got {got:?}"));
        }
        let got = sd1.encode_unpadded(text).unwrap();
        if got == ids(&p["ids_unpadded"]) {
            agree_full += 1;
        } else {
            failures.push(format!("unpadded {text:?}: got {got:?}"));
        }
    }
    println!(
        "CLIP full vocabulary: sd1 {agree_sd1}/{n}, sd2 {agree_sd2}/{n}, unpadded {agree_full}/{n}",
        n = prompts.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(prompts.len() >= 60);
}

/// The tiny pipelines' tokenizers (1000 tokens, 486 real merges) reproduce the `input_ids`
/// their text-encoder references were computed from.
#[test]
fn tiny_pipeline_tokenizers_match_recorded_input_ids() {
    let cases = [
        ("sd1-tiny", "tokenizer", "text_encoder"),
        ("sd2-tiny", "tokenizer", "text_encoder"),
        ("unet-sdxl-tiny", "tokenizer", "text_encoder"),
        ("unet-sdxl-tiny", "tokenizer_2", "text_encoder_2"),
    ];
    for (folder, component, encoder) in cases {
        let dir = ModelDir::open(fixture(folder)).unwrap();
        let tokenizer = ClipTokenizer::from_model_dir(&dir, component).unwrap();
        let bytes = std::fs::read(fixture(folder).join("reference.safetensors")).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let prompts: Vec<String> = serde_json::from_str(
            metadata
                .metadata()
                .as_ref()
                .unwrap()
                .get("text_encoder.prompts")
                .unwrap(),
        )
        .unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(&format!("{encoder}.input_ids")).unwrap();
        let want: Vec<u32> = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let got: Vec<u32> = tokenizer.encode_batch(&refs).unwrap().concat();
        assert_eq!(got, want, "{folder}/{component}");
        println!("{folder}/{component}: {} prompts identical", prompts.len());
    }
}

#[test]
fn t5_tokenizer_matches_transformers_from_json_and_spiece() {
    let dir = fixture("t5-tokenizer-tiny");
    let doc = read_json(dir.join("prompts.json"));
    let max_length = doc["max_length"].as_u64().unwrap() as usize;
    let from_json = T5Tokenizer::from_folder(&dir).unwrap();
    let extra_ids = doc["extra_ids"].as_u64().unwrap() as usize;
    let from_spiece = T5Tokenizer::from_spiece(&dir.join("spiece.model"), extra_ids).unwrap();
    for tok in [&from_json, &from_spiece] {
        assert_eq!(tok.vocab_size() as u64, doc["vocab_size"].as_u64().unwrap());
        assert_eq!(tok.pad_id() as u64, doc["pad_id"].as_u64().unwrap());
        assert_eq!(tok.eos_id() as u64, doc["eos_id"].as_u64().unwrap());
    }
    let prompts = doc["prompts"].as_array().unwrap();
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        for (name, tok) in [
            ("tokenizer.json", &from_json),
            ("spiece.model", &from_spiece),
        ] {
            let (got, mask) = tok.encode_with_mask(text, max_length).unwrap();
            assert_eq!(got, ids(&p["ids_padded"]), "{name} {text:?}");
            assert_eq!(mask, ids(&p["attention_mask"]), "{name} {text:?}");
            assert_eq!(
                tok.encode_unpadded(text).unwrap(),
                ids(&p["ids_unpadded"]),
                "{name} {text:?} (unpadded)"
            );
        }
    }
    println!(
        "T5: {} prompts identical from tokenizer.json and spiece.model",
        prompts.len()
    );
}
