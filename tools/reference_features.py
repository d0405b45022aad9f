#!/usr/bin/env python3
"""Independent numpy reference for EfficientNet-Lite: pooled 1280-d features and 1000 logits.

This is a second, separate implementation of the forward pass (no torch, no candle) used to
make test fixtures the Rust encoder must reproduce. It reads a model folder's
`model.safetensors` (checking its sha256 against manifest.json), lays the blocks out as
TensorFlow's EfficientNet-Lite builder does for the manifest's architecture (checking every
weight shape against that layout), and computes in float64.

Architecture (EfficientNet-Lite0..4): stem 3x3/2 conv (32) + BN + ReLU6; MBConv blocks in the
seven EfficientNet-B0 stages (expand 1x1 + BN + ReLU6 when the expand ratio != 1; depthwise kxk
+ BN + ReLU6; project 1x1 + BN; residual add when stride 1 and in == out channels); no
squeeze-excite; head 1x1 conv (1280) + BN + ReLU6; global pooling -> features; `_fc` on the
average-pooled features -> logits. Width and depth scale with the variant (Lite2: width 1.1,
depth 1.2, 21 blocks), except the stem, the head and the repeats of the first and last stage
("fix_head_stem"). BatchNorm eps 1e-3. Convolutions use TensorFlow "same" padding:
total = max((ceil(in/s) - 1) * s + k - in, 0), before = total // 2, after = total - before.

Pooling (manifest `pooling`): average by default; `{"kind": "gem", "p": P, "sqrt": S}` is
(mean over positions of max(x, 1e-6)^P)^(1/P), then sqrt element-wise when S.

Input: an RGB image that is already input_size x input_size (manifest), x = (pixel - mean) /
std (manifest; 127 and 128 for every Lite model), NCHW.

Fixtures, per photo (coffee, chelsea) and model folder, with N = the model's input size:
  average pooling: <photo>_N.png (shorter side to N with PIL BICUBIC, centre crop),
                   <photo>_N.features.f32 (pooled features, before L2 normalisation),
                   <photo>_N.json (top-5 logits, top-1 softmax, pooled L2 norm, weights sha256)
  other pooling:   <photo>_N.png (shared), <photo>_N.<version>.f32 (features pooled as the
                   manifest says, before L2 normalisation), <photo>_N.<version>.json

Usage:
  python3 tools/reference_features.py --out tests/fixtures     # regenerate all fixtures
  python3 tools/reference_features.py --check tests/fixtures   # recompute, compare, exit 1 on change
  python3 tools/reference_features.py --model-dir models/efficientnet-lite2 --check tests/fixtures
  python3 tools/reference_features.py [--model-dir DIR] IMAGE_N.png ...   # print top-5 logits
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
# The model folders `--out` / `--check` make fixtures for when no --model-dir is given.
FIXTURE_MODELS = ["efficientnet-lite0", "efficientnet-lite0-gem", "efficientnet-lite2"]
BN_EPS = 1e-3
GEM_EPS = 1e-6
# Lite0's input (kept for tools that import this module).
INPUT_SIZE = 224
MEAN, STD = 127.0, 128.0

# EfficientNet-B0 stage layout, the base of every Lite variant:
# (repeats, kernel, stride, expand, out_channels)
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM, HEAD = 32, 1280  # not scaled in the Lite family
# (width, depth) coefficients, from TensorFlow's efficientnet_lite_builder.py
ARCHITECTURES = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
    "efficientnet-lite3": (1.2, 1.4),
    "efficientnet-lite4": (1.4, 1.8),
}

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


def round_filters(filters, width, divisor=8):
    """TF EfficientNet's round_filters."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def stage_table(arch):
    """The STAGES of `arch` scaled as the TF Lite builder scales them."""
    width, depth = ARCHITECTURES[arch]
    table = []
    for i, (reps, k, s, e, o) in enumerate(STAGES):
        if not (i == 0 or i == len(STAGES) - 1):
            reps = int(math.ceil(depth * reps))
        table.append((reps, k, s, e, round_filters(o, width)))
    return table


def block_config(w, arch="efficientnet-lite0"):
    """Per block (in, expand_ch or None, kernel, stride, out), from the layout of `arch`;
    every weight shape is checked against it."""
    n = 0
    while f"_blocks.{n}._depthwise_conv.weight" in w:
        n += 1
    strides, kernels, outs, expands = [], [], [], []
    for reps, k, s, e, o in stage_table(arch):
        for r in range(reps):
            strides.append(s if r == 0 else 1)
            kernels.append(k)
            outs.append(o)
            expands.append(e)
    if n != len(strides):
        raise ValueError(f"weights have {n} blocks, the {arch} layout has {len(strides)}")
    if w["_conv_stem.weight"].shape != (STEM, 3, 3, 3):
        raise ValueError(f"stem {w['_conv_stem.weight'].shape}, expected ({STEM}, 3, 3, 3)")
    if w["_conv_head.weight"].shape != (HEAD, outs[-1], 1, 1):
        raise ValueError(f"head {w['_conv_head.weight'].shape}, expected ({HEAD}, {outs[-1]}, 1, 1)")
    cfg = []
    cin = STEM
    for i in range(n):
        p = f"_blocks.{i}."
        dw = w[p + "_depthwise_conv.weight"]
        mid, one, k, k2 = dw.shape
        if one != 1 or k != k2:
            raise ValueError(f"block {i}: odd depthwise shape {dw.shape}")
        if k != kernels[i]:
            raise ValueError(f"block {i}: kernel {k} != stage table {kernels[i]}")
        if mid != cin * expands[i]:
            raise ValueError(f"block {i}: {mid} expanded channels, expected {cin} x {expands[i]}")
        if p + "_expand_conv.weight" in w:
            ex = w[p + "_expand_conv.weight"].shape
            if ex[1] != cin or ex[0] != mid or expands[i] == 1:
                raise ValueError(f"block {i}: expand shape {ex}")
            expand = mid
        else:
            if expands[i] != 1:
                raise ValueError(f"block {i}: no expand conv but expand ratio {expands[i]}")
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


def feature_map(w, cfg, x):
    """x: (3, N, N) float64 normalised. Returns the head's (1280, h, w) map after ReLU6."""
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
    return relu6(batch_norm(conv_1x1(x, w["_conv_head.weight"]), w, "_bn1"))


def pool(fmap, pooling=None):
    """(C, h, w) -> (C,) with the manifest's pooling (None or average: the mean)."""
    if pooling is None or pooling["kind"] == "average":
        return fmap.mean(axis=(1, 2))
    if pooling["kind"] != "gem":
        raise ValueError(f"unknown pooling {pooling}")
    p = float(pooling["p"])
    f = (np.maximum(fmap, GEM_EPS) ** p).mean(axis=(1, 2)) ** (1.0 / p)
    return np.sqrt(f) if pooling["sqrt"] else f


def forward(w, cfg, x, pooling=None):
    """x: (3, N, N) float64 normalised. Returns (average-pooled (1280,), logits (1000,),
    features pooled with `pooling` (1280,))."""
    fmap = feature_map(w, cfg, x)
    pooled = pool(fmap)
    logits = w["_fc.weight"] @ pooled + w["_fc.bias"]
    return pooled, logits, pool(fmap, pooling)


# ----------------------------------------------------------------------------- images

def norm_of(manifest):
    """Per-channel (mean, std) arrays from a manifest's normalisation (one number or three)."""
    n = manifest["normalisation"]
    return (np.broadcast_to(np.asarray(n["mean"], dtype=np.float32), (3,)),
            np.broadcast_to(np.asarray(n["std"], dtype=np.float32), (3,)))


def load_input(path, size=INPUT_SIZE, mean=MEAN, std=STD):
    img = Image.open(path)
    if img.mode != "RGB":
        raise ValueError(f"{path}: mode {img.mode}, expected RGB")
    if img.size != (size, size):
        raise ValueError(f"{path}: size {img.size}, expected {size}x{size}")
    px = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    x = (px - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)  # f32, as the Rust encoder does
    return x.transpose(2, 0, 1).astype(np.float64)


def resize_crop(src, dst, size=INPUT_SIZE):
    """Shorter side -> size (PIL BICUBIC, width/height rounded half-to-even), centre crop."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    img.save(dst, format="PNG", optimize=False)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


class Model:
    """A model folder: weights, manifest, block layout."""

    def __init__(self, model_dir):
        self.w, self.manifest = load_model(model_dir)
        self.cfg = block_config(self.w, self.manifest["architecture"])
        self.size = int(self.manifest["input_size"])
        self.mean, self.std = norm_of(self.manifest)
        self.pooling = self.manifest.get("pooling")
        self.version = self.manifest["version"]

    def describe(self, path):
        pooled, logits, embed = forward(self.w, self.cfg, load_input(path, self.size, self.mean, self.std),
                                        self.pooling)
        pooled32 = pooled.astype("<f4")
        logits32 = logits.astype("<f4")
        top = np.argsort(-logits32, kind="stable")[:5]
        return pooled32, embed.astype("<f4"), {
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


def fmt(v):
    """127.0 -> '127'; a per-channel list -> '[a, b, c]'."""
    v = [float(x) for x in np.atleast_1d(v)]
    if all(x == v[0] for x in v):
        return f"{v[0]:g}"
    return "[" + ", ".join(f"{x:g}" for x in v) + "]"


def generate(out_dir, model, check):
    os.makedirs(out_dir, exist_ok=True)
    changed = []
    size, digest = model.size, model.manifest["sha256"]
    average = model.pooling is None or model.pooling["kind"] == "average"
    for base, src_name in FIXTURES.items():
        src = os.path.join(out_dir, src_name)
        if not os.path.exists(src):
            data = find_skimage_png(src_name)
            if data is None:
                raise FileNotFoundError(f"{src} missing and no scikit-image wheel at {SKIMAGE_WHEEL_GLOB}")
            with open(src, "wb") as fh:
                fh.write(data)
        stem = f"{base}_{size}"
        img = os.path.join(out_dir, f"{stem}.png")
        tmp_img = img + ".tmp.png"
        resize_crop(src, tmp_img, size)
        pooled, embed, info = model.describe(tmp_img)
        info["image"] = f"{stem}.png"
        info["preprocess"] = (f"{src_name}: RGB, shorter side to {size} (PIL BICUBIC, other side round-half-even), "
                              f"centre crop {size}x{size} (offset (new-{size})//2); "
                              f"x = (pixel - {fmt(model.mean)}) / {fmt(model.std)}, NCHW")
        info["weights_sha256"] = digest
        outputs = {img: open(tmp_img, "rb").read()}
        if average:
            outputs[os.path.join(out_dir, f"{stem}.features.f32")] = pooled.tobytes()
            outputs[os.path.join(out_dir, f"{stem}.json")] = fixture_json(info).encode()
        else:
            meta = {
                "version": model.version,
                "pooling": model.pooling,
                "features": f"{stem}.{model.version}.f32: 1280 little-endian f32, pooled as above, before L2 normalisation",
                "features_l2_norm": float(np.float32(np.linalg.norm(embed.astype(np.float64)))),
                "top5_average_pooled": info["top5"],
                "source": info["source"],
                "image": info["image"],
                "preprocess": info["preprocess"],
                "weights_sha256": digest,
            }
            outputs[os.path.join(out_dir, f"{stem}.{model.version}.f32")] = embed.tobytes()
            outputs[os.path.join(out_dir, f"{stem}.{model.version}.json")] = fixture_json(meta).encode()
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
        print(f"{model.version} {stem}: top5 {info['top5']} p1={info['top1_softmax']:.4f} "
              f"|pooled|={info['pooled_l2_norm']:.4f}"
              + ("" if average else f" |{model.version}|={np.linalg.norm(embed.astype(np.float64)):.4f}"))
    return changed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="input_size x input_size RGB images to classify")
    ap.add_argument("--out", help="directory to (re)generate fixtures in")
    ap.add_argument("--check", help="fixture directory to recompute and compare, writing nothing")
    ap.add_argument("--model-dir", action="append",
                    help="model folder (repeatable); default: efficientnet-lite0 for images, "
                         f"{', '.join(FIXTURE_MODELS)} for --out/--check")
    args = ap.parse_args()

    if args.model_dir:
        dirs = args.model_dir
    elif args.out or args.check:
        dirs = [os.path.join(REPO_ROOT, "models", m) for m in FIXTURE_MODELS]
    else:
        dirs = [MODEL_DIR]
    models = [Model(d) for d in dirs]
    for path in args.images:
        for model in models:
            _, _, info = model.describe(path)
            print(path, model.version, json.dumps(info))
    status = 0
    for model in models:
        if args.out:
            generate(args.out, model, check=False)
        if args.check:
            changed = generate(args.check, model, check=True)
            if changed:
                print("DIFFERS: " + ", ".join(changed), file=sys.stderr)
                status = 1
            else:
                print(f"OK: {model.version} fixtures match")
    if not (args.images or args.out or args.check):
        ap.print_help()
    return status


if __name__ == "__main__":
    sys.exit(main())
