#!/usr/bin/env python3
"""Baseline: a plain onnxruntime greedy loop over a Meridian decoder directory (batch 1, KV cache fed back).

  .meridian/venv/bin/python engine/bench/ort_loop.py --model .meridian/models/smollm2-135m-instruct/int4 \
      --messages-json '[{"role":"user","content":"Tell me a story."}]' --max-tokens 128 --threads 1

Prints one JSON line: prefill_ms (the prompt's forward pass), ttft_ms (prompt -> first token id),
decode_tokens_per_s (tokens after the first / time from the first token to the last), tokens (ids).
Session options are what a reasonable user would set: graph optimisation ALL, the given intra-op threads
(inter-op 1), intra-op spinning on or off. Generation stops at an eos id unless --ignore-eos.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory (model.onnx, meridian-model.json, tokenizer.json)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    src.add_argument("--messages-json", help="chat messages (JSON list), rendered with the model's chat template")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--spinning", choices=["on", "off"], default="on")
    ap.add_argument("--warmup", type=int, default=1, help="untimed full generations before the timed one")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    a = ap.parse_args()

    d = Path(a.model)
    meta = json.loads((d / "meridian-model.json").read_text())
    if a.prompt_ids:
        prompt = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
    else:
        import jinja2
        from tokenizers import Tokenizer

        text = jinja2.Environment().from_string(meta["chat_template"]).render(
            messages=json.loads(a.messages_json), add_generation_prompt=True)
        prompt = Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    eos = set() if a.ignore_eos else set(meta["eos_token_ids"])

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if a.spinning == "on" else "0")
    sess = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    past_names = [n.replace("present.", "past_key_values.") for n in out_names[1:]]
    L, kv, hd = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]

    def generate():
        empty = np.zeros((1, kv, 0, hd), np.float32)
        feeds = {f"past_key_values.{i}.{k}": empty for i in range(L) for k in ("key", "value")}
        ids = np.array([prompt], np.int64)
        n = len(prompt)
        tokens, stamps = [], []
        t0 = time.perf_counter()
        prefill_ms = None
        while len(tokens) < a.max_tokens:
            feeds["input_ids"] = ids
            feeds["attention_mask"] = np.ones((1, n), np.int64)
            outs = sess.run(None, feeds)
            if prefill_ms is None:
                prefill_ms = (time.perf_counter() - t0) * 1e3
            nxt = int(outs[0][0, -1].argmax())
            stamps.append(time.perf_counter())
            tokens.append(nxt)
            if nxt in eos:
                break
            feeds.update(zip(past_names, outs[1:]))
            ids = np.array([[nxt]], np.int64)
            n += 1
        ttft_ms = (stamps[0] - t0) * 1e3
        rate = (len(tokens) - 1) / (stamps[-1] - stamps[0]) if len(tokens) > 1 else None
        return {"prefill_ms": round(prefill_ms, 2), "decode_tokens_per_s": rate and round(rate, 2),
                "tokens": tokens, "ttft_ms": round(ttft_ms, 2), "prompt_tokens": len(prompt),
                "threads": a.threads, "spinning": a.spinning}

    for _ in range(a.warmup):
        generate()
    print(json.dumps(generate()))


if __name__ == "__main__":
    main()
