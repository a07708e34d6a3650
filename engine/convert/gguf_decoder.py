"""Converts a llama-architecture GGUF into an fp32 ONNX "decoder with past" graph.

Interface (optimum / HF): inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value;
outputs logits, present.{i}.key/value. Weights are dequantised with gguf.quants.dequantize.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MASK_MIN = -1.0e9  # finite: a fully masked (padding) row softmaxes to uniform, not NaN


def read_gguf(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {}
    for k, f in r.fields.items():
        fields[k] = f.contents()
    return r, fields


def dequant(t):
    from gguf.quants import dequantize

    # numpy shape = reversed ggml ne: a linear layer's weight comes out [out_features, in_features]
    a = dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape.tolist())]), dtype=np.float32)


def unpermute_rope(w, n_head):
    """Undoes llama.cpp convert_hf_to_gguf's permute() of Q/K rows (back to HF rotate_half layout)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def config_from(fields):
    a = fields["general.architecture"]
    if a != "llama":
        raise ValueError(f"only llama GGUFs are handled, got {a}")
    n_head = int(fields[f"{a}.attention.head_count"])
    hidden = int(fields[f"{a}.embedding_length"])
    cfg = {
        "num_layers": int(fields[f"{a}.block_count"]),
        "hidden": hidden,
        "n_head": n_head,
        "n_kv": int(fields[f"{a}.attention.head_count_kv"]),
        "head_dim": hidden // n_head,
        "ffn": int(fields[f"{a}.feed_forward_length"]),
        "eps": float(fields[f"{a}.attention.layer_norm_rms_epsilon"]),
        "theta": float(fields.get(f"{a}.rope.freq_base", 10000.0)),
        "ctx": int(fields[f"{a}.context_length"]),
        "vocab": int(fields.get(f"{a}.vocab_size", len(fields["tokenizer.ggml.tokens"]))),
    }
    rd = fields.get(f"{a}.rope.dimension_count")
    if rd is not None and int(rd) != cfg["head_dim"]:
        raise ValueError("partial rotary embeddings are not handled")
    return cfg


class G:
    """Tiny graph builder."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def const_i64(self, vals, base="c"):
        return self.init(self.name(base), np.array(vals, dtype=np.int64))

    def op(self, op_type, inputs, base=None, n_out=1, **attrs):
        base = base or op_type.lower()
        outs = [self.name(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs


def rms_norm(g, x, weight_name, eps):
    sq = g.op("Mul", [x, x], "sq")
    mean = g.op("ReduceMean", [sq], "ms", axes=[-1], keepdims=1)
    eps_c = g.init(g.name("eps"), np.array(eps, dtype=np.float32))
    rs = g.op("Sqrt", [g.op("Add", [mean, eps_c])], "rms")
    return g.op("Mul", [g.op("Div", [x, rs]), weight_name], "normed")


def build(gguf_path):
    reader, fields = read_gguf(gguf_path)
    cfg = config_from(fields)
    L, H, NH, NKV, D, F = cfg["num_layers"], cfg["hidden"], cfg["n_head"], cfg["n_kv"], cfg["head_dim"], cfg["ffn"]
    rep = NH // NKV
    tensors = {t.name: t for t in reader.tensors}

    def W(name):
        return dequant(tensors[name])

    g = G()
    emb = W("token_embd.weight")  # [vocab, hidden]
    assert emb.shape == (cfg["vocab"], H), emb.shape
    g.init("model.embed_tokens.weight", emb)
    if "output.weight" in tensors:
        lm = W("output.weight")
    else:
        lm = emb  # tied embeddings
    g.init("lm_head.weight", np.ascontiguousarray(lm.T))  # [hidden, vocab], a plain MatMul weight

    # RoPE tables (HF rotate_half layout): emb = cat(freqs, freqs)
    inv = 1.0 / (cfg["theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D))
    freqs = np.outer(np.arange(cfg["ctx"], dtype=np.float64), inv)
    embf = np.concatenate([freqs, freqs], axis=-1)
    g.init("rope.cos", np.cos(embf).astype(np.float32))
    g.init("rope.sin", np.sin(embf).astype(np.float32))

    # ---- shared: mask [B,1,rep*S,T] (causal within total length + padding), cos/sin [B,1,S,D]
    ids_shape = g.op("Shape", ["input_ids"], "ids_shape")
    S = g.op("Gather", [ids_shape, g.const_i64(1)], "S", axis=0)
    T = g.op("Gather", [g.op("Shape", ["attention_mask"], "am_shape"), g.const_i64(1)], "T", axis=0)
    past = g.op("Sub", [T, S], "past")
    zero, one = g.const_i64(0), g.const_i64(1)
    q_pos = g.op("Range", [past, T, one], "q_pos")             # [S]
    k_pos = g.op("Range", [zero, T, one], "k_pos")             # [T]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const_i64([0])]),
                                  g.op("Unsqueeze", [q_pos, g.const_i64([1])])], "causal")  # [S,T]
    pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const_i64([1])])], "pad",
               to=TensorProto.BOOL)                            # [B,1,T]
    allowed = g.op("And", [causal, pad], "allowed")            # [B,S,T]
    allowed = g.op("Unsqueeze", [allowed, g.const_i64([1])])  # [B,1,S,T]
    bias = g.op("Where", [allowed, g.init("mask.zero", np.array(0.0, np.float32)),
                          g.init("mask.min", np.array(MASK_MIN, np.float32))], "mask_bias")
    bias = g.op("Tile", [bias, g.const_i64([1, 1, rep, 1])], "mask_bias_g")  # [B,1,rep*S,T]

    cos = g.op("Unsqueeze", [g.op("Gather", ["rope.cos", "position_ids"], axis=0), g.const_i64([1])], "cos")
    sin = g.op("Unsqueeze", [g.op("Gather", ["rope.sin", "position_ids"], axis=0), g.const_i64([1])], "sin")
    half = g.const_i64([D // 2, D // 2])

    def rope(x):
        x1, x2 = g.op("Split", [x, half], "half", n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], "rot", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])], "roped")

    shp_heads_q = g.const_i64([0, 0, NH, D])
    shp_heads_kv = g.const_i64([0, 0, NKV, D])
    shp_grouped = g.const_i64([0, NKV, -1, D])   # [B,NH,S,D] -> [B,NKV,rep*S,D]
    shp_ungroup = g.const_i64([0, NH, -1, D])
    shp_merge = g.const_i64([0, 0, H])
    scale = g.init("attn.scale", np.array(1.0 / np.sqrt(D), np.float32))

    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embeds", axis=0)
    outputs = []
    for i in range(L):
        p = f"model.layers.{i}"
        g.init(f"{p}.input_layernorm.weight", W(f"blk.{i}.attn_norm.weight"))
        g.init(f"{p}.post_attention_layernorm.weight", W(f"blk.{i}.ffn_norm.weight"))
        wq = unpermute_rope(W(f"blk.{i}.attn_q.weight"), NH)
        wk = unpermute_rope(W(f"blk.{i}.attn_k.weight"), NKV)
        for nm, w in (("q_proj", wq), ("k_proj", wk), ("v_proj", W(f"blk.{i}.attn_v.weight")),
                      ("o_proj", W(f"blk.{i}.attn_output.weight"))):
            g.init(f"{p}.self_attn.{nm}.weight", np.ascontiguousarray(w.T))
        for nm, gn in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            g.init(f"{p}.mlp.{nm}.weight", np.ascontiguousarray(W(f"blk.{i}.{gn}.weight").T))

        h = rms_norm(g, x, f"{p}.input_layernorm.weight", cfg["eps"])
        q = g.op("MatMul", [h, f"{p}.self_attn.q_proj.weight"], "q")
        k = g.op("MatMul", [h, f"{p}.self_attn.k_proj.weight"], "k")
        v = g.op("MatMul", [h, f"{p}.self_attn.v_proj.weight"], "v")
        q = g.op("Transpose", [g.op("Reshape", [q, shp_heads_q])], "qt", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, shp_heads_kv])], "kt", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, shp_heads_kv])], "vt", perm=[0, 2, 1, 3])
        q, k = rope(q), rope(k)
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [pk], name=f"concat_k_{i}", axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [pv], name=f"concat_v_{i}", axis=2))
        outputs += [pk, pv]
        qg = g.op("Reshape", [g.op("Mul", [q, scale]), shp_grouped], "qg")        # [B,NKV,rep*S,D]
        scores = g.op("MatMul", [qg, g.op("Transpose", [pk], "kT", perm=[0, 1, 3, 2])], "scores")
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], "probs", axis=-1)
        ctx = g.op("MatMul", [probs, pv], "ctx")                                    # [B,NKV,rep*S,D]
        ctx = g.op("Transpose", [g.op("Reshape", [ctx, shp_ungroup])], "ctx_t", perm=[0, 2, 1, 3])
        attn = g.op("MatMul", [g.op("Reshape", [ctx, shp_merge]), f"{p}.self_attn.o_proj.weight"], "attn_out")
        x = g.op("Add", [x, attn], "resid")

        h = rms_norm(g, x, f"{p}.post_attention_layernorm.weight", cfg["eps"])
        gate = g.op("MatMul", [h, f"{p}.mlp.gate_proj.weight"], "gate")
        up = g.op("MatMul", [h, f"{p}.mlp.up_proj.weight"], "up")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu"), up], "act")
        x = g.op("Add", [x, g.op("MatMul", [act, f"{p}.mlp.down_proj.weight"], "down")], "resid")

    g.init("model.norm.weight", W("output_norm.weight"))
    h = rms_norm(g, x, "model.norm.weight", cfg["eps"])
    g.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="lm_head"))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg["vocab"]])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", NKV, "past_sequence_length", D]))
            outs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", NKV, "total_sequence_length", D]))

    graph = helper.make_graph(g.nodes, "meridian-llama-decoder", inputs, outs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="meridian-convert")
    model.ir_version = 8
    return model, cfg, fields


def save(model, path):
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
