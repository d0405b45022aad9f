#!/usr/bin/env python3
"""Side-by-side ANN comparison: vitrine's segment search vs hnswlib and faiss HNSW, one run,
same data.

Generates structured data (a low-dimensional Gaussian latent through a fixed random linear
map, plus noise, L2-normalised; seeded), computes exact top-k with numpy, builds both indexes
with the same M / ef_construction (hnswlib space 'ip' = 1 - dot, vitrine = dot), then for each
ef measures single-thread QPS and recall@k for both and prints a table plus the QPS ratio at
matched recall (each curve interpolated at the recall targets).

vitrine runs through `cargo run --release --example ann_bench` (a Rust loop over queries,
one at a time); hnswlib runs one batched `knn_query` with set_num_threads(1) (its C++ loop,
no per-query Python overhead). Builds use all cores for both; searches use one thread.

numpy and hnswlib are installed into a venv under tools/.work/ when missing (hnswlib builds
from source, about 30 s).

Usage: python3 tools/ann_compare.py [--n 100000 --dim 256 --latent 16 --noise 0.3 ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "tools" / ".work"


def ensure_deps():
    """Re-executes this script inside tools/.work/venv unless numpy and hnswlib import here."""
    sys.path.insert(0, str(ROOT / "tools"))
    import venv_deps

    venv_deps.ensure(["numpy", "hnswlib", "faiss"], ["numpy", "hnswlib", "faiss-cpu"], " (hnswlib builds from source)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="base vectors")
    p.add_argument("--nq", type=int, default=1000, help="queries")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--latent", type=int, default=16, help="intrinsic dimension")
    p.add_argument("--noise", type=float, default=0.3, help="noise std relative to the signal")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", default="10,16,24,32,48,64,96,128,192,256,384,512")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--passes", type=int, default=3, help="timed passes per ef; the fastest counts")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds per engine")
    p.add_argument("--targets", default="0.90,0.95,0.98,0.99")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json-out", type=Path, help="also write all results here")
    return p.parse_args()


def generate(args):
    import numpy as np

    rng = np.random.default_rng(args.seed)
    proj = rng.standard_normal((args.latent, args.dim)).astype(np.float32)
    scale = args.noise * np.sqrt(args.latent)

    def rows(count):
        out = np.empty((count, args.dim), dtype=np.float32)
        for start in range(0, count, 50_000):
            c = min(50_000, count - start)
            z = rng.standard_normal((c, args.latent)).astype(np.float32)
            x = z @ proj + scale * rng.standard_normal((c, args.dim)).astype(np.float32)
            out[start : start + c] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return rows(args.n), rows(args.nq)


def ground_truth(base, queries, k):
    import numpy as np

    gt = np.empty((len(queries), k), dtype=np.uint32)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        gt[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return gt


def recall(found, gt):
    hits = sum(len(set(map(int, f)) & set(map(int, g))) for f, g in zip(found, gt))
    return hits / gt.size


def vitrine_cmd(args, paths, efs, seg):
    return [
        str(ROOT / "target" / "release" / "examples" / "ann_bench"),
        "--dim", str(args.dim),
        "--base", str(paths["base"]),
        "--queries", str(paths["queries"]),
        "--gt", str(paths["gt"]),
        "--k", str(args.k),
        "--m", str(args.m),
        "--ef-construction", str(args.ef_construction),
        "--ef", ",".join(map(str, efs)),
        "--passes", str(args.passes),
        "--segment", str(seg),
    ]


def run_vitrine(args, paths, efs, seg):
    """Builds the segment on the first call (ann_bench reuses an existing file), then
    measures every ef."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.build_threads))
    t = time.perf_counter()
    out = subprocess.run(vitrine_cmd(args, paths, efs, seg), check=True, capture_output=True, text=True, env=env)
    res = json.loads(out.stdout)
    res["wall_secs"] = time.perf_counter() - t
    return res


def build_hnswlib(args, base):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=args.dim)
    index.init_index(max_elements=len(base), ef_construction=args.ef_construction, M=args.m, random_seed=args.seed)
    index.set_num_threads(args.build_threads)
    t = time.perf_counter()
    index.add_items(base, list(range(len(base))))
    build_secs = time.perf_counter() - t
    index.set_num_threads(1)
    return index, build_secs


def measure(args, set_ef, search, queries, gt, efs):
    """Per ef: the best of `args.passes` timed runs of `search(queries)` (a single-thread
    batched query loop returning the labels), as QPS by wall clock and by this thread's CPU
    time, and recall@k."""
    points = []
    for ef in efs:
        set_ef(max(ef, args.k))
        best = best_cpu = float("inf")
        for _ in range(max(1, args.passes)):
            t, c = time.perf_counter(), time.thread_time()
            labels = search(queries)
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.thread_time() - c)
        points.append({"ef": ef, "qps": len(queries) / best, "cpu_qps": len(queries) / best_cpu,
                       "recall": recall(labels, gt)})
    return points


def run_hnswlib(args, index, queries, gt, efs):
    # With num_threads=1 hnswlib runs the query loop in this thread.
    return measure(args, index.set_ef, lambda q: index.knn_query(q, k=args.k, num_threads=1)[0], queries, gt, efs)


def build_faiss(args, base):
    import faiss

    index = faiss.IndexHNSWFlat(args.dim, args.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.ef_construction
    faiss.omp_set_num_threads(args.build_threads)
    t = time.perf_counter()
    index.add(base)
    build_secs = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    return index, build_secs


def run_faiss(args, index, queries, gt, efs):
    def set_ef(ef):
        index.hnsw.efSearch = ef

    return measure(args, set_ef, lambda q: index.search(q, args.k)[1], queries, gt, efs)


def merge_best(rounds):
    """Per ef, the best QPS (wall and CPU) over the rounds; recall is deterministic."""
    best = [dict(p) for p in rounds[0]]
    for points in rounds[1:]:
        for b, p in zip(best, points):
            b["qps"] = max(b["qps"], p["qps"])
            b["cpu_qps"] = max(b["cpu_qps"] or 0.0, p["cpu_qps"] or 0.0) or None
    return best


def qps_at(points, target):
    """QPS at `target` recall, interpolated (log QPS, linear recall) between the measured
    points that bracket it; None when the curve never reaches it."""
    import math

    pts = sorted((p["recall"], p["qps"]) for p in points if p["qps"])
    # Pareto front: for each recall keep the fastest point at that recall or higher.
    for i in range(len(pts)):
        r, _ = pts[i]
        pts[i] = (r, max(q for rr, q in pts if rr >= r))
    if not pts or pts[-1][0] < target:
        return None
    if pts[0][0] >= target:
        return pts[0][1]
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 <= target <= r1:
            if r1 == r0:
                return max(q0, q1)
            w = (target - r0) / (r1 - r0)
            return math.exp(math.log(q0) * (1 - w) + math.log(q1) * w)
    return None


def main():
    ensure_deps()
    import numpy as np

    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    efs = [int(x) for x in args.ef.split(",")]
    targets = [float(x) for x in args.targets.split(",")]
    data_dir = WORK / f"ann-{args.n}x{args.dim}-l{args.latent}-s{args.seed}"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"dir": data_dir, "base": data_dir / "base.f32", "queries": data_dir / "queries.f32", "gt": data_dir / "gt.u32"}

    t = time.perf_counter()
    base, queries = generate(args)
    gt = ground_truth(base, queries, args.k)
    base.tofile(paths["base"])
    queries.tofile(paths["queries"])
    gt.tofile(paths["gt"])
    print(f"data: {args.n} x {args.dim} (latent {args.latent}, noise {args.noise}), {args.nq} queries, "
          f"exact top-{args.k} in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "ann_bench"], cwd=ROOT, check=True)
    seg = data_dir / "vitrine.vseg"
    if seg.exists():
        seg.unlink()
    t = time.perf_counter()
    index, hn_build = build_hnswlib(args, base)
    print(f"hnswlib built in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    findex, fa_build = build_faiss(args, base)
    print(f"faiss built in {fa_build:.1f}s", file=sys.stderr)
    rounds = {"vitrine": [], "hnswlib": [], "faiss": []}
    vt_build = None
    try:
        # Rounds rotate the engines so that a burst of load from other processes does not
        # land on one engine only; each ef keeps its best round.
        names = ["vitrine", "hnswlib", "faiss"]
        for r in range(max(1, args.rounds)):
            for engine in names[r % 3:] + names[: r % 3]:
                t = time.perf_counter()
                if engine == "vitrine":
                    res = run_vitrine(args, paths, efs, seg)
                    vt_build = vt_build or res["build"]
                    rounds[engine].append(res["points"])
                elif engine == "hnswlib":
                    rounds[engine].append(run_hnswlib(args, index, queries, gt, efs))
                else:
                    rounds[engine].append(run_faiss(args, findex, queries, gt, efs))
                print(f"round {r + 1}: {engine} done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    finally:
        if seg.exists():
            seg.unlink()
    res = {
        "vitrine": {"build": vt_build, "points": merge_best(rounds["vitrine"]), "rounds": rounds["vitrine"]},
        "hnswlib": {"build": {"secs": hn_build}, "points": merge_best(rounds["hnswlib"]), "rounds": rounds["hnswlib"]},
        "faiss": {"build": {"secs": fa_build}, "points": merge_best(rounds["faiss"]), "rounds": rounds["faiss"]},
    }
    vt = res["vitrine"]

    print(f"\n{args.n} x {args.dim}, latent {args.latent}, noise {args.noise}, M={args.m}, "
          f"ef_construction={args.ef_construction}, k={args.k}, {args.nq} queries, single-thread search")
    print(f"build ({args.build_threads} threads): vitrine {vt['build']['secs']:.1f}s "
          f"(incl. write+verify, self-recall {vt['build']['self_recall']:.3f}), hnswlib {hn_build:.1f}s, "
          f"faiss HNSW {fa_build:.1f}s")
    print("\nQPS = queries per wall-clock second; cpu = per second of the search thread's CPU time")
    print("(less sensitive to other processes competing for the cores).")
    head = " | ".join(f"{n + ' QPS':>13} {'cpu':>7} {'recall':>7}" for n in ("vitrine", "hnswlib", "faiss"))
    print(f"\n{'ef':>5} | {head}")
    print("-" * (8 + 3 * 32))
    num = lambda x, w: f"{x:>{w}.0f}" if x else f"{'n/a':>{w}}"  # noqa: E731
    for pts in zip(*(res[n]["points"] for n in ("vitrine", "hnswlib", "faiss"))):
        cells = " | ".join(f"{num(p['qps'], 13)} {num(p['cpu_qps'], 7)} {p['recall']:>7.4f}" for p in pts)
        print(f"{pts[0]['ef']:>5} | {cells}")
    ratios = {}
    for key, title in (("qps", "wall-clock"), ("cpu_qps", "CPU time")):
        print(f"\nmatched recall ({title}): QPS interpolated on each curve")
        print(f"{'recall':>7} | {'vitrine':>9} | {'hnswlib':>9} | {'faiss':>9} | {'vs hnswlib':>10} | {'vs faiss':>8}")
        print("-" * 70)
        for r in targets:
            q = {n: qps_at([{"recall": p["recall"], "qps": p[key]} for p in res[n]["points"]], r) for n in res}
            rh = q["vitrine"] / q["hnswlib"] if q["vitrine"] and q["hnswlib"] else None
            rf = q["vitrine"] / q["faiss"] if q["vitrine"] and q["faiss"] else None
            ratios[f"{key}@{r}"] = {"hnswlib": rh, "faiss": rf}
            cell = lambda x, w: f"{x:>{w}.0f}" if x else f"{'n/a':>{w}}"  # noqa: E731
            rc = lambda x, w: f"{x:>{w}.2f}" if x else f"{'n/a':>{w}}"  # noqa: E731
            print(f"{r:>7.2f} | {cell(q['vitrine'], 9)} | {cell(q['hnswlib'], 9)} | {cell(q['faiss'], 9)} | "
                  f"{rc(rh, 10)} | {rc(rf, 8)}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             **res, "ratio_at_recall": ratios}, indent=2))


if __name__ == "__main__":
    main()
