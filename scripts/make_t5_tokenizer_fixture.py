#!/usr/bin/env python3
"""Tiny T5 (Unigram / SentencePiece) tokenizer fixture for diffusion-models' T5Tokenizer.

Writes diffusion-models/tests/fixtures/t5-tokenizer-tiny/:
  tokenizer.json, tokenizer_config.json  transformers 5.24's T5Tokenizer, built the way
                                          transformers converts a spiece.model
                                          (T5Converter.convert_from_spm: the pieces, then
                                          <extra_id_{N-1}> ... <extra_id_0>)
  spiece.model                            the same pieces as a SentencePiece ModelProto
                                          (Unigram, no precompiled charsmap), hand-encoded
                                          (neither sentencepiece nor protobuf is needed)
  prompts.json                            ids from transformers for a set of prompts: padded
                                          and truncated to 16 (as diffusers calls it with
                                          max_sequence_length) and unpadded

usage: python3 scripts/make_t5_tokenizer_fixture.py
"""

import json
import os
import shutil
import struct

import transformers
from transformers import T5Tokenizer
from transformers.convert_slow_tokenizer import T5Converter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "diffusion-models", "tests", "fixtures", "t5-tokenizer-tiny")
EXTRA_IDS = 5
MAX_LENGTH = 16

WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "astronaut", "riding", "horse", "on", "mars",
    "in", "and", "with", "painting", "city", "at", "night", "red", "blue", "high", "quality",
]
SUFFIXES = ["s", "ing", "ed", "er", "est", "ly"]
PROMPTS = [
    "",
    "a photo of a cat",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of The Cats",
    "painting of the city at night, high quality!",
    "  leading   and\ttrailing\nwhitespace  ",
    "café naïve 東京 😀",
    "numbers 123 and punctuation: a-b, c.d",
    "special <extra_id_0> and </s> and <pad> in text",
    "red blue " * 12,
    "cats dogs horses riding painted painting",
]


def pieces():
    """(piece, score, type) in id order; type 1 normal, 2 unknown, 3 control."""
    out = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2), ("\u2581", -2.0, 1)]
    seen = {p for p, _, _ in out}

    def add(piece, score):
        if piece not in seen:
            seen.add(piece)
            out.append((piece, score, 1))

    for i, w in enumerate(WORDS):
        add("\u2581" + w, -3.0 - 0.1 * i)
    for i, s in enumerate(SUFFIXES):
        add(s, -4.0 - 0.1 * i)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add("\u2581" + c, -8.0)
        add(c, -9.0)
    for c in "0123456789,.!:-'?":
        add(c, -9.5)
    return out


# -- minimal protobuf writer ------------------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire):
    return varint((field << 3) | wire)


def length_delimited(field, payload):
    return key(field, 2) + varint(len(payload)) + payload


def spiece_model(entries):
    body = b""
    for piece, score, kind in entries:
        sp = length_delimited(1, piece.encode("utf-8"))
        sp += key(2, 5) + struct.pack("<f", score)
        sp += key(3, 0) + varint(kind)
        body += length_delimited(1, sp)
    trainer = key(3, 0) + varint(1)  # model_type UNIGRAM
    trainer += key(40, 0) + varint(2)  # unk_id
    body += length_delimited(2, trainer)
    normalizer = length_delimited(1, b"identity")
    normalizer += key(3, 0) + varint(1)  # add_dummy_prefix
    normalizer += key(4, 0) + varint(1)  # remove_extra_whitespaces
    normalizer += key(5, 0) + varint(1)  # escape_whitespaces
    body += length_delimited(3, normalizer)
    return body


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    entries = pieces()
    vocab = [(p, s) for p, s, _ in entries]
    kwargs = T5Converter.convert_from_spm(vocab=vocab, extra_ids=EXTRA_IDS)
    tok = T5Tokenizer(**kwargs)
    tok.save_pretrained(OUT)
    with open(os.path.join(OUT, "spiece.model"), "wb") as f:
        f.write(spiece_model(entries))

    records = []
    for text in PROMPTS:
        padded = tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        records.append(
            {
                "text": text,
                "ids_padded": padded.input_ids,
                "attention_mask": padded.attention_mask,
                "ids_unpadded": tok(text).input_ids,
            }
        )
    doc = {
        "description": "transformers T5Tokenizer ids. ids_padded: padding='max_length', "
        f"max_length={MAX_LENGTH}, truncation=True (diffusers' call); ids_unpadded: no padding, "
        "no truncation.",
        "transformers": transformers.__version__,
        "max_length": MAX_LENGTH,
        "extra_ids": EXTRA_IDS,
        "vocab_size": len(tok),
        "pad_id": tok.pad_token_id,
        "eos_id": tok.eos_token_id,
        "unk_id": tok.unk_token_id,
        "prompts": records,
    }
    with open(os.path.join(OUT, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    print(f"wrote {OUT}: {len(entries)} pieces + {EXTRA_IDS} extra ids, {len(records)} prompts")


if __name__ == "__main__":
    main()
