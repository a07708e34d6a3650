"""Checks run on freshly converted models; each raises AssertionError (the set-up then fails)."""
import numpy as np

from decode import Decoder, render_chat, right_padded

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy, and say in a few words why each one matters.",
]


def _chat_ids(tok, template, text):
    prompt = render_chat(template, [{"role": "user", "content": text}])
    return tok.encode(prompt, add_special_tokens=False).ids


def decoder(model_dir, tok, template, exact, n_tokens=24, log=print):
    """exact=True (fp32): KV-cache vs no-cache and batched vs alone must give identical greedy tokens."""
    dec = Decoder(model_dir, threads=1)
    prompts = [_chat_ids(tok, template, t) for t in CHAT_PROMPTS]
    if len(set(map(len, prompts))) < 2:
        raise AssertionError("test prompts should differ in length (to exercise padding)")
    answers = []
    for text, ids in zip(CHAT_PROMPTS, prompts):
        cached = dec.greedy([ids], n_tokens, use_cache=True, stop_at_eos=False)[0]
        shown = cached[:next((i for i, t in enumerate(cached) if t in dec.eos), len(cached))]
        answer = tok.decode(shown, skip_special_tokens=True)
        answers.append(answer)
        log(f"    Q: {text}\n    A: {answer!r}")
        if exact:
            uncached = dec.greedy([ids], n_tokens, use_cache=False, stop_at_eos=False)[0]
            if cached != uncached:
                raise AssertionError(f"KV cache changes greedy tokens:\n  cached   {cached}\n  uncached {uncached}")
    if exact:
        alone = [dec.greedy([p], n_tokens, stop_at_eos=False)[0] for p in prompts]
        batched = dec.greedy(prompts, n_tokens, stop_at_eos=False)
        if batched != alone:
            raise AssertionError(f"right-padded batch differs from single runs:\n  batch {batched}\n  alone {alone}")
        log(f"    ok: {n_tokens} greedy tokens identical with/without KV cache and in a right-padded batch of 2 "
            f"(prompt lengths {[len(p) for p in prompts]})")
    if "paris" not in answers[0].lower():
        raise AssertionError(f"expected 'Paris' in the answer to {CHAT_PROMPTS[0]!r}, got {answers[0]!r}")
    # a padded batch must give finite logits, and finite K/V at every row's own positions (what
    # lies beyond them is never read)
    ids, mask = right_padded(prompts)
    logits, present = dec.step(ids, mask, dec.empty_past(len(prompts)))
    own = [v[b, :, :len(p)] for v in present.values() for b, p in enumerate(prompts)]
    if not np.isfinite(logits).all() or not all(np.isfinite(v).all() for v in own):
        raise AssertionError("non-finite values in a right-padded batch")
    return answers


def golden(model_dir, tok, template, messages, max_tokens=32):
    dec = Decoder(model_dir, threads=1)
    prompt = render_chat(template, messages)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    out = dec.greedy([ids], max_tokens, use_cache=True)[0]
    nocache = dec.greedy([ids], max_tokens, use_cache=False)[0]
    if out != nocache:
        raise AssertionError(f"golden: KV cache changes greedy tokens {out} vs {nocache}")
    finish = "stop" if out and out[-1] in dec.eos else "length"
    text_ids = out[:-1] if finish == "stop" else out
    return {
        "model": "smollm2-135m-instruct/fp32",
        "messages": messages,
        "prompt": prompt,
        "prompt_ids": ids,
        "max_tokens": max_tokens,
        "completion_ids": out,
        "completion": tok.decode(text_ids, skip_special_tokens=False),
        "finish_reason": finish,
    }


def minilm(model_dir, weights, cfg, tokenizer_path, log=print):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import minilm as m

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sents = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    enc = tok.encode_batch(sents)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    types = np.array([e.type_ids for e in enc], np.int64)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    out = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
    ref = m.reference(weights, cfg, ids, mask, types)
    mm = mask[..., None]
    diff = float(np.abs((out - ref) * mm).max())
    if not diff < 1e-4:
        raise AssertionError(f"MiniLM ONNX vs numpy reference: max abs diff {diff}")
    e = (out * mm).sum(1) / mm.sum(1)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim, dis = float(e[0] @ e[1]), float(e[0] @ e[2])
    log(f"    max |onnx - numpy| over real tokens: {diff:.2e} (padded batch of 3)")
    log(f"    cos(food, bread) = {sim:.4f}; cos(food, stock market) = {dis:.4f}")
    if not (sim > 0.5 and sim - dis > 0.3):
        raise AssertionError("MiniLM embeddings fail the semantic sanity check")
