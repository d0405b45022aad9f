#!/usr/bin/env python3
"""Build vitrine's bundled sample catalogue (data/) from images that ship inside
registry packages: scikit-image and scikit-learn wheels (PyPI) and the openmoji
npm package. Nothing is fetched from a website or model hub.

Usage (from the repository root):

    python3 tools/make_sample_catalog.py [--skimage-wheel PATH] [--sklearn-wheel PATH]
                                         [--openmoji-tgz PATH] [--work DIR] [--out DIR]

Missing packages are fetched into --work (default tools/.work/, gitignored) with
`pip download --no-deps` and `npm pack`, at the pinned versions below.

Needs: Python 3.9+, Pillow (`pip install Pillow`), pip, npm, and `rsvg-convert`
(Debian/Ubuntu: `apt-get update && apt-get install -y librsvg2-bin`).

The output is deterministic for a given Pillow and librsvg version: selection is
sorted and every parameter is fixed. Everything the script writes under --out
(catalog.jsonl, catalog.csv, images/, queries/, bad/, LICENSE.md, README.md) is replaced
on each run.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover - environment hint
    sys.exit("Pillow is required: pip install Pillow")

REPO = Path(__file__).resolve().parent.parent

SKIMAGE_REQ = "scikit-image==0.26.0"
SKLEARN_REQ = "scikit-learn==1.9.1"
OPENMOJI_REQ = "openmoji@17.0.0"
# Any cp311 manylinux x86_64 wheel carries the same data files.
PIP_PLATFORM_ARGS = [
    "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
    "--abi", "cp311", "--platform", "manylinux_2_28_x86_64",
    "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
]

PHOTO_MAX_SIDE = 512
JPEG_QUALITY = 90
EMOJI_SIZE = 256

# ---------------------------------------------------------------------------
# scikit-image photos. `evidence` must occur verbatim in the docstring of the
# loader function in skimage/data/_fetchers.py of the wheel; it is the licence
# or provenance statement we rely on, and it is quoted in LICENSE.md.
# Skipped on purpose (see LICENSE.md "Not used"): synthetic or tiny arrays
# (chessboard_*, color, phantom, logo, text, microaneurysms, multipage*,
# no_time_for_that_tiny.gif, *.npy/*.npz) and moon.png/page.png, whose
# docstrings state neither licence nor source.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SkPhoto:
    file: str
    func: str
    title: str
    category: str
    licence: str
    credit: str
    evidence: str


SKIMAGE_PHOTOS = [
    SkPhoto("astronaut.png", "astronaut", "Astronaut Eileen Collins, NASA portrait", "portrait",
            "public-domain", "NASA (Great Images database)",
            "No known copyright restrictions, released into the public domain."),
    SkPhoto("brick.png", "brick", "Brick wall texture", "texture", "CC0-1.0",
            "CC0Textures (Bricks25)",
            "licensed\n    under the Creative Commons CC0 License."),
    SkPhoto("camera.png", "camera", "Photographer with camera on tripod", "portrait", "CC0-1.0",
            "Lav Varshney", "CC0 by the photographer (Lav Varshney)."),
    SkPhoto("cell.png", "cell", "Cell floating in saline, quantitative phase image", "microscopy",
            "CC0-1.0", "Paul Müller et al. (Optics Express 26(8), 2018)",
            "This image is CC0, dedicated to the public domain."),
    SkPhoto("chelsea.png", "chelsea", "Chelsea the cat", "animal", "CC0-1.0",
            "Stefan van der Walt", "CC0 by the photographer (Stefan van der Walt)."),
    SkPhoto("clock_motion.png", "clock", "Wall clock, motion blurred", "household",
            "public-domain", "Stefan van der Walt",
            "Released into the public domain by the photographer (Stefan van der Walt)."),
    SkPhoto("coffee.png", "coffee", "Cup of coffee on a wooden table", "food-drink", "CC0-1.0",
            "Rachel Michetti, courtesy of Pikolo Espresso Bar",
            "CC0 by the photographer (Rachel Michetti)."),
    SkPhoto("coins.png", "coins", "Greek coins from Pompeii", "collectible",
            "no-known-restrictions", "Brooklyn Museum Collection",
            "No known copyright restrictions."),
    SkPhoto("grass.png", "grass", "Grass texture", "texture", "CC0-1.0",
            "linolafett (DeviantArt, Grass-01)",
            "and licensed under the Creative Commons CC0 License."),
    SkPhoto("gravel.png", "gravel", "Gravel texture", "texture", "CC0-1.0",
            "CC0Textures (Gravel04)",
            "licensed under the Creative Commons CC0 License."),
    SkPhoto("horse.png", "horse", "Horse silhouette (clip art)", "animal", "CC0-1.0",
            "Andreas Preuss (marauder), openclipart",
            "CC0 given by owner (Andreas Preuss (marauder))."),
    SkPhoto("hubble_deep_field.jpg", "hubble_deep_field", "Hubble eXtreme Deep Field",
            "astronomy", "public-domain", "NASA (HubbleSite)",
            "The image was captured by NASA and `may be freely used in the public domain"),
    SkPhoto("ihc.png", "immunohistochemistry", "Colonic glands, immunohistochemical staining",
            "microscopy", "no-known-restrictions",
            "Center for Microscopy And Molecular Imaging (CMMI)",
            "No known copyright restrictions."),
    SkPhoto("motorcycle_left.png", "stereo_motorcycle", "Motorcycle in a workshop (left view)",
            "vehicle", "unstated",
            "Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014)",
            "The two images are part of the Middlebury 2014 stereo benchmark."),
    SkPhoto("retina.jpg", "retina", "Fundus photograph of a human retina", "medical", "CC0-1.0",
            "Mikael Häggström (Wikimedia Commons)",
            "This file is made available under the Creative Commons CC0 1.0 Universal"),
    SkPhoto("rocket.jpg", "rocket", "Falcon 9 launch carrying DSCOVR", "vehicle",
            "public-domain", "SpaceX",
            "The image was captured by SpaceX and `released in the public domain"),
]

# The other half of the stereo pair is a query, not a catalogue item.
SKIMAGE_QUERY_MOTORCYCLE = "motorcycle_right.png"


@dataclass(frozen=True)
class SklPhoto:
    file: str
    sku: str
    title: str
    category: str
    credit: str


SKLEARN_PHOTOS = [
    SklPhoto("china.jpg", "SKL-CHINA", "Chinese temple roofs", "architecture",
             "danielbuechele (Flickr)"),
    SklPhoto("flower.jpg", "SKL-FLOWER", "Flower close-up", "plant",
             "vultilion (Flickr); README names danielbuechele"),
]
SKLEARN_LICENCE = "CC-BY-2.0"

# ---------------------------------------------------------------------------
# openmoji selection
# ---------------------------------------------------------------------------
OPENMOJI_SUBGROUPS = [
    "clothing", "computer", "drink", "food-fruit", "food-prepared", "food-sweet",
    "food-vegetable", "household", "light-video", "musical-instrument", "office",
    "sport", "tool",
]
# Clothing is kept whole (the most shop-like subgroup); the others are thinned to
# this many, evenly spaced over their Unicode order.
OPENMOJI_UNCAPPED = {"clothing"}
OPENMOJI_PER_SUBGROUP = 9
# Near-identical to another emoji in the same subgroup, or not a product.
OPENMOJI_EXCLUDE = {
    # near-duplicates (kept twin in the comment)
    "1F34B-200D-1F7E9": "lime (lemon)",
    "1F34F": "green apple (red apple)",
    "1F37B": "clinking beer mugs (beer mug)",
    "1F942": "clinking glasses (wine glass)",
    "1FAAB": "low battery (battery)",
    "1F4C0": "dvd (optical disk)",
    "1F4C2": "open file folder (file folder)",
    "1F4C6": "tear-off calendar (calendar)",
    "1F5D3": "spiral calendar (calendar)",
    "1F4CD": "round pushpin (pushpin)",
    "1F587": "linked paperclips (paperclip)",
    "1F50E": "magnifying glass tilted right (tilted left)",
    "1F4F8": "camera with flash (camera)",
    "2692": "hammer and pick (hammer, pick)",
    "1F6E0": "hammer and wrench (hammer, wrench)",
    "2694": "crossed swords (dagger)",
    "26D3-FE0F-200D-1F4A5": "broken chain (chains)",
    "1F96B": "canned food (near-blank can)",
    # symbols, charts, weapons, places, not things a shop sells
    "1F4C8": "chart increasing (symbol)",
    "1F4C9": "chart decreasing (symbol)",
    "1F4CA": "bar chart (symbol)",
    "1F517": "link (symbol)",
    "1F4A3": "bomb",
    "1F6D7": "elevator",
    "1FAE7": "bubbles",
    "26F3": "flag in hole",
    "1F945": "goal net",
}
SKINTONE_CODES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")

OPENMOJI_ATTRIBUTION = (
    "All emojis designed by OpenMoji – the open-source emoji and icon project. "
    "License: CC BY-SA 4.0"
)

# Query images: (openmoji hexcode re-rendered in colour on a coloured background,
# openmoji hexcode rendered from the black line-art set).
QUERY_EMOJI_COLOUR = "1F455"  # t-shirt
QUERY_EMOJI_BLACK = "1F3B8"  # guitar
# Reasonable runners-up for those two queries (kept only if selected).
QUERY_COLOUR_ALSO = ["1F45A", "1F457", "1F454", "1F97C", "1F9E5", "1F9BA", "1F458", "1F3BD"]
QUERY_BLACK_ALSO = ["1F3BB", "1FA95"]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=cwd)


def find_or_fetch_wheel(given: str | None, work: Path, req: str, prefix: str) -> Path:
    if given:
        return Path(given)
    version = req.split("==")[1]
    found = sorted(work.glob(f"{prefix}-{version}-cp311-*.whl"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", *PIP_PLATFORM_ARGS,
             req, "-d", str(work)])
        found = sorted(work.glob(f"{prefix}-{version}-cp311-*.whl"))
    if not found:
        sys.exit(f"pip download of {req} left no wheel in {work}")
    return found[0]


def find_or_fetch_openmoji(given: str | None, work: Path) -> Path:
    if given:
        return Path(given)
    version = OPENMOJI_REQ.split("@")[1]
    tgz = work / f"openmoji-{version}.tgz"
    if not tgz.exists():
        run(["npm", "pack", "--silent", OPENMOJI_REQ, "--pack-destination", str(work)])
    if not tgz.exists():
        sys.exit(f"npm pack {OPENMOJI_REQ} left no {tgz}")
    return tgz


@dataclass
class Item:
    sku: str
    image: str  # relative to the catalogue file
    title: str
    category: str
    source: str
    licence: str
    credit: str
    data: bytes = field(repr=False)


def photo_bytes(raw: bytes) -> tuple[bytes, str]:
    """Downscale so the longer side is <= PHOTO_MAX_SIDE; JPEG q90, or PNG when the
    image has transparency. Returns (bytes, extension)."""
    im = Image.open(io.BytesIO(raw))
    im.load()
    im = ImageOps.exif_transpose(im)
    if max(im.size) > PHOTO_MAX_SIDE:
        im.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im.convert("RGBA" if im.mode != "LA" else "LA").save(out, "PNG", optimize=True)
        return out.getvalue(), "png"
    im = im.convert("L" if im.mode in ("L", "1", "I", "I;16") else "RGB")
    im.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue(), "jpg"


def skimage_docstrings(fetchers_src: str) -> dict[str, str]:
    tree = ast.parse(fetchers_src)
    return {
        n.name: ast.get_docstring(n, clean=False) or ""
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
    }


def skimage_items(wheel: Path) -> tuple[list[Item], dict[str, str], bytes]:
    items = []
    quotes = {}
    with zipfile.ZipFile(wheel) as z:
        docs = skimage_docstrings(z.read("skimage/data/_fetchers.py").decode())
        for p in SKIMAGE_PHOTOS:
            doc = docs.get(p.func, "")
            if p.evidence not in doc:
                sys.exit(f"scikit-image: licence text for {p.file} not found in {p.func}() "
                         f"docstring; re-check before shipping: {p.evidence!r}")
            quotes[p.file] = " ".join(p.evidence.split())
            data, ext = photo_bytes(z.read(f"skimage/data/{p.file}"))
            stem = p.file.rsplit(".", 1)[0]
            items.append(Item(
                sku="SKIMG-" + stem.upper().replace("_", "-"),
                image=f"images/skimage-{stem.replace('_', '-')}.{ext}",
                title=p.title, category=p.category, source="skimage",
                licence=p.licence, credit=p.credit + ", via scikit-image", data=data))
        motorcycle_right = z.read(f"skimage/data/{SKIMAGE_QUERY_MOTORCYCLE}")
    return items, quotes, motorcycle_right


def sklearn_items(wheel: Path) -> tuple[list[Item], str]:
    items = []
    with zipfile.ZipFile(wheel) as z:
        readme = z.read("sklearn/datasets/images/README.txt").decode()
        for p in SKLEARN_PHOTOS:
            if f"Image: {p.file}" not in readme:
                sys.exit(f"scikit-learn: {p.file} not described in images/README.txt")
            data, ext = photo_bytes(z.read(f"sklearn/datasets/images/{p.file}"))
            stem = p.file.rsplit(".", 1)[0]
            items.append(Item(
                sku=p.sku, image=f"images/sklearn-{stem}.{ext}", title=p.title,
                category=p.category, source="sklearn", licence=SKLEARN_LICENCE,
                credit=p.credit + ", via scikit-learn", data=data))
    if "creativecommons.org/licenses/by/2.0" not in readme:
        sys.exit("scikit-learn: images/README.txt no longer names CC BY 2.0; re-check")
    return items, readme


def rsvg_png(svg: bytes, size: int) -> bytes:
    """Render an SVG to a size x size PNG with its transparent background, then
    re-encode with Pillow so the bytes do not depend on rsvg's PNG writer."""
    if shutil.which("rsvg-convert") is None:
        sys.exit("rsvg-convert not found: apt-get update && apt-get install -y librsvg2-bin")
    out = subprocess.run(
        ["rsvg-convert", "-w", str(size), "-h", str(size), "-f", "png"],
        input=svg, capture_output=True, check=True).stdout
    im = Image.open(io.BytesIO(out))
    im.load()
    buf = io.BytesIO()
    im.convert("RGBA").save(buf, "PNG", optimize=True)
    return buf.getvalue()


def openmoji_selection(meta: list[dict]) -> list[dict]:
    chosen = []
    for sub in OPENMOJI_SUBGROUPS:
        elig = sorted(
            (e for e in meta
             if e["subgroups"] == sub
             and e["group"] not in ("flags", "extras-openmoji", "extras-unicode")
             and not e.get("skintone")
             and not e.get("skintone_base_hexcode")
             and not any(c in e["hexcode"] for c in SKINTONE_CODES)
             and e["hexcode"] not in OPENMOJI_EXCLUDE),
            key=lambda e: (int(e["order"]), e["hexcode"]))
        n = len(elig)
        k = n if sub in OPENMOJI_UNCAPPED else min(OPENMOJI_PER_SUBGROUP, n)
        # Evenly spaced over the subgroup's Unicode order, so each subgroup keeps
        # its variety rather than only its first k entries.
        chosen.extend(elig[(i * n) // k] for i in range(k))
    return chosen


def openmoji_items(tgz: Path) -> tuple[list[Item], dict[str, bytes], str]:
    with tarfile.open(tgz) as t:
        meta = json.load(t.extractfile("package/data/openmoji.json"))
        version = json.load(t.extractfile("package/package.json"))["version"]

        def svg(kind: str, hexcode: str) -> bytes:
            return t.extractfile(f"package/{kind}/svg/{hexcode}.svg").read()

        items = []
        for e in openmoji_selection(meta):
            h = e["hexcode"]
            items.append(Item(
                sku=f"OM-{h}", image=f"images/openmoji-{h}.png",
                title=e["annotation"], category=e["subgroups"], source="openmoji",
                licence="CC-BY-SA-4.0",
                credit=f"OpenMoji ({e['openmoji_author']})", data=rsvg_png(svg("color", h),
                                                                         EMOJI_SIZE)))
        query_svgs = {
            "colour": svg("color", QUERY_EMOJI_COLOUR),
            "black": svg("black", QUERY_EMOJI_BLACK),
        }
    return items, query_svgs, version


def dedup(items: list[Item]) -> list[Item]:
    seen: dict[str, str] = {}
    skus: set[str] = set()
    kept = []
    for it in items:
        if it.sku in skus:
            sys.exit(f"duplicate SKU generated: {it.sku}")
        skus.add(it.sku)
        digest = hashlib.sha256(it.data).hexdigest()
        if digest in seen:
            print(f"drop {it.sku}: same image bytes as {seen[digest]}", file=sys.stderr)
            continue
        seen[digest] = it.sku
        kept.append(it)
    return kept


def near_duplicate_report(items: list[Item]) -> None:
    """Print pairs whose 16x16 difference hashes are close, for a human to review."""
    def dhash(data: bytes) -> int:
        im = Image.open(io.BytesIO(data)).convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        g = Image.alpha_composite(bg, im).convert("L").resize((17, 16), Image.Resampling.BILINEAR)
        px = g.tobytes()
        bits = 0
        for r in range(16):
            for c in range(16):
                bits = (bits << 1) | (px[r * 17 + c] > px[r * 17 + c + 1])
        return bits

    hashes = [(it.sku, dhash(it.data)) for it in items]
    for i, (a, ha) in enumerate(hashes):
        for b, hb in hashes[i + 1:]:
            d = bin(ha ^ hb).count("1")
            if d <= 24:
                print(f"near-duplicate? {a} ~ {b} (dhash distance {d}/256)", file=sys.stderr)


# ---------------------------------------------------------------------------
# queries and bad inputs
# ---------------------------------------------------------------------------


def write_queries(out: Path, items: list[Item], motorcycle_right: bytes,
                  query_svgs: dict[str, bytes], coffee_png: bytes) -> None:
    q = out / "queries"
    q.mkdir(parents=True)
    skus = {it.sku for it in items}
    for needed in ("SKIMG-MOTORCYCLE-LEFT", "SKIMG-COFFEE",
                   f"OM-{QUERY_EMOJI_COLOUR}", f"OM-{QUERY_EMOJI_BLACK}"):
        if needed not in skus:
            sys.exit(f"query target {needed} is not in the catalogue")

    rows = []

    # 1. The right view of the stereo pair; the left one is in the catalogue.
    data, ext = photo_bytes(motorcycle_right)
    name = f"motorcycle-right.{ext}"
    (q / name).write_bytes(data)
    rows.append((name, "SKIMG-MOTORCYCLE-LEFT", [],
                 "right view of the Middlebury stereo pair; the catalogue holds the left view"))

    # 2. A rotated, off-centre crop of the coffee photo, made from the original.
    im = Image.open(io.BytesIO(coffee_png)).convert("RGB")
    w, h = im.size  # 600 x 400
    crop = im.crop((int(w * 0.12), int(h * 0.05), int(w * 0.80), int(h * 0.95)))
    crop = crop.rotate(12, resample=Image.Resampling.BICUBIC, expand=False,
                       fillcolor=(255, 255, 255))
    crop.thumbnail((320, 320), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=85, optimize=True)
    (q / "coffee-crop-rotated.jpg").write_bytes(buf.getvalue())
    rows.append(("coffee-crop-rotated.jpg", "SKIMG-COFFEE", [],
                 "coffee photo cropped to 68%x90%, rotated 12 degrees, 320 px wide"))

    # 3. The catalogue's t-shirt re-rendered at 160 px on a pale blue background.
    shirt = Image.open(io.BytesIO(rsvg_png(query_svgs["colour"], 160)))
    bg = Image.new("RGBA", (224, 224), (205, 225, 245, 255))
    bg.alpha_composite(shirt, (32, 32))
    buf = io.BytesIO()
    bg.convert("RGB").save(buf, "JPEG", quality=90, optimize=True)
    (q / f"openmoji-{QUERY_EMOJI_COLOUR}-on-blue.jpg").write_bytes(buf.getvalue())
    rows.append((f"openmoji-{QUERY_EMOJI_COLOUR}-on-blue.jpg", f"OM-{QUERY_EMOJI_COLOUR}",
                 [f"OM-{h}" for h in QUERY_COLOUR_ALSO if f"OM-{h}" in skus],
                 "the t-shirt emoji at 160 px on a pale blue 224 px square"))

    # 4. The black line-art version of the guitar (a different drawing style).
    guitar = Image.open(io.BytesIO(rsvg_png(query_svgs["black"], 256)))
    bg = Image.new("RGBA", guitar.size, (255, 255, 255, 255))
    bg.alpha_composite(guitar)
    buf = io.BytesIO()
    bg.convert("L").save(buf, "PNG", optimize=True)
    (q / f"openmoji-{QUERY_EMOJI_BLACK}-outline.png").write_bytes(buf.getvalue())
    rows.append((f"openmoji-{QUERY_EMOJI_BLACK}-outline.png", f"OM-{QUERY_EMOJI_BLACK}",
                 [f"OM-{h}" for h in QUERY_BLACK_ALSO if f"OM-{h}" in skus],
                 "OpenMoji's black outline drawing of the guitar on white; catalogue has the colour one"))

    with open(q / "expected.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for name, best, acceptable, how in rows:
            f.write(json.dumps({"query": name, "best": best,
                                "acceptable": sorted(set(acceptable) - {best}),
                                "how_made": how}, ensure_ascii=False) + "\n")

    readme = [
        "# Query images",
        "",
        "Real images that are NOT in the catalogue but show items that are. Made by",
        "`tools/make_sample_catalog.py`; `expected.jsonl` holds the same facts for tests",
        "(`best`: the SKU a good search ranks first; `acceptable`: other reasonable top hits).",
        "",
    ]
    for name, best, acceptable, how in rows:
        extra = f" (also fine near the top: {', '.join(acceptable)})" if acceptable else ""
        readme.append(f"- `{name}`: {how}. Good answer: `{best}` first{extra}.")
    readme += ["", "Licences: as for the source images (see ../LICENSE.md)."]
    (q / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")


def write_bad(out: Path, items: list[Item]) -> None:
    """A self-contained folder of deliberately broken inputs (no `..` paths)."""
    b = out / "bad"
    b.mkdir(parents=True)
    by_sku = {it.sku: it for it in items}
    ok1 = by_sku["OM-1F455"]
    ok2 = by_sku["SKIMG-COFFEE"]
    ok3 = by_sku["OM-1F3B8"]
    (b / "ok-1.png").write_bytes(ok1.data)
    small = Image.open(io.BytesIO(ok2.data))
    small.thumbnail((160, 160), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    ok2_small = buf.getvalue()
    (b / "ok-2.jpg").write_bytes(ok2_small)
    (b / "ok-3.png").write_bytes(ok3.data)

    # Truncated JPEG: cut half way between the start and the first SOS marker, so
    # the header segments themselves are incomplete and no decoder can use it.
    sos = ok2_small.find(b"\xff\xda")
    if sos <= 0:
        sys.exit("coffee JPEG has no SOS marker")
    corrupt = ok2_small[: sos // 2]
    (b / "corrupt.jpg").write_bytes(corrupt)
    try:
        Image.open(io.BytesIO(corrupt)).load()
    except Exception:  # noqa: BLE001 - any failure is the point
        pass
    else:
        sys.exit("bad/corrupt.jpg decodes; make it more broken")

    def row(sku: str, image: str, title: str) -> str:
        return json.dumps({"sku": sku, "image": image,
                           "attrs": {"title": title, "category": "test"}},
                          ensure_ascii=False)

    lines = [
        (row("BAD-OK-1", "ok-1.png", "valid row (t-shirt)"), "valid"),
        (row("BAD-OK-2", "ok-2.jpg", "valid row (coffee)"), "valid"),
        (row("BAD-MISSING", "missing.jpg", "image file does not exist"),
         "error: image path `missing.jpg` does not exist"),
        (row("BAD-CORRUPT", "corrupt.jpg", "truncated JPEG"),
         f"error: `corrupt.jpg` is the first {len(corrupt)} bytes of a JPEG (cut inside its headers) and cannot be decoded"),
        (row("BAD-OK-1", "ok-2.jpg", "duplicate of line 1's SKU"),
         "error: duplicate SKU `BAD-OK-1` (first seen on line 1)"),
        ('{"sku": "BAD-MALFORMED", "image": "ok-1.png", "attrs": {"title": "missing brace"}',
         "error: malformed JSON (the closing brace is missing)"),
        (row("", "ok-1.png", "empty sku"), "error: empty SKU"),
        (row("BAD-OK-3", "ok-3.png", "valid row after the errors (guitar)"), "valid"),
    ]
    with open(b / "catalog_with_errors.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for text, _ in lines:
            f.write(text + "\n")

    readme = [
        "# Deliberately bad inputs",
        "",
        "For ingest tests. Image paths are relative to this folder, like a real catalogue.",
        "`catalog_with_errors.jsonl` has 8 lines; 3 are valid (BAD-OK-1 from line 1,",
        "BAD-OK-2, BAD-OK-3) and 5 are broken in different ways. An ingest run should keep",
        "the valid items and report each broken line with its line number:",
        "",
        "| line | what | expected |",
        "|---|---|---|",
    ]
    for i, (text, why) in enumerate(lines, 1):
        sku = "BAD-MALFORMED" if i == 6 else json.loads(text)["sku"] or "(empty)"
        readme.append(f"| {i} | `{sku}` | {why} |")
    readme += [
        "",
        "Files: `ok-1.png` (OpenMoji t-shirt, CC BY-SA 4.0), `ok-2.jpg` (scikit-image coffee,",
        "160 px, CC0), `ok-3.png` (OpenMoji guitar, CC BY-SA 4.0), `corrupt.jpg` (truncated copy of",
        "`ok-2.jpg`). See ../LICENSE.md.",
    ]
    (b / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# catalogue files and licence
# ---------------------------------------------------------------------------


def write_catalogue(out: Path, items: list[Item]) -> None:
    (out / "images").mkdir(parents=True)
    with open(out / "catalog.jsonl", "w", encoding="utf-8", newline="\n") as jf, \
            open(out / "catalog.csv", "w", encoding="utf-8", newline="") as cf:
        w = csv.writer(cf, lineterminator="\n")
        w.writerow(["sku", "image", "title", "category"])
        for it in items:
            (out / it.image).write_bytes(it.data)
            jf.write(json.dumps({
                "sku": it.sku, "image": it.image,
                "attrs": {"title": it.title, "category": it.category, "source": it.source,
                          "licence": it.licence, "credit": it.credit},
            }, ensure_ascii=False) + "\n")
            w.writerow([it.sku, it.image, it.title, it.category])


def write_licence(out: Path, items: list[Item], sk_quotes: dict[str, str], skl_readme: str,
                  provenance: list[tuple[str, str]], om_version: str) -> None:
    count = {s: sum(1 for it in items if it.source == s) for s in ("skimage", "sklearn", "openmoji")}
    lines = [
        "# Sample catalogue: licences and attribution",
        "",
        "Every image here comes from a package on a public registry, unpacked and",
        "converted by `tools/make_sample_catalog.py`. Each item's licence is also in its",
        "`attrs.licence` and `attrs.credit` in `catalog.jsonl`. The licences below apply to",
        "the images only; vitrine's code has its own licence.",
        "",
        "## Sources",
        "",
        "| package | registry | sha256 of the archive |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {reg} | `{digest}` |" for name, reg, digest in provenance]
    lines += [
        "",
        f"## OpenMoji ({count['openmoji']} images, `images/openmoji-*.png`, "
        "`queries/openmoji-*`, `bad/ok-1.png`, `bad/ok-3.png`)",
        "",
        f"{OPENMOJI_ATTRIBUTION}",
        "(<https://openmoji.org/>, <https://creativecommons.org/licenses/by-sa/4.0/>).",
        "",
        f"From npm `openmoji@{om_version}`, `color/svg/` (and `black/svg/` for one query).",
        f"Changes: rendered from SVG to {EMOJI_SIZE}x{EMOJI_SIZE} PNG with rsvg-convert, keeping",
        "the transparent background; the two colour/black query images are also placed on a",
        "plain background. These renders are shared under CC BY-SA 4.0 as well. The",
        "designer of each emoji is named in its `attrs.credit`.",
        "",
        f"## scikit-image ({count['skimage']} images, `images/skimage-*`, "
        "`queries/motorcycle-right.jpg`, `queries/coffee-crop-rotated.jpg`, `bad/ok-2.jpg`)",
        "",
        f"From the PyPI wheel `{SKIMAGE_REQ}`, `skimage/data/`. The scikit-image package is",
        "BSD-3-Clause; the licence or source of each photo is stated in the docstring of",
        "its loader in `skimage/data/_fetchers.py`, quoted here. Changes: downscaled so the",
        f"longer side is at most {PHOTO_MAX_SIDE} px and re-encoded as JPEG quality",
        f"{JPEG_QUALITY} (the horse silhouette stays PNG for its transparency).",
        "",
        "| file | credit | licence | statement in the package |",
        "|---|---|---|---|",
    ]
    for p in SKIMAGE_PHOTOS:
        lines.append(f"| {p.file} | {p.credit} | {p.licence} | \"{sk_quotes[p.file]}\" |")
    lines += [
        "",
        "`unstated`: the motorcycle stereo pair (also the query `motorcycle-right.jpg`) is from",
        "the Middlebury 2014 stereo benchmark, D. Scharstein, H. Hirschmueller, Y. Kitajima,",
        "G. Krathwohl, N. Nesic, X. Wang, P. Westling, \"High-resolution stereo datasets with",
        "subpixel-accurate ground truth\", GCPR 2014. scikit-image redistributes it without",
        "naming a licence; it is kept here for that reason only and is easy to drop",
        "(remove it from `SKIMAGE_PHOTOS` in the script).",
        "",
        "Not used: `moon.png` and `page.png` (no licence or source stated in the package), and",
        "synthetic or tiny arrays (chessboards, colour wheel, phantom, logo, text,",
        "microaneurysms, multipage TIFFs, the tiny GIF, `.npy`/`.npz`).",
        "",
        f"## scikit-learn ({count['sklearn']} images, `images/sklearn-*`)",
        "",
        f"From the PyPI wheel `{SKLEARN_REQ}`, `sklearn/datasets/images/`. Licensed",
        "CC BY 2.0 (<https://creativecommons.org/licenses/by/2.0/>). Changes: downscaled to",
        f"{PHOTO_MAX_SIDE} px on the longer side, re-encoded as JPEG quality {JPEG_QUALITY}.",
        "The package's README, verbatim:",
        "",
        "```",
        skl_readme.strip(),
        "```",
        "",
        "(The README credits both photos to danielbuechele, but the links it gives for",
        "`flower.jpg` point to the Flickr user vultilion, who is the likely photographer.)",
    ]
    (out / "LICENSE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_readme(out: Path, items: list[Item]) -> None:
    by_src = {s: sum(1 for it in items if it.source == s) for s in ("skimage", "sklearn", "openmoji")}
    text = f"""# Sample catalogue

{len(items)} real images from registry packages: {by_src['openmoji']} OpenMoji drawings (clothing,
food and drink, household, tools, instruments, office, sport...), {by_src['skimage']} scikit-image
photos and {by_src['sklearn']} scikit-learn photos. Licences and credits: `LICENSE.md`.

- `catalog.jsonl`: one item per line, `{{"sku", "image", "attrs": {{"title", "category",
  "source", "licence", "credit"}}}}`; `image` is relative to this folder.
- `catalog.csv`: the same items as CSV (`sku,image,title,category`).
- `images/`: one file per SKU (OpenMoji: {EMOJI_SIZE} px RGBA PNG with transparency;
  photos: JPEG, longer side <= {PHOTO_MAX_SIDE} px; the horse silhouette stays PNG).
- `queries/`: query images that are not in the catalogue, with the expected answers.
- `bad/`: deliberately broken inputs for ingest tests.

Regenerate (byte-identical for the same Pillow and librsvg versions):

    apt-get update && apt-get install -y librsvg2-bin   # rsvg-convert
    python3 tools/make_sample_catalog.py
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skimage-wheel")
    ap.add_argument("--sklearn-wheel")
    ap.add_argument("--openmoji-tgz")
    ap.add_argument("--work", default=str(REPO / "tools" / ".work"))
    ap.add_argument("--out", default=str(REPO / "data"))
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    sk_wheel = find_or_fetch_wheel(args.skimage_wheel, work, SKIMAGE_REQ, "scikit_image")
    skl_wheel = find_or_fetch_wheel(args.sklearn_wheel, work, SKLEARN_REQ, "scikit_learn")
    om_tgz = find_or_fetch_openmoji(args.openmoji_tgz, work)

    sk, sk_quotes, motorcycle_right = skimage_items(sk_wheel)
    skl, skl_readme = sklearn_items(skl_wheel)
    om, query_svgs, om_version = openmoji_items(om_tgz)
    items = dedup(sk + skl + om)
    near_duplicate_report([it for it in items if it.source == "openmoji"])

    for sub in ("images", "queries", "bad"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_catalogue(out, items)
    with zipfile.ZipFile(sk_wheel) as z:
        coffee_png = z.read("skimage/data/coffee.png")
    write_queries(out, items, motorcycle_right, query_svgs, coffee_png)
    write_bad(out, items)
    provenance = [
        (f"`{SKIMAGE_REQ}` ({sk_wheel.name})", "PyPI", sha256_file(sk_wheel)),
        (f"`{SKLEARN_REQ}` ({skl_wheel.name})", "PyPI", sha256_file(skl_wheel)),
        (f"`{OPENMOJI_REQ}` ({om_tgz.name})", "npm", sha256_file(om_tgz)),
    ]
    write_licence(out, items, sk_quotes, skl_readme, provenance, om_version)
    write_readme(out, items)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    by_src = {s: sum(1 for it in items if it.source == s) for s in ("skimage", "sklearn", "openmoji")}
    print(f"{len(items)} items {by_src}; {out} holds {total / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
