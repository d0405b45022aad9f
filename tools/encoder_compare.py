#!/usr/bin/env python3
"""Side by side: vitrine's Candle encoder against onnxruntime, same network, same inputs, one run.

The ONNX model is built here from the same `models/efficientnet-lite0/model.safetensors`
(sha256 checked against manifest.json), with BatchNorm folded into the convolutions and the
TensorFlow "same" padding written as explicit asymmetric Conv pads; the block layout comes
from tools/reference_features.py, the independent numpy implementation. No torch needed.

Inputs: up to --images catalogue images from data/images, turned into 224x224 RGB PNGs
(shorter side to 224, centre crop) under tools/.work/encoder-inputs. vitrine takes a 224x224
image as it is, so both engines get bit-identical input tensors; what is compared is the
network, not the resizing.

Prints, for each batch size: images/s of each engine (alternating rounds, the best round of
each kept), the ratio vitrine / onnxruntime, and how far apart the pooled 1280-d features are
(max abs difference and min cosine) to show both compute the same thing.

numpy, pillow, onnx and onnxruntime are pip-installed into tools/.work/venv on first use.

Usage: python3 tools/encoder_compare.py [--threads N] [--seconds 10] [--rounds 2] [--batches 1,32]
(--threads sets both engines: onnxruntime's intra-op threads and vitrine's RAYON_NUM_THREADS.)
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_deps  # noqa: E402

venv_deps.ensure(["numpy", "PIL", "onnx", "onnxruntime"], ["numpy", "pillow", "onnx", "onnxruntime"])

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

import reference_features as ref  # noqa: E402  (the numpy reference: weights, layout, padding)

REPO = ref.REPO_ROOT
WORK = os.path.join(REPO, "tools", ".work")
MODEL_DIR = ref.MODEL_DIR
SIZE = ref.INPUT_SIZE


# ----------------------------------------------------------------------------- ONNX graph

class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, stem):
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem, array):
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def conv_bn(self, x, w, weight, bn, stride, size, group=1, act=True):
        """Conv (TF same padding at this spatial size) with BatchNorm folded in, then ReLU6."""
        scale = w[bn + ".weight"] / np.sqrt(w[bn + ".running_var"] + ref.BN_EPS)
        shift = w[bn + ".bias"] - w[bn + ".running_mean"] * scale
        kernel = w[weight] * scale[:, None, None, None]
        k = kernel.shape[2]
        out, before, after = ref.same_pad(size, k, stride)
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", kernel), self.const("b", shift)], [y],
            kernel_shape=[k, k], strides=[stride, stride], pads=[before, before, after, after],
            group=group))
        if act:
            z = self.name("relu6")
            self.nodes.append(helper.make_node("Clip", [y, self.lo, self.hi], [z]))
            y = z
        return y, out


def build_onnx(path):
    w, manifest = ref.load_model()
    cfg = ref.block_config(w)
    g = Graph()
    g.lo, g.hi = g.const("zero", np.array(0.0)), g.const("six", np.array(6.0))
    x, size = g.conv_bn("x", w, "_conv_stem.weight", "_bn0", 2, SIZE)
    for i, (cin, expand, _k, stride, cout) in enumerate(cfg):
        p = f"_blocks.{i}."
        inp = x
        if expand is not None:
            x, _ = g.conv_bn(x, w, p + "_expand_conv.weight", p + "_bn0", 1, size)
        channels = w[p + "_depthwise_conv.weight"].shape[0]
        x, size = g.conv_bn(x, w, p + "_depthwise_conv.weight", p + "_bn1", stride, size, group=channels)
        x, _ = g.conv_bn(x, w, p + "_project_conv.weight", p + "_bn2", 1, size, act=False)
        if stride == 1 and cin == cout:
            y = g.name("add")
            g.nodes.append(helper.make_node("Add", [x, inp], [y]))
            x = y
    x, _ = g.conv_bn(x, w, "_conv_head.weight", "_bn1", 1, size)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    g.nodes.append(helper.make_node("Flatten", ["gap"], ["pooled"], axis=1))
    dim = manifest["dim"]
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0_pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", dim])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return manifest


# ----------------------------------------------------------------------------- inputs

def prepare_inputs(limit):
    out_dir = os.path.join(WORK, "encoder-inputs")
    os.makedirs(out_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(REPO, "data", "images", "*")))
    # Photos first (the drawings are many and alike), then drawings to fill up.
    sources.sort(key=lambda p: os.path.basename(p).startswith("openmoji"))
    paths, tensors = [], []
    for src in sources[:limit]:
        img = Image.open(src)
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.split()[3])
        img = img.convert("RGB")
        scale = SIZE / min(img.size)
        resized = img.resize((max(SIZE, round(img.width * scale)), max(SIZE, round(img.height * scale))),
                             Image.BICUBIC)
        left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
        img = resized.crop((left, top, left + SIZE, top + SIZE))
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + "_224.png")
        img.save(dst)
        paths.append(dst)
        px = np.asarray(img, dtype=np.float32)
        tensors.append(((px - ref.MEAN) / ref.STD).transpose(2, 0, 1))
    return paths, np.stack(tensors).astype(np.float32)


# ----------------------------------------------------------------------------- engines

def run_vitrine(paths, batches, seconds, features_out, threads):
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "encoder_bench", "--",
           "--model", MODEL_DIR, "--batches", ",".join(map(str, batches)),
           "--seconds", str(seconds)]
    if features_out:
        cmd += ["--features-out", features_out]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd + paths, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1])["images_per_sec"].items()}


def run_ort(session, inputs, batches, seconds):
    rates = {}
    for batch in batches:
        reps = -(-max(batch, len(inputs)) // len(inputs))
        data = np.concatenate([inputs] * reps)[: max(batch, len(inputs))]
        chunks = [data[i:i + batch] for i in range(0, len(data) - batch + 1, batch)]
        for c in chunks:
            session.run(["pooled"], {"x": c})
        images, start = 0, time.perf_counter()
        while images == 0 or time.perf_counter() - start < seconds:
            for c in chunks:
                session.run(["pooled"], {"x": c})
                images += len(c)
        rates[batch] = images / (time.perf_counter() - start)
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="how many catalogue images to use")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing per engine, batch and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count()),
                    help="threads of each engine: onnxruntime's intra-op threads and vitrine's RAYON_NUM_THREADS "
                         "(default: $RAYON_NUM_THREADS, else every CPU)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.makedirs(WORK, exist_ok=True)

    onnx_path = os.path.join(WORK, "efficientnet-lite0.onnx")
    manifest = build_onnx(onnx_path)
    paths, inputs = prepare_inputs(args.images)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    print(f"{len(paths)} images 224x224; onnxruntime {ort.__version__}, {args.threads} intra-op threads; "
          f"vitrine: candle CPU, rayon threads = {args.threads}; "
          f"{os.cpu_count()} CPUs", flush=True)

    # Same network? Compare pooled features on identical inputs.
    feats_path = os.path.join(WORK, "encoder-vitrine-features.f32")
    run_vitrine(paths, [1], 0.0, feats_path, args.threads)
    ours = np.fromfile(feats_path, dtype="<f4").reshape(len(paths), manifest["dim"])
    theirs = np.concatenate([session.run(["pooled"], {"x": inputs[i:i + 8]})[0] for i in range(0, len(inputs), 8)])
    cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    print(f"pooled features, vitrine vs onnxruntime: max |diff| {np.abs(ours - theirs).max():.2e}, "
          f"min cosine {cos.min():.8f}", flush=True)

    best = {"vitrine": {}, "onnxruntime": {}}
    for r in range(args.rounds):
        for engine in ("vitrine", "onnxruntime"):
            if engine == "vitrine":
                rates = run_vitrine(paths, batches, args.seconds, None, args.threads)
            else:
                rates = run_ort(session, inputs, batches, args.seconds)
            for b, v in rates.items():
                best[engine][b] = max(best[engine].get(b, 0.0), v)
            print(f"round {r + 1} {engine:12s} " + "  ".join(f"batch {b}: {v:7.1f} img/s" for b, v in rates.items()),
                  flush=True)

    print("\nbatch  vitrine img/s  onnxruntime img/s  ratio (vitrine / onnxruntime)")
    for b in batches:
        v, o = best["vitrine"][b], best["onnxruntime"][b]
        print(f"{b:5d}  {v:13.1f}  {o:17.1f}  {v / o:6.2f}x")


if __name__ == "__main__":
    main()
