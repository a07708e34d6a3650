"""all-MiniLM-L6-v2 (BERT) from safetensors to an ONNX graph returning last_hidden_state, plus a numpy reference."""
import json


import numpy as np
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def load(safetensors_path, config_path):
    from safetensors.numpy import load_file

    w = load_file(str(safetensors_path))
    cfg = json.loads(open(config_path).read())
    return {k: v for k, v in w.items() if v.dtype == np.float32}, cfg


def build(w, cfg):
    H, NH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D, eps = H // NH, float(cfg["layer_norm_eps"])
    nodes, inits, cnt = [], [], [0]

    def nm(b):
        cnt[0] += 1
        return f"{b}_{cnt[0]}"

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(t, ins, base=None, **attrs):
        out = nm(base or t.lower())
        nodes.append(helper.make_node(t, ins, [out], name=nm(t), **attrs))
        return out

    def c64(v):
        return init(nm("c"), np.array(v, dtype=np.int64))

    def linear(x, p):
        return op("Add", [op("MatMul", [x, init(p + ".weight.T", w[p + ".weight"].T)]), init(p + ".bias", w[p + ".bias"])])

    def ln(x, p):
        return op("LayerNormalization", [x, init(p + ".weight", w[p + ".weight"]), init(p + ".bias", w[p + ".bias"])],
                  "ln", axis=-1, epsilon=eps)

    # position embeddings 0..S-1 as a Slice of the table (Gather over a Range trips ORT's GatherToSlice fusion)
    S1 = op("Slice", [op("Shape", ["input_ids"]), c64([1]), c64([2])], "S1")
    e = op("Add", [op("Gather", [init("word", w["embeddings.word_embeddings.weight"]), "input_ids"], axis=0),
                   op("Gather", [init("type", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"], axis=0)])
    e = op("Add", [e, op("Slice", [init("position", w["embeddings.position_embeddings.weight"]), c64([0]), S1, c64([0])])])
    x = ln(e, "embeddings.LayerNorm")

    # additive mask [B,1,1,S]: 0 for tokens, -1e9 for padding
    m = op("Cast", [op("Unsqueeze", ["attention_mask", c64([1, 2])])], to=TensorProto.FLOAT)
    bias = op("Mul", [op("Sub", [init("one", np.array(1.0, np.float32)), m]), init("neg", np.array(-1e9, np.float32))])
    heads = c64([0, 0, NH, D])
    merge = c64([0, 0, H])
    scale = init("scale", np.array(1.0 / np.sqrt(D), np.float32))
    for i in range(L):
        p = f"encoder.layer.{i}"
        q = op("Transpose", [op("Reshape", [linear(x, p + ".attention.self.query"), heads])], perm=[0, 2, 1, 3])
        k = op("Transpose", [op("Reshape", [linear(x, p + ".attention.self.key"), heads])], perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [linear(x, p + ".attention.self.value"), heads])], perm=[0, 2, 1, 3])
        s = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), bias])
        ctx = op("MatMul", [op("Softmax", [s], axis=-1), v])
        ctx = op("Reshape", [op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        x = ln(op("Add", [linear(ctx, p + ".attention.output.dense"), x]), p + ".attention.output.LayerNorm")
        h = linear(x, p + ".intermediate.dense")
        gelu = op("Mul", [op("Mul", [h, init(nm("half"), np.array(0.5, np.float32))]),
                          op("Add", [op("Erf", [op("Div", [h, init(nm("sqrt2"), np.array(np.sqrt(2.0), np.float32))])]),
                                     init(nm("one"), np.array(1.0, np.float32))])])
        y = op("Add", [linear(gelu, p + ".output.dense"), x])
        x = ln(y, p + ".output.LayerNorm")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="out"))

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", H])]
    g = helper.make_graph(nodes, "meridian-bert-encoder", ins, outs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meridian-convert")
    model.ir_version = 8
    return model


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def reference(w, cfg, ids, mask, types):
    """Straightforward float64 numpy forward pass of the same weights."""
    from scipy_free_erf import erf_vec

    H, NH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D, eps = H // NH, float(cfg["layer_norm_eps"])
    W = {k: v.astype(np.float64) for k, v in w.items()}
    B, S = ids.shape
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.token_type_embeddings.weight"][types] \
        + W["embeddings.position_embeddings.weight"][np.arange(S)][None]
    x = _ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * -1e9
    lin = lambda t, p: t @ W[p + ".weight"].T + W[p + ".bias"]  # noqa: E731
    for i in range(L):
        p = f"encoder.layer.{i}"
        sh = lambda t: t.reshape(B, S, NH, D).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (sh(lin(x, p + f".attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(B, S, H)
        x = _ln(lin(a, p + ".attention.output.dense") + x, W[p + ".attention.output.LayerNorm.weight"],
                W[p + ".attention.output.LayerNorm.bias"], eps)
        h = lin(x, p + ".intermediate.dense")
        h = 0.5 * h * (1.0 + erf_vec(h / np.sqrt(2.0)))
        x = _ln(lin(h, p + ".output.dense") + x, W[p + ".output.LayerNorm.weight"], W[p + ".output.LayerNorm.bias"], eps)
    return x

