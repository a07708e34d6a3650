"""How much each input channel of each MatMul matters, for the int4 block fit.

A 4-bit block's error does not cost the same on every weight: it is multiplied by the activation
that weight meets, and a few channels of a transformer's activations are far larger than the rest.
The fit (`quantize.py`) therefore weighs each weight's squared error by the mean square of its
input channel, measured here on text the fp32 model writes itself: a few sequences sampled from the
BOS token with a fixed seed, so that no corpus is needed and the text the benchmark scores is not
the text the weights were fitted on (the approach llama.cpp's importance matrix takes, with the
model's own text instead of a corpus).
"""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from decode import Decoder

SEQUENCES = 4
TOKENS = 512
SEED = 0


def sample(model_dir, sequences=SEQUENCES, tokens=TOKENS, seed=SEED):
    """`sequences` texts of `tokens` tokens each after BOS, sampled at temperature 1: ids
    [sequences, tokens + 1]."""
    dec = Decoder(model_dir, threads=0)
    rng = np.random.default_rng(seed)
    ids = np.full((sequences, 1), dec.meta["bos_token_id"], np.int64)
    past, current = dec.empty_past(sequences), ids
    for step in range(tokens):
        mask = np.ones((sequences, step + 1), np.int64)
        logits, past = dec.step(current, mask, past)
        logits = logits[:, -1, :].astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        current = np.array([[rng.choice(len(row), p=row)] for row in p], np.int64)
        ids = np.concatenate([ids, current], axis=1)
    return ids


def input_importance(model_dir, ids):
    """For each MatMul with a constant weight in `model_dir`'s model.onnx, keyed by its input's
    name: the mean square of each input channel over every position of `ids` ([K] float64)."""
    model_dir = Path(model_dir)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    # Beside model.onnx, so that its weights are read from the same model.onnx.data.
    probe = model_dir / "calibration-probe.onnx"
    onnx.save_model(model, str(probe))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()
    meta = json.loads((model_dir / "meridian-model.json").read_text())
    empty = np.zeros((1, meta["num_kv_heads"], 0, meta["head_dim"]), np.float32)
    past = {i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    sums = {name: 0.0 for name in names}
    for row in ids:  # one sequence a run bounds the activations held at once
        feeds = {"input_ids": row[None], "attention_mask": np.ones((1, len(row)), np.int64)}
        feeds.update(past)
        for name, x in zip(names, session.run(names, feeds)):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums[name] + (x * x).sum(axis=0)
    positions = ids.size
    return {name: total / positions for name, total in sums.items()}

