"""The int4 graph's MatMulNBits weights laid out for the engine's own CPU kernel (`model.packed.onnx`).

ONNX Runtime's MatMulNBits holds each column's 4-bit codes along K, two to a byte, one column after
another. The engine's AVX-512 VNNI kernel reads a tile of 16 columns at once, a column to each 32-bit
lane of a 512-bit register, and in each lane four K at a time: the four bytes vpdpbusd multiplies by
four activations and adds into that lane. So each 64-byte row of a tile holds 8 K of one block for
its 16 columns, a lane's low nibbles K 0..3 of them and its high nibbles K 4..7, and a mask or a
shift of one load gives the kernel either four. The weights are laid out here, once at conversion,
rather than repacked in memory when the engine loads them, which would hold two copies (ONNX
Runtime's and the repacked one). A tile's block is one 320-byte record, its codes (four cache
lines) then one cache line of its 16 scales as float16 (the quantizer rounds every scale to float16,
so MatMulNBits in `model.onnx` multiplies by the same values), its 16 zero points as bytes and 16
bytes unused; the kernel takes each zero point times its scale, so that a block's sum is
scale · Σ q·x − (z · scale) · Σ x, with nothing to subtract per weight. The kernel takes tiles in
pairs, so a pair's records interleave its two tiles block by block, and the pairs follow each other:
the tiles a thread takes are one stream, whole cache lines. Measured on this project's 2-CPU
machine: these records took the engine from 156.1 and 154.2 tok/s at batch 1 to 212.7 and 222.2
against 384-byte records (float32 scales, zero points times scales) read a stream per tile
(`engine-bench --weights int4 --runs 3 --python-loop off`, the two builds and their model files
alternating; the README's engine figures). Earlier, the scales and zero points in two arrays of
their own (three streams) made a batch-1 step 6.2–7.3 ms against 5.2–6.1 for 384-byte records, and
records of 336 bytes (float32 scales, zero points as bytes), which start a cache line only one
time in four, lost batch 8 15%.

PackedMatMulNBits (domain ai.meridian), in place of MatMulNBits with bits 4, block_size 32 and
zero points; K and N as MatMulNBits', K a multiple of 32 and N of 16; T = N/16 tiles, Bk = K/32
blocks; the weight of column n at input channel k is (q[n][k] - z[n][k/32]) · scale[n][k/32]:
  inputs: X (as MatMulNBits'), then from the weight w (MatMulNBits' B is `{w}_Q4`):
  `{w}_packed`  uint8 [T·Bk, 320], tile t's record of block b at 2⌊t/2⌋·Bk + b·c + t mod 2, where c
                is 2, or 1 for the last tile of an odd T; each record:
    bytes 0..256    [p][4j + i] = q[16t+j][32b+8p+i] | q[16t+j][32b+8p+4+i] << 4   (p < 4, j < 16, i < 4)
    bytes 256..288  float16 [j] = scale[16t+j][b] (which float16 holds exactly)
    bytes 288..304  uint8 [j] = z[16t+j][b]
    bytes 304..320  zero
  outputs: Y (as MatMulNBits').
"""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from common import save_onnx

DOMAIN = "ai.meridian"
OP = "PackedMatMulNBits"
BLOCK = 32  # input channels a scale and a zero point cover (MatMulNBits' block_size)
TILE = 16  # columns a tile, each one 32-bit lane of a 512-bit register
CODES = TILE * BLOCK // 2  # bytes of a tile's codes in a block
RECORD = CODES + 64  # a tile's block: codes, then a cache line of scales, zero points and 16 bytes unused
# Tiles of each node unpacked again and compared with its MatMulNBits codes (random, fixed seed),
# besides its last tile (alone when the count is odd).
CHECKED_TILES = 2


def pack_int4(src_model, dst_model, seed=0):
    """Writes `src_model` at `dst_model` (its weights in `<name>.data` beside it) with every
    MatMulNBits node as a PackedMatMulNBits node and the MatMulNBits initializers dropped; every
    other node and initializer is unchanged. Returns how many nodes it packed; raises ValueError on a
    MatMulNBits node the kernel cannot take, and AssertionError if a tile does not unpack to its
    source codes."""
    model = onnx.load(str(src_model), load_external_data=True)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    taken = set(weights) | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    rng = np.random.default_rng(seed)
    packed, replaced, added = {}, set(), []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        sources = _sources(node, attrs, weights)
        k, n = attrs["K"], attrs["N"]
        b_name = sources[0]
        w = b_name[:-len("_Q4")] if b_name.endswith("_Q4") else b_name
        names = [f"{w}_packed"]
        if packed.get(w, sources) != sources:
            raise ValueError(f"{node.name}: {names} would also name another node's packed weights")
        if w not in packed:  # a weight two nodes share is packed once
            if taken & set(names):
                raise ValueError(f"{node.name}: {sorted(taken & set(names))} already in the graph")
            b, scales, zero_points = (numpy_helper.to_array(weights[s]) for s in sources)
            records = pack_weights(node.name, k, n, b, scales, zero_points)
            check_tiles(node.name, k, n, b, scales, zero_points, records,
                        {n // TILE - 1, *rng.choice(n // TILE, min(CHECKED_TILES, n // TILE), replace=False)})
            added.append(numpy_helper.from_array(records, names[0]))
            taken.update(names)
            packed[w] = sources
        replaced.update(sources)
        graph.node[index].CopyFrom(helper.make_node(OP, [node.input[0], *names], list(node.output),
                                                    name=node.name, domain=DOMAIN, K=k, N=n))
    # MatMulNBits' initializers go unless a node still reads one: the packed graph carries no dead weight.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in replaced - used:
            del graph.initializer[i]
    for i in reversed(range(len(graph.input))):
        if graph.input[i].name in replaced - used:
            del graph.input[i]
    graph.initializer.extend(added)
    if packed and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    save_onnx(model, dst_model)
    return sum(1 for n in graph.node if n.op_type == OP and n.domain == DOMAIN)


def _sources(node, attrs, weights):
    """MatMulNBits `node`'s B, scales and zero points (initializer names), after checking that the
    kernel takes it: 4-bit blocks of 32 with uint8 zero points, float32 scales, no g_idx or bias,
    K a multiple of 32 and N of 16."""
    k, n = attrs.get("K"), attrs.get("N")
    if attrs.get("bits") != 4 or attrs.get("block_size") != BLOCK:
        raise ValueError(f"{node.name}: bits {attrs.get('bits')}, block_size {attrs.get('block_size')}; "
                         f"{OP} takes bits 4, block_size {BLOCK}")
    if k is None or n is None or k % BLOCK or n % TILE:
        raise ValueError(f"{node.name}: K {k}, N {n}; {OP} takes K a multiple of {BLOCK} and N of {TILE}")
    inputs = list(node.input) + [""] * (4 - len(node.input))
    if any(inputs[4:]):
        raise ValueError(f"{node.name}: has g_idx or bias inputs {inputs[4:]}, which {OP} does not take")
    if not inputs[3]:
        raise ValueError(f"{node.name}: has no zero points ({OP} takes them explicitly)")
    for name in inputs[1:4]:
        if name not in weights:
            raise ValueError(f"{node.name}: {name} is not an initializer")
    kinds = [weights[name].data_type for name in inputs[1:4]]
    if kinds != [onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8]:
        raise ValueError(f"{node.name}: B, scales, zero points of types {kinds}; {OP} takes uint8, float32, uint8")
    scales = numpy_helper.to_array(weights[inputs[2]])
    if not np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
        raise ValueError(f"{node.name}: scales float16 does not hold exactly; {OP} reads them as float16")
    return tuple(inputs[1:4])


def pack_weights(name, k, n, b, scales, zero_points):
    """From MatMulNBits' B [N, K/32, 16] (codes two to a byte, the first in the low nibble), scales
    [N·K/32] and zero points [N, ⌈K/64⌉] (two to a byte along each column's blocks), the records
    [T·Bk, 320] (packed codes, scales as float16, zero points, 16 zero bytes), in pairs of tiles."""
    blocks, tiles = k // BLOCK, n // TILE
    if b.size != n * blocks * BLOCK // 2 or scales.size != n * blocks or zero_points.size != n * -(-blocks // 2):
        raise ValueError(f"{name}: B {list(b.shape)}, scales {list(scales.shape)}, zero points "
                         f"{list(zero_points.shape)} do not fit K {k}, N {n}")
    b = b.reshape(n, blocks, BLOCK // 2)
    # A block's K = 8p + 4h + i: row p of the tile, nibble h, byte i of a column's lane.
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(tiles, TILE, blocks, 4, 2, 4)
    rows = codes[..., 0, :] | (codes[..., 1, :] << 4)  # [T, j, Bk, p, i]
    packed = np.ascontiguousarray(rows.transpose(0, 2, 3, 1, 4)).reshape(tiles, blocks, 4, 4 * TILE)
    pscales = np.ascontiguousarray(scales.reshape(tiles, TILE, blocks).transpose(0, 2, 1), "<f2")
    zero_points = zero_points.reshape(n, -1)
    z = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    pz = np.ascontiguousarray(z.reshape(tiles, TILE, blocks).transpose(0, 2, 1), np.uint8)
    unused = np.zeros((tiles, blocks, RECORD - CODES - 3 * TILE), np.uint8)
    records = np.concatenate([packed.reshape(tiles, blocks, -1), pscales.view(np.uint8), pz, unused], axis=2)
    paired = tiles // 2 * 2
    pairs = records[:paired].reshape(tiles // 2, 2, blocks, RECORD).transpose(0, 2, 1, 3)
    return np.concatenate([pairs.reshape(-1, RECORD), records[paired:].reshape(-1, RECORD)])


def check_tiles(name, k, n, b, scales, zero_points, records, tiles):
    """Unpacks `tiles` from the packed layout by its index formula (not by undoing pack_weights'
    reshapes) and compares them with the codes, scales and zero points read from MatMulNBits' bytes;
    raises AssertionError on any difference."""
    blocks, count = k // BLOCK, n // TILE
    if records.shape != (count * blocks, RECORD):
        raise AssertionError(f"{name}: records of shape {records.shape}")
    if records[:, CODES + 3 * TILE:].any():
        raise AssertionError(f"{name}: a record's unused bytes are not zero")
    b = b.reshape(-1)
    scales = scales.reshape(-1)
    zero_points = zero_points.reshape(-1)
    kk = np.arange(k)
    bb = np.arange(blocks)
    for t in tiles:
        t = int(t)
        in_pair = 1 if t == count - 1 and count % 2 else 2
        own = records[t // 2 * 2 * blocks + bb * in_pair + t % 2]  # [Bk, 320]
        packed = own[:, :CODES]
        pscales = own[:, CODES:CODES + 2 * TILE].copy().view("<f2").astype(np.float32)
        pz = own[:, CODES + 2 * TILE:CODES + 3 * TILE]
        cols = TILE * t + np.arange(TILE)[:, None]
        # MatMulNBits: code k of column n in byte n·K/2 + k/2, low nibble for even k.
        want = (b[cols * (k // 2) + kk // 2] >> (4 * (kk % 2))) & 15
        zp = (zero_points[cols * -(-blocks // 2) + bb // 2] >> (4 * (bb % 2))) & 15  # [16, Bk]
        scale = scales[cols * blocks + bb]
        tile = packed.reshape(blocks, 4, TILE, 4)  # [b, p, j, i]
        bi, pi, ji, ii = np.indices(tile.shape)
        got = np.full((TILE, k), 255, np.uint8)
        got[ji, BLOCK * bi + 8 * pi + ii] = tile & 15
        got[ji, BLOCK * bi + 8 * pi + 4 + ii] = tile >> 4
        if not np.array_equal(got, want):
            raise AssertionError(f"{name}: tile {t} unpacks to other codes than MatMulNBits' "
                                 f"({int((got != want).sum())} of {got.size} differ)")
        if not np.array_equal(pscales.T, scale):
            raise AssertionError(f"{name}: tile {t}'s scales differ from MatMulNBits'")
        if not np.array_equal(pz.T, zp):
            raise AssertionError(f"{name}: tile {t}'s zero points differ from MatMulNBits'")
