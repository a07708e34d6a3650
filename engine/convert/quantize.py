"""Weight-only quantisation of every MatMul with a constant weight (MatMulNBits) and of the token
embedding (GatherBlockQuantized).

The GGUF the chat model comes from holds its layers in Q4_1 (per 32 weights a scale and a minimum)
and its token embedding, which is also the output layer, in Q8_0 (per 32 weights a scale). Every
MatMul, the output layer included, becomes 4-bit asymmetric blocks of 32 (a scale and a 4-bit zero
point): Q4_1's minimum is not a whole number of scales, so no 4-bit layout ONNX Runtime runs fast
holds it exactly, and each block's scale and zero point are searched for the least squared error
instead of taken from the block's range, each weight's error weighed by the mean square of the
activations it multiplies (`calibrate.py`); each scale is then rounded to float16 (`_half`). The
output layer is a fifth of the weights: held 8-bit (Q8_0 exactly) it was slower at batch 1 (the
README's engine-bench figures) for a KL divergence from fp32 of 0.179 instead of 0.214 nats. The
token embedding's Gather reads the same Q8_0 table a row a token and becomes an 8-bit
GatherBlockQuantized, exact. `engine-bench`
prints what each choice costs in perplexity and in divergence from the fp32 model.
"""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from common import save_onnx

BLOCK = 32
# Scales tried per 4-bit block, as fractions of the range-derived one ((max - min) / 15), each with
# the zero point that fits the block's minimum and its two neighbours. 11 steps leave 0.02% more
# (unweighted) squared error than 41 over SmolLM2's layers, in a third of the time.
SCALE_STEPS = np.linspace(0.8, 1.2, 11, dtype=np.float32)
# Blocks fitted at once: bounds the search's temporaries (~8 MB each).
CHUNK = 1 << 16


def quantize_int4(src_model, dst_model, importance):
    """Writes `src_model` with its MatMuls as 4-bit MatMulNBits, each weight's error weighed by
    `importance` (per MatMul input name, the mean square of each input channel:
    `calibrate.input_importance`), and the token embedding (a Gather of a constant table) as 8-bit;
    returns the op counts, the embedding's largest difference from fp32 and the MatMuls' squared
    error relative to their squared weights."""
    model = onnx.load(str(src_model), load_external_data=True)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    replaced, added = set(), []

    def take(name, node):
        if name in replaced:
            raise ValueError(f"{node.name}: weight {name} is shared with another node")
        replaced.add(name)
        return numpy_helper.to_array(weights[name]).astype(np.float32)

    eight_bit_error, squared_error, squared = 0.0, 0.0, 0.0
    for index, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input[0] in weights:
            table = take(node.input[0], node)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table.ndim != 2 or table.shape[1] % BLOCK or axis != 0:
                raise ValueError(f"{node.name}: table {list(table.shape)} is not rows of a multiple of {BLOCK} "
                                 f"gathered along axis 0")
            blocks = table.reshape(-1, BLOCK)  # each block runs along a row
            codes, scales, error = _symmetric_8bit(blocks)
            eight_bit_error = max(eight_bit_error, error)
            quantized, initializers = _gather_8bit(node, table.shape, codes, scales)
        elif node.op_type == "MatMul" and node.input[1] in weights:
            w = take(node.input[1], node)
            if w.ndim != 2 or w.shape[0] % BLOCK:
                raise ValueError(f"{node.name}: weight {list(w.shape)} is not [K, N] with K a multiple of {BLOCK}")
            blocks = np.ascontiguousarray(w.T).reshape(-1, BLOCK)  # each block runs along K of one column
            # Block (n, j) holds input channels 32j..32j+31 of column n.
            channels = np.tile(importance[node.input[0]].astype(np.float32).reshape(-1, BLOCK), (w.shape[1], 1))
            codes, scales, zero_points = _asymmetric_4bit(blocks, channels)
            squared_error += float(((_dequantize(codes, scales, zero_points) - blocks) ** 2).sum())
            squared += float((blocks * blocks).sum())
            quantized, initializers = _matmul_nbits(node, w.shape, codes, scales, zero_points)
        else:
            continue
        graph.node[index].CopyFrom(quantized)
        added.extend(initializers)
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in replaced:
            del graph.initializer[i]
    graph.initializer.extend(added)
    save_onnx(model, dst_model)
    counts = {}
    for n in graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts, eight_bit_error, squared_error / squared


def _dequantize(codes, scales, zero_points):
    zero = np.asarray(zero_points, np.float32).reshape(-1, 1) if np.ndim(zero_points) else np.float32(zero_points)
    return scales[:, None] * (codes.astype(np.float32) - zero)


def _symmetric_8bit(blocks):
    """Q8_0's layout: scale = the block's largest magnitude / 127, codes offset by 128; with the
    largest difference from `blocks` (0 when they came from Q8_0)."""
    amax = np.abs(blocks).max(axis=1)
    scales = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    codes = (np.rint(blocks / scales[:, None]) + 128).astype(np.uint8)
    return codes, scales, float(np.abs(_dequantize(codes, scales, 128) - blocks).max())


def _asymmetric_4bit(blocks, importance):
    """Per block codes q in 0..15, a scale s and a zero point z (whole) with w ≈ s·(q − z), chosen
    for the least squared error weighed by `importance` (as `blocks`): for each candidate scale and
    zero point the codes are rounded, and the scale that fits those codes best (weighted least
    squares) is kept with the candidate that leaves the least error."""
    codes = np.empty(blocks.shape, np.uint8)
    scales = np.empty(len(blocks), np.float32)
    zero_points = np.empty(len(blocks), np.uint8)
    for start in range(0, len(blocks), CHUNK):
        part = slice(start, start + CHUNK)
        codes[part], scales[part], zero_points[part] = _fit_4bit(blocks[part], importance[part])
    return codes, scales, zero_points


def _fit_4bit(b, a):
    lo, hi = b.min(axis=1), b.max(axis=1)
    span = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float32)
    # For codes qz = q − z fixed, the best scale is Σ a·b·qz / Σ a·qz², which leaves an error of
    # Σ a·b² − (Σ a·b·qz)² / Σ a·qz²: the candidate with the largest (Σ a·b·qz)² / Σ a·qz² wins.
    ab = a * b
    gain = np.full(len(b), -1.0, np.float32)
    step = span.copy()
    zero = np.clip(np.rint(-lo / span), 0, 15)
    for factor in SCALE_STEPS:
        s = span * factor
        scaled = b / s[:, None]
        nearest = np.rint(-lo / s)
        for dz in (-1, 0, 1):
            z = np.clip(nearest + dz, 0, 15)
            qz = np.clip(np.rint(scaled + z[:, None]), 0, 15) - z[:, None]
            num, den = np.einsum("ij,ij->i", ab, qz), np.einsum("ij,ij,ij->i", a, qz, qz)
            g = np.where((den > 0) & (num > 0), num * num / np.maximum(den, 1e-30), -1.0)
            better = g > gain
            gain, step, zero = np.where(better, g, gain), np.where(better, s, step), np.where(better, z, zero)
    codes = np.clip(np.rint(b / step[:, None] + zero[:, None]), 0, 15)
    qz = codes - zero[:, None]
    num, den = np.einsum("ij,ij->i", ab, qz), np.einsum("ij,ij,ij->i", a, qz, qz)
    # A block whose codes carry no signal (all equal to the zero point) keeps the range's scale.
    scales = np.where((den > 0) & (num > 0), num / np.maximum(den, 1e-30), step)
    return codes.astype(np.uint8), _half(scales), zero.astype(np.uint8)


def _half(scales):
    """`scales` rounded to the nearest float16 and held as float32: the engine's kernel reads them
    as float16 (pack.py), and MatMulNBits, which takes float32 scales with float32 activations, then
    multiplies by the same values. The error this adds is 2⁻¹² of a scale on average, against codes
    rounded to whole steps of it. A scale float16 cannot hold (zero, or past its range) is refused."""
    half = scales.astype(np.float16)
    bad = ~np.isfinite(half) | ((half == 0) & (scales != 0))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} block scales (e.g. {float(scales[bad][0]):g}) do not fit float16")
    return half.astype(np.float32)


def _matmul_nbits(node, shape, codes, scales, zero_points):
    """A 4-bit MatMulNBits node in place of MatMul `node` (weight [K, N]) and its initializers, in
    ONNX Runtime's layout: B [N, K/32, 16] with codes two to a byte (the first in the low nibble),
    scales [N·K/32], zero points two to a byte along each column's blocks ([N, ⌈K/64⌉])."""
    k, n = shape
    weight = node.input[1]
    blocks = k // BLOCK
    per_column = zero_points.reshape(n, blocks)
    if blocks % 2:
        per_column = np.pad(per_column, ((0, 0), (0, 1)))
    inputs = [node.input[0], f"{weight}_Q4", f"{weight}_scales", f"{weight}_zero_points"]
    initializers = [
        numpy_helper.from_array((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, -1), inputs[1]),
        numpy_helper.from_array(scales, inputs[2]),
        numpy_helper.from_array((per_column[:, 0::2] | (per_column[:, 1::2] << 4)).astype(np.uint8).reshape(-1),
                                inputs[3]),
    ]
    quantized = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name,
                                 domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4)
    return quantized, initializers


def _gather_8bit(node, shape, codes, scales):
    """A GatherBlockQuantized node in place of Gather `node` (table [V, D], gathered along rows) and
    its initializers: 8-bit codes [V, D] offset by 128 (no zero points: ONNX Runtime's default for
    8 bits), scales [V, D/32]."""
    rows, width = shape
    table = node.input[0]
    inputs = [f"{table}_Q8", node.input[1], f"{table}_scales"]
    initializers = [
        numpy_helper.from_array(codes.reshape(rows, width), inputs[0]),
        numpy_helper.from_array(scales.reshape(rows, width // BLOCK), inputs[2]),
    ]
    quantized = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=node.name,
                                 domain="com.microsoft", bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=1)
    return quantized, initializers
