"""Reference greedy decoding with onnxruntime over a converted decoder directory (used by verify and golden)."""
import json
from pathlib import Path

import numpy as np


def render_chat(template, messages, add_generation_prompt=True):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


class Decoder:
    def __init__(self, model_dir, threads=1):
        import onnxruntime as ort

        self.dir = Path(model_dir)
        self.meta = json.loads((self.dir / "meridian-model.json").read_text())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(self.dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.L = self.meta["num_layers"]
        self.kv = self.meta["num_kv_heads"]
        self.d = self.meta["head_dim"]
        self.eos = set(self.meta["eos_token_ids"])

    def empty_past(self, batch):
        z = np.zeros((batch, self.kv, 0, self.d), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(self.L) for k in ("key", "value")}

    def step(self, ids, mask, past):
        """One run: ids [B, S]; mask [B, T] with row b's ones first, one for each of its positions
        (cached and new); past [B, H, P, D] each, row b's positions first."""
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        out = self.sess.run(None, feeds)
        names = [o.name for o in self.sess.get_outputs()]
        logits = out[0]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        return logits, present

    def greedy(self, prompts, max_tokens, use_cache=True, stop_at_eos=True):
        """prompts: list of id lists (right-padded into one batch when lengths differ). Returns list
        of generated id lists."""
        B = len(prompts)
        seqs = [list(p) for p in prompts]
        gen = [[] for _ in range(B)]
        done = [False] * B
        past = self.empty_past(B)
        for step in range(max_tokens):
            if use_cache and step > 0:
                # Each row's new token; the mask is as wide as the cache plus one.
                ids = np.array([[s[-1]] for s in seqs], np.int64)
                width = next(iter(past.values())).shape[2] + 1
                logits, past = self.step(ids, padded_mask(seqs, width), past)
            else:
                ids, mask = right_padded(seqs)
                logits, present = self.step(ids, mask, self.empty_past(B))
                if use_cache:
                    past = present
            nxt = logits[:, -1, :].argmax(-1)
            for b in range(B):
                if not done[b]:
                    gen[b].append(int(nxt[b]))
                    if stop_at_eos and int(nxt[b]) in self.eos:
                        done[b] = True
                seqs[b].append(int(nxt[b]))
            if all(done):
                break
        return gen


def padded_mask(seqs, width):
    """[B, width]: row b's first len(seqs[b]) columns 1, the rest 0."""
    mask = np.zeros((len(seqs), width), np.int64)
    for b, s in enumerate(seqs):
        mask[b, :len(s)] = 1
    return mask


def right_padded(seqs):
    """input_ids and attention_mask [B, longest] of sequences of different lengths, right-padded."""
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int64)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    return ids, padded_mask(seqs, width)
