//! Prompt tokenizers, built on Hugging Face's `tokenizers` crate (pure Rust: compiled with
//! its `fancy-regex` engine, no C library).
//!
//! [`ClipTokenizer`] reproduces transformers' `CLIPTokenizer` (transformers 5, which only has
//! the `tokenizers`-backed implementation) exactly:
//!
//! 1. normalisation: Unicode NFC, every whitespace run (`\s+`) to one space, lowercase;
//! 2. pre-tokenisation: CLIP's regex
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace between the matches is dropped), then GPT-2's byte-to-unicode mapping;
//! 3. byte-level BPE with the `</w>` end-of-word suffix;
//! 4. `<|startoftext|>` ... `<|endoftext|>` around the ids, truncation to `model_max_length`
//!    (77) keeping the end token, padding to 77 with the model's own pad token
//!    (`<|endoftext|>` for SD 1.x and SDXL's first tokenizer, `!` (id 0) for SD 2.x and SDXL's
//!    `tokenizer_2`).
//!
//! The special tokens (bos, eos, unk, pad) are added tokens as in transformers: they are
//! matched in the prompt text before BPE, so a `!` in a prompt is the pad token itself for a
//! tokenizer whose pad token is `!`, exactly as transformers encodes it. A string special
//! token is matched on the raw text, one written as an `AddedToken` object uses its own
//! `normalized` flag.
//!
//! ftfy's `fix_text` (which transformers 4's slow tokenizer applied when ftfy was installed)
//! is not reproduced: transformers 5 does not apply it either.
//!
//! [`T5Tokenizer`] loads a T5 `tokenizer.json` (Unigram) or a SentencePiece `spiece.model`.

use std::collections::BTreeMap;
use std::path::Path;

use diffusion_core::{ConfigMap, Error, ModelDir, Result};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokenizers::utils::padding::{PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};

mod t5;
pub use t5::T5Tokenizer;

/// The CLIP pre-tokenisation regex (transformers' `CLIPTokenizer`).
pub const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's start-of-text token.
pub const CLIP_BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also the unknown token, and SD 1.x's pad token).
pub const CLIP_EOS: &str = "<|endoftext|>";
/// The sequence length of every Stable Diffusion text encoder.
pub const CLIP_MAX_LENGTH: usize = 77;

/// transformers treats a `model_max_length` above this as "unset" (it writes `1e30`).
const UNSET_MAX_LENGTH: f64 = 1e9;

/// One special token as transformers adds it.
#[derive(Debug, Clone, PartialEq)]
struct SpecialToken {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
}

impl SpecialToken {
    /// A token from a `tokenizer_config.json` / `special_tokens_map.json` value: a plain string
    /// (added with `normalized: false`, as transformers does) or an `AddedToken` object.
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self {
                content: s.clone(),
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
            }),
            Value::Object(map) => {
                let flag =
                    |k: &str, default: bool| map.get(k).and_then(Value::as_bool).unwrap_or(default);
                Some(Self {
                    content: map.get("content")?.as_str()?.to_string(),
                    single_word: flag("single_word", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    normalized: flag("normalized", true),
                })
            }
            _ => None,
        }
    }

    fn plain(content: &str) -> Self {
        Self::from_value(&Value::String(content.to_string())).expect("a string is a token")
    }
}

/// The special tokens and length limit of a tokenizer folder (`tokenizer_config.json`, with
/// `special_tokens_map.json` filling in what it does not set).
#[derive(Debug, Clone, PartialEq)]
struct TokenizerSettings {
    bos: SpecialToken,
    eos: SpecialToken,
    unk: SpecialToken,
    pad: SpecialToken,
    model_max_length: usize,
    /// Extra tokens from `added_tokens_decoder` (id order), before the special tokens.
    added: Vec<SpecialToken>,
}

impl TokenizerSettings {
    fn clip_defaults() -> Self {
        Self {
            bos: SpecialToken::plain(CLIP_BOS),
            eos: SpecialToken::plain(CLIP_EOS),
            unk: SpecialToken::plain(CLIP_EOS),
            pad: SpecialToken::plain(CLIP_EOS),
            model_max_length: CLIP_MAX_LENGTH,
            added: Vec::new(),
        }
    }

    /// Reads `tokenizer_config.json` and `special_tokens_map.json` from `dir` when present.
    fn read(dir: &Path, mut settings: Self) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let lookup = |key: &str| -> Option<SpecialToken> {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(SpecialToken::from_value)
                .or_else(|| {
                    map.as_ref()
                        .and_then(|m| m.get(key))
                        .and_then(SpecialToken::from_value)
                })
        };
        if let Some(t) = lookup("bos_token") {
            settings.bos = t;
        }
        if let Some(t) = lookup("eos_token") {
            settings.eos = t;
        }
        if let Some(t) = lookup("unk_token") {
            settings.unk = t;
        }
        if let Some(t) = lookup("pad_token") {
            settings.pad = t;
        }
        if let Some(config) = &config {
            if let Some(n) = config.get("model_max_length").and_then(Value::as_f64)
                && (1.0..UNSET_MAX_LENGTH).contains(&n)
            {
                settings.model_max_length = n as usize;
            }
            if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
                let mut by_id: Vec<(u64, SpecialToken)> = decoder
                    .iter()
                    .filter_map(|(id, v)| Some((id.parse().ok()?, SpecialToken::from_value(v)?)))
                    .collect();
                by_id.sort_by_key(|(id, _)| *id);
                settings.added = by_id.into_iter().map(|(_, t)| t).collect();
            }
        }
        Ok(settings)
    }

    /// The added tokens in transformers' order; a later definition of the same content
    /// replaces an earlier one (so a string `pad_token` equal to the eos token makes it
    /// `normalized: false`, as transformers does).
    fn special_tokens(&self) -> Vec<SpecialToken> {
        let mut out: Vec<SpecialToken> = Vec::new();
        let all = self
            .added
            .iter()
            .chain([&self.bos, &self.eos, &self.unk, &self.pad]);
        for token in all {
            match out.iter_mut().find(|t| t.content == token.content) {
                Some(existing) => *existing = token.clone(),
                None => out.push(token.clone()),
            }
        }
        out
    }
}

fn read_optional_json(path: &Path) -> Result<Option<ConfigMap>> {
    if path.is_file() {
        ConfigMap::from_file(path).map(Some)
    } else {
        Ok(None)
    }
}

fn tokenizer_error(context: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights(format!("{}: invalid tokenizer: {e}", context.display()))
}

/// transformers' `CLIPTokenizer`: see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Configured without padding or truncation; `encode` adds them.
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    pad_token: String,
}

impl ClipTokenizer {
    /// Loads the tokenizer of a pipeline component (`tokenizer`, `tokenizer_2`).
    pub fn from_model_dir(dir: &ModelDir, component: &str) -> Result<Self> {
        Self::from_folder(dir.component_path(component)?)
    }

    /// Loads a tokenizer folder: `tokenizer.json` when present, otherwise `vocab.json` +
    /// `merges.txt`; special tokens and `model_max_length` from `tokenizer_config.json` /
    /// `special_tokens_map.json` (CLIP's defaults when absent).
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer folder not found"),
            ));
        }
        let settings = TokenizerSettings::read(dir, TokenizerSettings::clip_defaults())?;
        let json_path = dir.join("tokenizer.json");
        let tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| tokenizer_error(&json_path, e))?
        } else {
            let vocab = read_vocab(&dir.join("vocab.json"))?;
            let merges = read_merges(&dir.join("merges.txt"))?;
            build_clip_tokenizer(vocab, merges, &settings, dir)?
        };
        Self::from_parts(tokenizer, &settings, dir)
    }

    /// Builds the tokenizer from a vocabulary (`token -> id`) and BPE merges (`"a b"` pairs
    /// in priority order) with CLIP's default special tokens and `pad_token`.
    pub fn from_vocab_and_merges(
        vocab: BTreeMap<String, u32>,
        merges: Vec<String>,
        pad_token: &str,
    ) -> Result<Self> {
        let mut settings = TokenizerSettings::clip_defaults();
        settings.pad = SpecialToken::plain(pad_token);
        let context = Path::new("<vocabulary>");
        let tokenizer = build_clip_tokenizer(vocab, merges, &settings, context)?;
        Self::from_parts(tokenizer, &settings, context)
    }

    fn from_parts(
        tokenizer: Tokenizer,
        settings: &TokenizerSettings,
        context: &Path,
    ) -> Result<Self> {
        let id = |token: &SpecialToken, what: &str| {
            tokenizer.token_to_id(&token.content).ok_or_else(|| {
                Error::Weights(format!(
                    "{}: {what} `{}` is not in the vocabulary",
                    context.display(),
                    token.content
                ))
            })
        };
        if settings.model_max_length < 3 {
            return Err(Error::config(
                "model_max_length",
                format!("{} leaves no room for a prompt", settings.model_max_length),
            ));
        }
        Ok(Self {
            bos_id: id(&settings.bos, "bos_token")?,
            eos_id: id(&settings.eos, "eos_token")?,
            pad_id: id(&settings.pad, "pad_token")?,
            pad_token: settings.pad.content.clone(),
            max_length: settings.model_max_length,
            tokenizer,
        })
    }

    /// Token ids of `prompt`, as transformers'
    /// `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`:
    /// `[bos, ..., eos, pad, pad, ...]`, exactly [`ClipTokenizer::max_length`] long.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: self.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::InvalidArgument(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(self.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let encoding = tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`ClipTokenizer::encode`] for several prompts.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.encode(p)).collect()
    }

    /// Token ids without truncation or padding, with bos and eos: as
    /// `tokenizer(prompt, truncation=False).input_ids`. Longer than
    /// [`ClipTokenizer::max_length`] when the prompt does not fit (diffusers warns and
    /// truncates; this tells how much was cut).
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of token ids (special tokens dropped, `</w>` turned into spaces), as
    /// transformers' `decode(ids, skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot decode ids: {e}")))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }

    /// Padded sequence length (`model_max_length`, 77 for every SD tokenizer).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The pad token (`<|endoftext|>` or `!`).
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (without padding or truncation).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

fn read_vocab(path: &Path) -> Result<BTreeMap<String, u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        context: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Reads `merges.txt`: one `a b` pair per line; the `#version` header and blank lines are
/// skipped.
fn read_merges(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        if line.split(' ').count() != 2 {
            return Err(Error::Weights(format!(
                "{}:{}: a merge must be two tokens separated by one space, found {line:?}",
                path.display(),
                i + 1
            )));
        }
        merges.push(line.to_string());
    }
    Ok(merges)
}

/// The transformers 5 `CLIPTokenizer` pipeline as a `tokenizer.json` document.
fn build_clip_tokenizer(
    vocab: BTreeMap<String, u32>,
    merges: Vec<String>,
    settings: &TokenizerSettings,
    context: &Path,
) -> Result<Tokenizer> {
    let lookup = |content: &str| -> Result<u32> {
        vocab.get(content).copied().ok_or_else(|| {
            Error::Weights(format!(
                "{}: special token `{content}` is not in the vocabulary",
                context.display()
            ))
        })
    };
    let bos_id = lookup(&settings.bos.content)?;
    let eos_id = lookup(&settings.eos.content)?;
    let mut next_id = vocab.values().max().map_or(0, |m| m + 1);
    let added: Vec<Value> = settings
        .special_tokens()
        .into_iter()
        .map(|t| {
            let id = vocab.get(&t.content).copied().unwrap_or_else(|| {
                next_id += 1;
                next_id - 1
            });
            json!({
                "id": id,
                "content": t.content,
                "single_word": t.single_word,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "normalized": t.normalized,
                "special": true,
            })
        })
        .collect();
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed",
             "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true},
        ]},
        "post_processor": {"type": "RobertaProcessing",
            "sep": [settings.eos.content, eos_id], "cls": [settings.bos.content, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": settings.unk.content,
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let bytes = serde_json::to_vec(&document).map_err(|e| tokenizer_error(context, e))?;
    Tokenizer::from_bytes(bytes).map_err(|e| tokenizer_error(context, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary (256 bytes, with and without `</w>`) plus `merges`.
    fn tiny_vocab(merges: &[&str]) -> (BTreeMap<String, u32>, Vec<String>) {
        let bytes = bytes_to_unicode();
        let mut tokens: Vec<String> = bytes.clone();
        tokens.extend(bytes.iter().map(|b| format!("{b}</w>")));
        tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
        tokens.push(CLIP_BOS.into());
        tokens.push(CLIP_EOS.into());
        let vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        (vocab, merges.iter().map(|m| m.to_string()).collect())
    }

    /// GPT-2's byte -> printable character table, in CLIP's vocabulary order.
    fn bytes_to_unicode() -> Vec<String> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        cs.into_iter()
            .map(|c| char::from_u32(c).unwrap().to_string())
            .collect()
    }

    #[test]
    fn bpe_with_end_of_word_suffix_and_special_tokens() {
        let (vocab, merges) = tiny_vocab(&["h i</w>", "c a", "ca t</w>"]);
        let id = |t: &str| vocab[t];
        let tok = ClipTokenizer::from_vocab_and_merges(vocab.clone(), merges, CLIP_EOS).unwrap();
        let ids = tok.encode("Hi  CAT!").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(
            ids[..5],
            [
                id(CLIP_BOS),
                id("hi</w>"),
                id("cat</w>"),
                id("!</w>"),
                id(CLIP_EOS)
            ]
        );
        assert!(ids[5..].iter().all(|&i| i == id(CLIP_EOS)));
        assert_eq!(tok.decode(&ids).unwrap(), "hi cat !");
        assert_eq!(
            tok.encode_unpadded("hi").unwrap(),
            vec![id(CLIP_BOS), id("hi</w>"), id(CLIP_EOS)]
        );
    }

    #[test]
    fn truncation_keeps_eos_and_pad_token_is_used() {
        let (vocab, merges) = tiny_vocab(&[]);
        let bang = vocab["!"];
        let tok = ClipTokenizer::from_vocab_and_merges(vocab.clone(), merges, "!").unwrap();
        assert_eq!(tok.pad_id(), bang);
        let long = "a ".repeat(100);
        let ids = tok.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], tok.bos_id());
        assert_eq!(ids[76], tok.eos_id());
        assert!(ids[1..76].iter().all(|&i| i == vocab["a</w>"]));
        assert_eq!(tok.encode_unpadded(&long).unwrap().len(), 102);
        let short = tok.encode("a").unwrap();
        assert_eq!(short[..3], [tok.bos_id(), vocab["a</w>"], tok.eos_id()]);
        assert!(short[3..].iter().all(|&i| i == bang));
        // "!" is an added token here: it is not BPE-encoded as "!</w>".
        assert_eq!(
            tok.encode_unpadded("a!").unwrap()[1..3],
            [vocab["a</w>"], bang]
        );
        let batch = tok.encode_batch(&["a", "a a"]).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0], short);
    }

    #[test]
    fn folder_errors_are_typed() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            ClipTokenizer::from_folder(tmp.path().join("missing")),
            Err(Error::Io { .. })
        ));
        // No vocabulary at all.
        assert!(matches!(
            ClipTokenizer::from_folder(tmp.path()),
            Err(Error::Io { .. })
        ));
        let (vocab, _) = tiny_vocab(&[]);
        std::fs::write(
            tmp.path().join("vocab.json"),
            serde_json::to_string(&vocab).unwrap(),
        )
        .unwrap();
        std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        assert!(matches!(
            ClipTokenizer::from_folder(tmp.path()),
            Err(Error::Weights(_))
        ));
        std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\n").unwrap();
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"pad_token": "<pad>"}"#,
        )
        .unwrap();
        // A pad token outside the vocabulary is appended to it, as transformers does.
        let tok = ClipTokenizer::from_folder(tmp.path()).unwrap();
        assert_eq!(tok.pad_id() as usize, vocab.len());
        assert_eq!(tok.vocab_size(), vocab.len() + 1);
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>"}"#,
        )
        .unwrap();
        match ClipTokenizer::from_folder(tmp.path()) {
            Err(Error::Weights(m)) => assert!(m.contains("<s>"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"pad_token": "!", "model_max_length": 1e30}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_folder(tmp.path()).unwrap();
        assert_eq!(tok.max_length(), 77);
        assert_eq!(tok.pad_token(), "!");
        std::fs::write(tmp.path().join("tokenizer.json"), "{").unwrap();
        match ClipTokenizer::from_folder(tmp.path()) {
            Err(Error::Weights(m)) => assert!(m.contains("tokenizer.json"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
