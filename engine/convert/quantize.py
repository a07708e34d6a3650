"""int4 weight-only quantisation (MatMulNBits) of every MatMul with a constant weight, lm_head included."""
from pathlib import Path

import onnx


def quantize_int4(src_model, dst_model, block_size=32):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src_model), load_external_data=True)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4,
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
    return counts
