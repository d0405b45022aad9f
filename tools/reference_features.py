#!/usr/bin/env python3
"""Independent numpy reference for EfficientNet-Lite0: pooled 1280-d features and 1000 logits.

This is a second, separate implementation of the forward pass (no torch, no candle) used to
make test fixtures the Rust encoder must reproduce. It reads
`models/efficientnet-lite0/model.safetensors` (checking its sha256 against manifest.json),
derives the block layout from the weight shapes, and computes in float64.

Architecture (EfficientNet-Lite0): stem 3x3/2 conv (32) + BN + ReLU6; 16 MBConv blocks
(expand 1x1 + BN + ReLU6 when the expand ratio != 1; depthwise kxk + BN + ReLU6; project
1x1 + BN; residual add when stride 1 and in == out channels); no squeeze-excite; head 1x1
conv (1280) + BN + ReLU6; global average pool -> pooled features; `_fc` -> logits.
BatchNorm eps 1e-3. Convolutions use TensorFlow "same" padding:
total = max((ceil(in/s) - 1) * s + k - in, 0), before = total // 2, after = total - before.

Input: an RGB image that is already 224x224, x = (pixel - 127) / 128, NCHW.

Usage:
  python3 tools/reference_features.py --out tests/fixtures     # regenerate all fixtures
  python3 tools/reference_features.py --check tests/fixtures   # recompute, compare, exit 1 on change
  python3 tools/reference_features.py IMAGE_224.png ...        # print top-5 logits
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO_ROOT, "models", "efficientnet-lite0")
BN_EPS = 1e-3
INPUT_SIZE = 224
MEAN, STD = 127.0, 128.0

# EfficientNet-B0 stage layout, kept by Lite0: (repeats, kernel, stride, expand, out_channels)
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]

# Source photos (scikit-image `skimage/data/`, CC0) -> fixture base names.
FIXTURES = {"coffee": "coffee.png", "chelsea": "chelsea.png"}
SKIMAGE_WHEEL_GLOB = "/tmp/wheels/scikit_image-*.whl"


# ----------------------------------------------------------------------------- weights

def load_safetensors(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        arr = np.frombuffer(raw[base + start:base + end], dtype="<f4").reshape(meta["shape"])
        out[name] = arr.astype(np.float64)
    return out, hashlib.sha256(raw).hexdigest()


def load_model(model_dir=MODEL_DIR):
    with open(os.path.join(model_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    weights, digest = load_safetensors(os.path.join(model_dir, manifest["weights"]))
    if digest != manifest["sha256"]:
        raise ValueError(f"weights sha256 {digest} != manifest {manifest['sha256']}")
    return weights, manifest


def block_config(w):
    """Derive (in, expand_ch or None, kernel, stride, out) per block from shapes + the stage table."""
    n = 0
    while f"_blocks.{n}._depthwise_conv.weight" in w:
        n += 1
    strides, kernels, outs = [], [], []
    for reps, k, s, _e, o in STAGES:
        for r in range(reps):
            strides.append(s if r == 0 else 1)
            kernels.append(k)
            outs.append(o)
    if n != len(strides):
        raise ValueError(f"weights have {n} blocks, the Lite0 layout has {len(strides)}")
    cfg = []
    cin = w["_conv_stem.weight"].shape[0]
    for i in range(n):
        p = f"_blocks.{i}."
        dw = w[p + "_depthwise_conv.weight"]
        mid, one, k, k2 = dw.shape
        if one != 1 or k != k2:
            raise ValueError(f"block {i}: odd depthwise shape {dw.shape}")
        if k != kernels[i]:
            raise ValueError(f"block {i}: kernel {k} != stage table {kernels[i]}")
        if p + "_expand_conv.weight" in w:
            ex = w[p + "_expand_conv.weight"].shape
            if ex[1] != cin or ex[0] != mid:
                raise ValueError(f"block {i}: expand shape {ex}")
            expand = mid
        else:
            if mid != cin:
                raise ValueError(f"block {i}: no expand conv but {mid} != {cin}")
            expand = None
        cout = w[p + "_project_conv.weight"].shape[0]
        if cout != outs[i]:
            raise ValueError(f"block {i}: out {cout} != stage table {outs[i]}")
        cfg.append((cin, expand, k, strides[i], cout))
        cin = cout
    return cfg


# ----------------------------------------------------------------------------- ops (CHW, f64)

def same_pad(size, k, s):
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def pad_hw(x, k, s):
    _, h, wd = x.shape
    ho, pt, pb = same_pad(h, k, s)
    wo, pl, pr = same_pad(wd, k, s)
    return np.pad(x, ((0, 0), (pt, pb), (pl, pr))), ho, wo


def conv_kxk(x, weight, s):
    """Dense kxk conv, weight (Cout, Cin, k, k)."""
    k = weight.shape[2]
    xp, ho, wo = pad_hw(x, k, s)
    out = np.zeros((weight.shape[0], ho, wo))
    for a in range(k):
        for b in range(k):
            patch = xp[:, a:a + s * (ho - 1) + 1:s, b:b + s * (wo - 1) + 1:s]
            out += np.einsum("oc,chw->ohw", weight[:, :, a, b], patch)
    return out


def conv_depthwise(x, weight, s):
    """Depthwise kxk conv, weight (C, 1, k, k)."""
    k = weight.shape[2]
    xp, ho, wo = pad_hw(x, k, s)
    out = np.zeros((x.shape[0], ho, wo))
    for a in range(k):
        for b in range(k):
            patch = xp[:, a:a + s * (ho - 1) + 1:s, b:b + s * (wo - 1) + 1:s]
            out += weight[:, 0, a, b][:, None, None] * patch
    return out


def conv_1x1(x, weight):
    c, h, wd = x.shape
    return (weight[:, :, 0, 0] @ x.reshape(c, h * wd)).reshape(weight.shape[0], h, wd)


def batch_norm(x, w, prefix):
    scale = w[prefix + ".weight"] / np.sqrt(w[prefix + ".running_var"] + BN_EPS)
    shift = w[prefix + ".bias"] - w[prefix + ".running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def forward(w, cfg, x):
    """x: (3, 224, 224) float64 normalised. Returns (pooled (1280,), logits (1000,))."""
    x = relu6(batch_norm(conv_kxk(x, w["_conv_stem.weight"], 2), w, "_bn0"))
    for i, (cin, expand, _k, s, cout) in enumerate(cfg):
        p = f"_blocks.{i}."
        inp = x
        if expand is not None:
            x = relu6(batch_norm(conv_1x1(x, w[p + "_expand_conv.weight"]), w, p + "_bn0"))
        x = relu6(batch_norm(conv_depthwise(x, w[p + "_depthwise_conv.weight"], s), w, p + "_bn1"))
        x = batch_norm(conv_1x1(x, w[p + "_project_conv.weight"]), w, p + "_bn2")
        if s == 1 and cin == cout:
            x = x + inp
    x = relu6(batch_norm(conv_1x1(x, w["_conv_head.weight"]), w, "_bn1"))
    pooled = x.mean(axis=(1, 2))
    logits = w["_fc.weight"] @ pooled + w["_fc.bias"]
    return pooled, logits


# ----------------------------------------------------------------------------- images

def load_input(path):
    img = Image.open(path)
    if img.mode != "RGB":
        raise ValueError(f"{path}: mode {img.mode}, expected RGB")
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"{path}: size {img.size}, expected {INPUT_SIZE}x{INPUT_SIZE}")
    px = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    x = (px - np.float32(MEAN)) / np.float32(STD)  # f32, as the Rust encoder does
    return x.transpose(2, 0, 1).astype(np.float64)


def resize_crop_224(src, dst):
    """Shorter side -> 224 (PIL BICUBIC, width/height rounded half-to-even), centre crop 224x224."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    scale = INPUT_SIZE / min(w, h)
    nw, nh = max(INPUT_SIZE, round(w * scale)), max(INPUT_SIZE, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - INPUT_SIZE) // 2, (nh - INPUT_SIZE) // 2
    img = img.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    img.save(dst, format="PNG", optimize=False)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def describe(w, cfg, path):
    pooled, logits = forward(w, cfg, load_input(path))
    pooled32 = pooled.astype("<f4")
    logits32 = logits.astype("<f4")
    top = np.argsort(-logits32, kind="stable")[:5]
    return pooled32, {
        "top5": [[int(c), float(logits32[c])] for c in top],
        "top1_softmax": float(np.float32(softmax(logits)[top[0]])),
        "pooled_l2_norm": float(np.float32(np.linalg.norm(pooled32.astype(np.float64)))),
        "source": "tools/reference_features.py",
    }


def find_skimage_png(name):
    import glob
    import zipfile
    for whl in sorted(glob.glob(SKIMAGE_WHEEL_GLOB)):
        with zipfile.ZipFile(whl) as z:
            return z.read(f"skimage/data/{name}")
    return None


def fixture_json(info):
    """One field a line, each top-5 pair on one line: readable diffs, stable bytes."""
    lines = []
    for key, val in info.items():
        if key == "top5":
            pairs = ",\n    ".join(json.dumps(pair) for pair in val)
            lines.append(f'  "top5": [\n    {pairs}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(val)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def same_pixels(png_a, png_b):
    import io
    a = Image.open(io.BytesIO(png_a))
    b = Image.open(io.BytesIO(png_b))
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


def generate(out_dir, w, cfg, digest, check):
    os.makedirs(out_dir, exist_ok=True)
    changed = []
    for base, src_name in FIXTURES.items():
        src = os.path.join(out_dir, src_name)
        if not os.path.exists(src):
            data = find_skimage_png(src_name)
            if data is None:
                raise FileNotFoundError(f"{src} missing and no scikit-image wheel at {SKIMAGE_WHEEL_GLOB}")
            with open(src, "wb") as fh:
                fh.write(data)
        img224 = os.path.join(out_dir, f"{base}_224.png")
        tmp_img = img224 + ".tmp.png"
        resize_crop_224(src, tmp_img)
        pooled, info = describe(w, cfg, tmp_img)
        info["image"] = f"{base}_224.png"
        info["preprocess"] = (f"{src_name}: RGB, shorter side to 224 (PIL BICUBIC, other side round-half-even), "
                              "centre crop 224x224 (offset (new-224)//2); x = (pixel - 127) / 128, NCHW")
        info["weights_sha256"] = digest
        outputs = {
            img224: open(tmp_img, "rb").read(),
            os.path.join(out_dir, f"{base}_224.features.f32"): pooled.tobytes(),
            os.path.join(out_dir, f"{base}_224.json"): fixture_json(info).encode(),
        }
        os.remove(tmp_img)
        for path, data in outputs.items():
            old = open(path, "rb").read() if os.path.exists(path) else None
            if old is not None and path.endswith(".png"):
                same = same_pixels(old, data)  # PNG bytes depend on the zlib build
            else:
                same = old == data
            if not same:
                changed.append(path)
                if not check:
                    with open(path, "wb") as fh:
                        fh.write(data)
        print(f"{base}_224: top5 {info['top5']} p1={info['top1_softmax']:.4f} |pooled|={info['pooled_l2_norm']:.4f}")
    return changed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="224x224 RGB images to classify")
    ap.add_argument("--out", help="directory to (re)generate fixtures in")
    ap.add_argument("--check", help="fixture directory to recompute and compare, writing nothing")
    ap.add_argument("--model-dir", default=MODEL_DIR)
    args = ap.parse_args()

    w, manifest = load_model(args.model_dir)
    cfg = block_config(w)
    for path in args.images:
        _, info = describe(w, cfg, path)
        print(path, json.dumps(info))
    if args.out:
        generate(args.out, w, cfg, manifest["sha256"], check=False)
    if args.check:
        changed = generate(args.check, w, cfg, manifest["sha256"], check=True)
        if changed:
            print("DIFFERS: " + ", ".join(changed), file=sys.stderr)
            return 1
        print("OK: fixtures match")
    if not (args.images or args.out or args.check):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
