"""Rebuilds a Hugging Face tokenizer.json (byte-level BPE) from a GGUF's tokenizer.ggml.* metadata."""
import json

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES = {2, 3, 4}


def build(fields):
    """fields: dict of GGUF metadata (already decoded to Python values). Returns the tokenizer dict."""
    model = fields["tokenizer.ggml.model"]
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) tokenizers are handled, got {model!r}")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    merges = fields["tokenizer.ggml.merges"]
    pre = fields.get("tokenizer.ggml.pre", "default")

    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in _SPECIAL_TYPES:
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True})

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits these models' digits one by one before the GPT-2 regex
        # (its regex list starts with "\p{N}"); the vocabulary has no multi-digit tokens.
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"unhandled GGUF pre-tokenizer {pre!r}")

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def verify(path, im_start="<|im_start|>"):
    """Checks round-trips and special-token handling with the `tokenizers` package; raises on failure."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    for text in ["Hello, world! 123 café", "  leading spaces\tand\ttabs\n\nnewlines ",
                 "naïve 東京 🙂 x=1.5e-3"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            raise AssertionError(f"tokenizer round-trip failed: {text!r} -> {ids} -> {back!r}")
    ids = tok.encode(im_start, add_special_tokens=False).ids
    if len(ids) != 1 or tok.id_to_token(ids[0]) != im_start:
        raise AssertionError(f"{im_start} should encode to one id, got {ids}")
    digits = tok.encode("123", add_special_tokens=False).ids
    if len(digits) != 3:
        raise AssertionError(f"digits should split one by one, got {digits}")
    return tok


def dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
