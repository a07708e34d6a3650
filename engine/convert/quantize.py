"""Weight-only quantisation (MatMulNBits) of every MatMul with a constant weight.

The GGUF the chat model comes from holds its layers in Q4_1 (per 32 weights a scale and a minimum)
and its token embedding, which is also the output layer, in Q8_0 (per 32 weights a scale). The
layers become 4-bit asymmetric blocks of 32 (a scale and a 4-bit zero point): Q4_1's minimum is not
a whole number of scales, so no 4-bit layout ONNX Runtime runs fast holds it exactly, and the
asymmetric one comes closest. The output layer becomes 8-bit symmetric blocks of 32, which hold
Q8_0 exactly: a fifth of the weights, it costs a few percent at batch 1 (reading 8 bits instead of 4)
and nothing at 8 rows, where the step is bound by compute. `engine-bench` prints what each choice
costs in perplexity and in divergence from the fp32 model.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32
OUTPUT_LAYER = "lm_head"


def quantize_int4(src_model, dst_model):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src_model), load_external_data=True)
    output_error = _output_layer_8bit(model)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=4,
                             op_types_to_quantize=("MatMul",))
    q.process()
    dst_model = Path(dst_model)
    q.model.save_model_to_file(str(dst_model), use_external_data_format=True)
    counts = {}
    for n in q.model.model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    const = {i.name for i in q.model.model.graph.initializer}
    left = [n.name for n in q.model.model.graph.node if n.op_type == "MatMul" and n.input[1] in const]
    if left:
        raise AssertionError(f"MatMuls with constant weights left unquantised: {left}")
    return counts, output_error


def _output_layer_8bit(model):
    """Replaces the output layer's MatMul by an 8-bit MatMulNBits (symmetric blocks of 32, zero point
    128, as Q8_0: scale = the block's largest magnitude / 127); returns the largest difference from
    the fp32 weights, 0 when they came from Q8_0."""
    graph = model.graph
    index = next((i for i, n in enumerate(graph.node) if n.name == OUTPUT_LAYER and n.op_type == "MatMul"), None)
    if index is None:
        raise ValueError(f"no MatMul named {OUTPUT_LAYER} in the graph")
    node = graph.node[index]
    x, weight_name = node.input
    init = next((i for i in graph.initializer if i.name == weight_name), None)
    if init is None:
        raise ValueError(f"{OUTPUT_LAYER}: its weight {weight_name} is not a constant")
    w = numpy_helper.to_array(init).astype(np.float64)  # [K, N]
    k, n = w.shape
    if k % BLOCK:
        raise ValueError(f"{OUTPUT_LAYER}: K={k} is not a multiple of {BLOCK}")
    blocks = w.T.reshape(n, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    q = np.rint(blocks / scale)
    error = float(np.abs(q * scale - blocks).max())
    data = numpy_helper.from_array((q + 128).astype(np.uint8), f"{weight_name}_Q8")
    scales = numpy_helper.from_array(scale.reshape(-1).astype(np.float32), f"{weight_name}_scales")
    graph.initializer.remove(init)
    graph.initializer.extend([data, scales])
    graph.node.remove(node)
    graph.node.insert(index, helper.make_node(
        "MatMulNBits", [x, data.name, scales.name], list(node.output), name=OUTPUT_LAYER, domain="com.microsoft",
        K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=4))
    return error
