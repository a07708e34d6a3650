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

    def step(self, ids, mask, pos, past):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
        out = self.sess.run(None, feeds)
        names = [o.name for o in self.sess.get_outputs()]
        logits = out[0]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        return logits, present

    def greedy(self, prompts, max_tokens, use_cache=True, stop_at_eos=True):
        """prompts: list of id lists (left-padded when lengths differ). Returns list of generated id lists."""
        B = len(prompts)
        n = max(len(p) for p in prompts)
        ids = np.zeros((B, n), np.int64)
        mask = np.zeros((B, n), np.int64)
        for b, p in enumerate(prompts):
            ids[b, n - len(p):] = p
            mask[b, n - len(p):] = 1
        gen = [[] for _ in range(B)]
        done = [False] * B
        past = self.empty_past(B)
        cur_ids, all_ids = ids, ids
        for _ in range(max_tokens):
            if use_cache:
                pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -cur_ids.shape[1]:]
                logits, past = self.step(cur_ids, mask, pos, past)
            else:
                pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
                logits, _ = self.step(all_ids, mask, pos, self.empty_past(B))
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)
            for b in range(B):
                if not done[b]:
                    gen[b].append(int(nxt[b]))
                    if stop_at_eos and int(nxt[b]) in self.eos:
                        done[b] = True
            if all(done):
                break
            cur_ids = nxt[:, None]
            all_ids = np.concatenate([all_ids, cur_ids], axis=1)
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        return gen
