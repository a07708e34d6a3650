"""Converts a llama-architecture GGUF into an fp32 ONNX "decoder with past" graph.

Interface: inputs input_ids, attention_mask, past_key_values.{i}.key/value; outputs logits (each
row's last position), present.{i}.key/value. Rows are right-padded (onnxruntime-genai's layout): a
row's tokens are the first columns of its cache, and attention_mask tells how many (its ones come
first); positions are counted from there, so there is no position_ids input. Weights are dequantised
with gguf.quants.dequantize.

The graph is written with ONNX Runtime's fused operators (com.microsoft GroupQueryAttention with
its own rotary embedding and Q/K/V packed, SkipSimplifiedLayerNormalization;
SimplifiedLayerNormalization), and gate/up as one MatMul: 10 nodes a layer as ONNX Runtime runs it
(it fuses the SiLU) instead of about 45. At batch 1 each node costs the runtime a few microseconds
whatever its size, so the small ones cost as much as the MatMuls.
"""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


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

    # RoPE tables for the HF rotate_half layout (rotary_interleaved=0): cos/sin of each
    # position's D/2 frequencies.
    inv = 1.0 / (cfg["theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D))
    freqs = np.outer(np.arange(cfg["ctx"], dtype=np.float64), inv)
    g.init("rope.cos", np.cos(freqs).astype(np.float32))  # [ctx, D/2]
    g.init("rope.sin", np.sin(freqs).astype(np.float32))

    # ---- shared: what GroupQueryAttention takes instead of a mask. Rows are right-padded: row b's
    # tokens are columns 0..len_b of its cache, so seqlens_k (its total length - 1) is the mask's
    # sum - 1, and the node ignores what lies beyond; total_sequence_length is the mask's width.
    ids_shape = g.op("Shape", ["input_ids"], "ids_shape")
    S = g.op("Gather", [ids_shape, g.const_i64(1)], "S", axis=0)
    T = g.op("Gather", [g.op("Shape", ["attention_mask"], "am_shape"), g.const_i64(1)], "T", axis=0)
    last = g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const_i64([1])], "lens", keepdims=0),
                        g.const_i64(1)], "last")               # [B]: each row's last position
    seqlens_k = g.op("Cast", [last], "seqlens_k", to=TensorProto.INT32)
    total_len = g.op("Cast", [T], "total_len", to=TensorProto.INT32)
    # Where each row's last token lies among this run's S: in a prompt, its last position less the
    # positions before the run (T - S); in a decode step (S = 1) the one column, whatever the row's
    # length (a shorter row's falls below T - S, so the index is clamped at 0).
    here = g.op("Max", [g.op("Sub", [last, g.op("Sub", [T, S])]), g.const_i64(0)], "here")
    here = g.op("Unsqueeze", [here, g.const_i64([1])], "here")  # [B,1], for GatherND

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
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        # Q, K and V packed in one input, rotated by the node itself at each row's positions (from
        # seqlens_k: 0.. in a prompt without past, the row's length in a decode step): one node
        # instead of a Split and two RotaryEmbeddings. present = past followed by the new K/V.
        ctx = g.name("ctx")  # [B,S,H]
        g.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             "rope.cos", "rope.sin"],
            [ctx, pk, pv], name=f"attention_{i}", domain="com.microsoft", num_heads=NH, kv_num_heads=NKV,
            do_rotary=1, rotary_interleaved=0))
        attn = g.op("MatMul", [ctx, f"{p}.self_attn.o_proj.weight"], "attn_out")

        h, x = add_rms_norm(g, x, attn, f"{p}.post_attention_layernorm.weight", cfg["eps"])
        gate_up = g.op("MatMul", [h, f"{p}.mlp.gate_up_proj.weight"], "gate_up")
        gate, up = g.op("Split", [gate_up, g.const_i64([F, F])], "gate_up_split", n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu"), up], "act")
        down = g.op("MatMul", [act, f"{p}.mlp.down_proj.weight"], "down")

    # Only each row's last position's logits are ever read (the next token), so only it goes
    # through the last norm and lm_head: a fifth of the weights, which a prompt would otherwise
    # multiply at every position (and [S, vocab] floats to return: 237 MB for a 1,200-token prompt).
    x = g.op("Unsqueeze", [g.op("GatherND", [x, here], batch_dims=1), g.const_i64([1])], "x_last")
    down = g.op("Unsqueeze", [g.op("GatherND", [down, here], batch_dims=1), g.const_i64([1])], "down_last")
    g.init("model.norm.weight", W("output_norm.weight"))
    h, _ = add_rms_norm(g, x, down, "model.norm.weight", cfg["eps"])
    g.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="lm_head"))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
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

