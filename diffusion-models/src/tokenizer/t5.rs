//! [`T5Tokenizer`]: transformers 5's `T5Tokenizer` (SentencePiece Unigram), from a
//! `tokenizer.json` or directly from a SentencePiece `spiece.model`.

use std::path::Path;

use diffusion_core::{ConfigMap, Error, Result};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokenizers::normalizers::Precompiled;
use tokenizers::utils::padding::{PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};

use super::tokenizer_error;

/// Number of sentinel tokens (`<extra_id_0>` ... `<extra_id_99>`) T5 appends to its
/// vocabulary by default.
pub const T5_EXTRA_IDS: usize = 100;

/// transformers' `T5Tokenizer`.
///
/// Loaded from `tokenizer.json` when the folder has one (the saved pipeline is used as is),
/// otherwise from `spiece.model`, built the way transformers 5 converts it: the
/// SentencePiece pieces and scores as a Unigram model (unknown id 2), followed by the
/// sentinels `<extra_id_{N-1}>` ... `<extra_id_0>`; the model's precompiled character map
/// (NFKC-style normalisation) as a `Precompiled` normaliser; whitespace split + metaspace
/// (`▁`, prefixed to every word); `</s>` appended. The SentencePiece protobuf is read by a
/// small built-in decoder, so neither the sentencepiece C++ library nor protobuf is needed.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    eos_id: u32,
    pad_token: String,
}

impl T5Tokenizer {
    /// Loads a tokenizer folder (`tokenizer.json`, else `spiece.model`; `extra_ids` from
    /// `tokenizer_config.json`, default 100).
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json_path = dir.join("tokenizer.json");
        if json_path.is_file() {
            return Self::from_tokenizer_json(&json_path);
        }
        let spiece = dir.join("spiece.model");
        if !spiece.is_file() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json or spiece.model",
                ),
            ));
        }
        let config_path = dir.join("tokenizer_config.json");
        let extra_ids = if config_path.is_file() {
            let config = ConfigMap::from_file(&config_path)?;
            config
                .get("extra_ids")
                .and_then(Value::as_u64)
                .map_or(T5_EXTRA_IDS, |n| n as usize)
        } else {
            T5_EXTRA_IDS
        };
        Self::from_spiece(&spiece, extra_ids)
    }

    /// Loads a `tokenizer.json` written by transformers / tokenizers.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))?;
        Self::from_tokenizer(tokenizer, path)
    }

    /// Builds the tokenizer from a SentencePiece `spiece.model` (Unigram models only) with
    /// `extra_ids` sentinel tokens.
    pub fn from_spiece(path: &Path, extra_ids: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model = SentencePieceModel::parse(&bytes).map_err(|e| {
            Error::Weights(format!("{}: invalid spiece.model: {e}", path.display()))
        })?;
        if model.model_type != 1 {
            return Err(Error::Unsupported(format!(
                "{}: SentencePiece model type {} (only Unigram, type 1, is supported)",
                path.display(),
                model.model_type
            )));
        }
        if model.pieces.len() < 3 {
            return Err(Error::Weights(format!(
                "{}: {} pieces; T5 needs <pad>, </s> and <unk> first",
                path.display(),
                model.pieces.len()
            )));
        }
        let mut vocab: Vec<(String, f64)> = model
            .pieces
            .iter()
            .map(|(p, s)| (p.clone(), f64::from(*s)))
            .collect();
        let first_extra = vocab.len();
        vocab.extend(
            (0..extra_ids)
                .rev()
                .map(|i| (format!("<extra_id_{i}>"), 0.0)),
        );
        let special = |id: usize| -> Value {
            json!({"id": id, "content": vocab[id].0, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let mut added: Vec<Value> = (0..3).map(special).collect();
        // <extra_id_0> first, as transformers lists them.
        added.extend((first_extra..vocab.len()).rev().map(special));
        let eos = vocab[1].0.clone();
        let document = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always",
                 "split": true},
            ]},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": eos, "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": eos, "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}},
                         {"SpecialToken": {"id": eos, "type_id": 0}}],
                "special_tokens": {eos.clone(): {"id": eos, "ids": [1], "tokens": [eos]}}},
            "decoder": {"type": "Metaspace", "replacement": "\u{2581}",
                        "prepend_scheme": "always", "split": true},
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false},
        });
        let bytes = serde_json::to_vec(&document).map_err(|e| tokenizer_error(path, e))?;
        let mut tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| tokenizer_error(path, e))?;
        if let Some(charsmap) = model.precompiled_charsmap.filter(|c| !c.is_empty()) {
            let normalizer = Precompiled::from(&charsmap).map_err(|e| {
                Error::Weights(format!(
                    "{}: invalid precompiled charsmap: {e}",
                    path.display()
                ))
            })?;
            tokenizer.with_normalizer(Some(normalizer));
        }
        Self::from_tokenizer(tokenizer, path)
    }

    fn from_tokenizer(tokenizer: Tokenizer, context: &Path) -> Result<Self> {
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::Weights(format!(
                    "{}: `{token}` is not in the vocabulary",
                    context.display()
                ))
            })
        };
        Ok(Self {
            pad_id: id("<pad>")?,
            eos_id: id("</s>")?,
            pad_token: "<pad>".to_string(),
            tokenizer,
        })
    }

    /// Ids and attention mask of `prompt` as transformers'
    /// `tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)`
    /// (what diffusers' SD3 / Flux pipelines call with `max_sequence_length`): the prompt's
    /// pieces, `</s>`, then `<pad>` up to `max_length`; a longer prompt is cut, keeping `</s>`.
    pub fn encode_with_mask(
        &self,
        prompt: &str,
        max_length: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        if max_length < 2 {
            return Err(Error::InvalidArgument(format!(
                "max_length {max_length} leaves no room for a prompt"
            )));
        }
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::InvalidArgument(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let encoding = tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize prompt: {e}")))?;
        Ok((
            encoding.get_ids().to_vec(),
            encoding.get_attention_mask().to_vec(),
        ))
    }

    /// [`T5Tokenizer::encode_with_mask`] without the mask.
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<Vec<u32>> {
        self.encode_with_mask(prompt, max_length)
            .map(|(ids, _)| ids)
    }

    /// Ids without padding or truncation (ending with `</s>`).
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Vocabulary size including the sentinel tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (without padding or truncation).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The parts of a SentencePiece `ModelProto` the tokenizer needs.
#[derive(Debug, Clone, Default, PartialEq)]
struct SentencePieceModel {
    /// `(piece, score)` in id order.
    pieces: Vec<(String, f32)>,
    /// `TrainerSpec.model_type`: 1 Unigram, 2 BPE, 3 word, 4 char.
    model_type: u64,
    /// `NormalizerSpec.precompiled_charsmap`.
    precompiled_charsmap: Option<Vec<u8>>,
}

/// One protobuf field value.
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A minimal protobuf wire-format reader.
struct ProtoReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint too long at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("field of {n} bytes at byte {} runs past the end", self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next_field(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(format!("unsupported wire type {wire} for field {field}")),
        };
        Ok(Some((field, value)))
    }
}

impl SentencePieceModel {
    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut model = Self {
            model_type: 1,
            ..Self::default()
        };
        let mut reader = ProtoReader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (1, Field::Bytes(piece)) => model.pieces.push(parse_piece(piece)?),
                (2, Field::Bytes(trainer)) => {
                    let mut r = ProtoReader::new(trainer);
                    while let Some((f, v)) = r.next_field()? {
                        if let (3, Field::Varint(t)) = (f, v) {
                            model.model_type = t;
                        }
                    }
                }
                (3, Field::Bytes(normalizer)) => {
                    let mut r = ProtoReader::new(normalizer);
                    while let Some((f, v)) = r.next_field()? {
                        if let (2, Field::Bytes(map)) = (f, v) {
                            model.precompiled_charsmap = Some(map.to_vec());
                        }
                    }
                }
                (1..=3, _) => return Err(format!("field {field} has the wrong wire type")),
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces".to_string());
        }
        Ok(model)
    }
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<(String, f32), String> {
    let mut reader = ProtoReader::new(bytes);
    let mut piece = None;
    let mut score = 0.0f32;
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, Field::Bytes(text)) => {
                piece = Some(
                    String::from_utf8(text.to_vec())
                        .map_err(|_| "a piece is not valid UTF-8".to_string())?,
                )
            }
            (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
            (1 | 2, _) => return Err(format!("piece field {field} has the wrong wire type")),
            (_, Field::Varint(_) | Field::Fixed64 | Field::Bytes(_) | Field::Fixed32(_)) => {}
        }
    }
    Ok((piece.ok_or("a piece without text")?, score))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7F) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(field: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint((field << 3) | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn model(pieces: &[(&str, f32)], model_type: u64, charsmap: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, s) in pieces {
            let mut sp = Vec::new();
            bytes_field(1, p.as_bytes(), &mut sp);
            varint((2 << 3) | 5, &mut sp);
            sp.extend_from_slice(&s.to_le_bytes());
            varint(3 << 3, &mut sp);
            varint(1, &mut sp);
            bytes_field(1, &sp, &mut out);
        }
        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(model_type, &mut trainer);
        bytes_field(2, &trainer, &mut out);
        if let Some(map) = charsmap {
            let mut normalizer = Vec::new();
            bytes_field(2, map, &mut normalizer);
            bytes_field(3, &normalizer, &mut out);
        }
        out
    }

    const PIECES: [(&str, f32); 6] = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("\u{2581}", -2.0),
        ("\u{2581}cat", -3.0),
        ("s", -4.0),
    ];

    #[test]
    fn parses_pieces_and_builds_unigram() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spiece.model");
        std::fs::write(&path, model(&PIECES, 1, None)).unwrap();
        let parsed = SentencePieceModel::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(parsed.pieces.len(), 6);
        assert_eq!(parsed.pieces[4], ("\u{2581}cat".to_string(), -3.0));
        let tok = T5Tokenizer::from_spiece(&path, 2).unwrap();
        assert_eq!(tok.vocab_size(), 8);
        assert_eq!(tok.encode_unpadded("cats").unwrap(), vec![4, 5, 1]);
        // Sentinels: <extra_id_1> = 6, <extra_id_0> = 7.
        assert_eq!(tok.encode_unpadded("<extra_id_0>").unwrap(), vec![7, 1]);
        let (ids, mask) = tok.encode_with_mask("cat cat", 5).unwrap();
        assert_eq!(ids, vec![4, 4, 1, 0, 0]);
        assert_eq!(mask, vec![1, 1, 1, 0, 0]);
        assert_eq!(tok.encode("cat cat cat", 3).unwrap(), vec![4, 4, 1]);
        assert!(tok.encode("cat", 1).is_err());
    }

    #[test]
    fn malformed_models_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spiece.model");
        let good = model(&PIECES, 1, None);
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            T5Tokenizer::from_spiece(&path, 0),
            Err(Error::Weights(_))
        ));
        std::fs::write(&path, [0xFFu8; 12]).unwrap();
        assert!(matches!(
            T5Tokenizer::from_spiece(&path, 0),
            Err(Error::Weights(_))
        ));
        std::fs::write(&path, model(&PIECES, 2, None)).unwrap();
        assert!(matches!(
            T5Tokenizer::from_spiece(&path, 0),
            Err(Error::Unsupported(_))
        ));
        std::fs::write(&path, model(&PIECES[..2], 1, None)).unwrap();
        assert!(matches!(
            T5Tokenizer::from_spiece(&path, 0),
            Err(Error::Weights(_))
        ));
        std::fs::write(&path, model(&PIECES, 1, Some(&[1, 2, 3]))).unwrap();
        assert!(matches!(
            T5Tokenizer::from_spiece(&path, 0),
            Err(Error::Weights(_))
        ));
        assert!(matches!(
            T5Tokenizer::from_spiece(&tmp.path().join("absent.model"), 0),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            T5Tokenizer::from_folder(tmp.path().join("none")),
            Err(Error::Io { .. })
        ));
    }
}
