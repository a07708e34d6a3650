"""Converts a llama-architecture GGUF into an fp32 ONNX "decoder with past" graph.

Interface (optimum / HF): inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value;
outputs logits, present.{i}.key/value. Weights are dequantised with gguf.quants.dequantize.

The graph is written with ONNX Runtime's fused operators (com.microsoft GroupQueryAttention,
RotaryEmbedding, SkipSimplifiedLayerNormalization; SimplifiedLayerNormalization), Q/K/V as one
MatMul and gate/up as one: about 9 nodes a layer instead of about 45. At batch 1 each node costs
the runtime a few microseconds whatever its size, so the small ones cost as much as the MatMuls.
"""
import numpy as np
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
    return g.op("SimplifiedLayerNormalization", [x, weight_name], "normed", axis=-1, epsilon=eps)


def add_rms_norm(g, x, residual, weight_name, eps):
    """RMSNorm(x + residual) and x + residual, in one node."""
    outs = [g.name("normed"), g.name("mean"), g.name("inv_std"), g.name("resid")]
    g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, residual, weight_name], outs,
                                    name=g.name("SkipSimplifiedLayerNormalization"), domain="com.microsoft",
                                    epsilon=eps))
    return outs[0], outs[3]


def build(gguf_path):
    reader, fields = read_gguf(gguf_path)
    cfg = config_from(fields)
    L, H, NH, NKV, D, F = cfg["num_layers"], cfg["hidden"], cfg["n_head"], cfg["n_kv"], cfg["head_dim"], cfg["ffn"]
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

    # RoPE tables for the HF rotate_half layout (RotaryEmbedding interleaved=0): cos/sin of each
    # position's D/2 frequencies.
    inv = 1.0 / (cfg["theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D))
    freqs = np.outer(np.arange(cfg["ctx"], dtype=np.float64), inv)
    g.init("rope.cos", np.cos(freqs).astype(np.float32))  # [ctx, D/2]
    g.init("rope.sin", np.sin(freqs).astype(np.float32))

    # ---- shared: the attention bias [B,1,S,T] (causal within total length + padding), and what
    # GroupQueryAttention takes instead of a mask: every row holds T positions (left padding is
    # masked by the bias), so seqlens_k is T-1 for each row.
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
    batch = g.op("Gather", [ids_shape, g.const_i64([0])], "B", axis=0)  # [1]
    total_len = g.op("Cast", [T], "total_len", to=TensorProto.INT32)
    last = g.op("Cast", [g.op("Sub", [T, one])], "last", to=TensorProto.INT32)
    seqlens_k = g.op("Expand", [last, batch], "seqlens_k")  # [B]

    # RoPE by position_ids, outside the attention node: GroupQueryAttention's own rotary takes only
    # the first position of a prompt, which a left-padded row does not start at.
    def rope(x, heads):
        out = g.name("roped")
        g.nodes.append(helper.make_node("RotaryEmbedding", [x, "position_ids", "rope.cos", "rope.sin"], [out],
                                        name=g.name("RotaryEmbedding"), domain="com.microsoft", interleaved=0,
                                        num_heads=heads))
        return out

    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embeds", axis=0)
    for i in range(L):
        p = f"model.layers.{i}"
        g.init(f"{p}.input_layernorm.weight", W(f"blk.{i}.attn_norm.weight"))
        g.init(f"{p}.post_attention_layernorm.weight", W(f"blk.{i}.ffn_norm.weight"))
        wq = unpermute_rope(W(f"blk.{i}.attn_q.weight"), NH)
        wk = unpermute_rope(W(f"blk.{i}.attn_k.weight"), NKV)
        # Q, K and V as one MatMul, gate and up as one: fewer, larger matrix products.
        wv = W(f"blk.{i}.attn_v.weight")
        g.init(f"{p}.self_attn.qkv_proj.weight", np.ascontiguousarray(np.concatenate([wq, wk, wv]).T))
        g.init(f"{p}.self_attn.o_proj.weight", np.ascontiguousarray(W(f"blk.{i}.attn_output.weight").T))
        gate_up = np.concatenate([W(f"blk.{i}.ffn_gate.weight"), W(f"blk.{i}.ffn_up.weight")])
        g.init(f"{p}.mlp.gate_up_proj.weight", np.ascontiguousarray(gate_up.T))
        g.init(f"{p}.mlp.down_proj.weight", np.ascontiguousarray(W(f"blk.{i}.ffn_down.weight").T))

        # The residual stream's additions ride in the norms: `down` (the previous layer's output)
        # is added by this layer's first norm.
        if i == 0:
            h = rms_norm(g, x, f"{p}.input_layernorm.weight", cfg["eps"])
        else:
            h, x = add_rms_norm(g, x, down, f"{p}.input_layernorm.weight", cfg["eps"])
        qkv = g.op("MatMul", [h, f"{p}.self_attn.qkv_proj.weight"], "qkv")
        q, k, v = g.op("Split", [qkv, g.const_i64([NH * D, NKV * D, NKV * D])], "qkv_split", n_out=3, axis=-1)
        q, k = rope(q, NH), rope(k, NKV)
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        ctx = g.name("ctx")  # [B,S,H]; present = past followed by the new K/V, as Concat would
        g.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             "", "", "", bias],
            [ctx, pk, pv], name=f"attention_{i}", domain="com.microsoft", num_heads=NH, kv_num_heads=NKV))
        attn = g.op("MatMul", [ctx, f"{p}.self_attn.o_proj.weight"], "attn_out")

        h, x = add_rms_norm(g, x, attn, f"{p}.post_attention_layernorm.weight", cfg["eps"])
        gate_up = g.op("MatMul", [h, f"{p}.mlp.gate_up_proj.weight"], "gate_up")
        gate, up = g.op("Split", [gate_up, g.const_i64([F, F])], "gate_up_split", n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu"), up], "act")
        down = g.op("MatMul", [act, f"{p}.mlp.down_proj.weight"], "down")

    # Only the last position's logits are ever read (the next token), so only it goes through
    # the last norm and lm_head: a fifth of the weights, which a prompt would otherwise multiply
    # at every position (and [S, vocab] floats to return: 237 MB for a 1,200-token prompt).
    last_pos = g.const_i64([-1])
    x = g.op("Slice", [x, last_pos, g.const_i64([np.iinfo(np.int64).max]), g.const_i64([1])], "x_last")
    down = g.op("Slice", [down, last_pos, g.const_i64([np.iinfo(np.int64).max]), g.const_i64([1])], "down_last")
    g.init("model.norm.weight", W("output_norm.weight"))
    h, _ = add_rms_norm(g, x, down, "model.norm.weight", cfg["eps"])
    g.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="lm_head"))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, cfg["vocab"]])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", NKV, "past_sequence_length", D]))
            outs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", NKV, "total_sequence_length", D]))

    graph = helper.make_graph(g.nodes, "meridian-llama-decoder", inputs, outs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="meridian-convert")
    model.ir_version = 8
    return model, cfg, fields

