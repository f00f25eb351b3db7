"""Readers for each preference set's published layout, from local files (or the hub through `datasets`).

Layouts (what each official repository reads; see `LAYOUTS` for the detection signatures):

- ``pickapic`` — Pick-a-Pic v1 parquet (yuvalkirstain/PickScore): ``caption``, ``jpg_0``, ``jpg_1`` (encoded
  bytes), ``label_0`` (1 image 0 preferred, 0 image 1, 0.5 tie). Rows with ``has_label`` false are dropped,
  as PickScore's evaluation does outside the train split. Official protocol: ``pickscore``.
- ``hpdv2`` — HPD v2 ``test.json`` (tgxs002/HPSv2): ``[{"prompt", "image_path": [...], "rank": [...]}]``,
  rank 1 = best; paths are relative to the image folder. Official protocol: ``hpsv2``.
- ``imagereward`` — ImageReward ``test.json`` (THUDM/ImageReward): ``[{"id", "prompt", "generations": [...],
  "ranking": [...]}]`` (ties allowed), or the ImageRewardDB per-image parquet (``prompt_id``, ``prompt``,
  ``image``, ``rank`` and the per-image ratings). Official protocol: ``imagereward``.
- ``mhp`` — per-dimension pairs as MPS's MHP set labels them (aesthetics, detail, alignment, overall):
  rows ``{"prompt", "image_0", "image_1", "label_<dimension>": 1 | 0 | 0.5}`` in JSON, JSONL or parquet.
  Kwai-Kolors/MPS does not publish MHP's file format, so this is the documented layout we read.
- ``pairs`` — a `reward-align pairs` directory (Pick-a-Pic columns, ``manifest.json``; alignment/pairs.py).
- ``images`` — unlabelled images with prompts (generated samples), a reference set for calibration and
  the bias probes: a folder with ``prompts.txt``, or a JSONL of ``{"image", "prompt"}``.
- ``best-of-n`` — a `reward-align best-of-n` output directory (its saved images and prompts), likewise.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .data import ImageRef, PreferenceSet, SetBuilder, rank_list_pairs

LAYOUTS: dict[str, str] = {
    "pickapic": "Pick-a-Pic v1 parquet with columns caption, jpg_0, jpg_1, label_0 (ties 0.5)",
    "hpdv2": "HPD v2 test.json: a list of {prompt, image_path: [...], rank: [...]}",
    "imagereward": "ImageReward test.json: a list of {prompt, generations: [...], ranking: [...]}, "
                   "or ImageRewardDB parquet with prompt_id, prompt, image, rank",
    "mhp": "MHP-style pairs (JSON/JSONL/parquet): {prompt, image_0, image_1, label_<dimension>...}",
    "pairs": "a `reward-align pairs` output directory (manifest.json + data/*.parquet)",
    "images": "a reference set without labels (calibration, probes): a folder of images with prompts.txt "
              "(one line per image in file-name order, or one line for all), or a JSONL of {image, prompt}",
    "best-of-n": "a `reward-align best-of-n` output directory (scores.json + images/prompt_XXXX_image_YY_*.png): "
                 "generated images with their prompts, a reference set",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Hub ids of the official sets, read through `datasets` (or huggingface_hub) from the local cache.
HUB = {
    "pickapic": ("yuvalkirstain/pickapic_v1", "test_unique"),
    "imagereward": ("THUDM/ImageRewardDB", "test"),
    "hpdv2": ("ymhao/HPDv2", "test.json"),
}
# Names that build a set from the toy world (alignment/toyworld) instead of reading a file.
TOYWORLD = {"toyworld": "pipeline", "toyworld-render": "render"}
PROTOCOL = {"pickapic": "pickscore", "hpdv2": "hpsv2", "imagereward": "imagereward", "mhp": "exclude", "pairs": "exclude"}
PAIRS_FORMAT = "reward-plugins/pairs"
DIM = "overall"


def _unknown_layout(path: Path, seen: str) -> ValueError:
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    return ValueError(
        f"cannot tell the layout of {path} ({seen}). Known layouts — {known}. "
        "Pass one with layout= (CLI: --layout) if the file is one of them."
    )


# -- reading rows ---------------------------------------------------------------------------------------

def _is_glob(path: str | os.PathLike) -> bool:
    return any(c in str(path) for c in "*?[")


def _parquet_files(path: Path) -> list[Path]:
    if _is_glob(path):  # e.g. pickapic_v1/data/test_unique-*.parquet: one split of a hub snapshot
        return [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if p.endswith(".parquet")]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    return [path]


def _split_note(files: list[Path]) -> list[str]:
    """Hub snapshots keep every split in one folder (``<split>-00000-of-00003.parquet``): say so."""
    splits = sorted({f.name.split("-")[0] for f in files if "-of-" in f.name})
    if len(splits) > 1:
        return [f"read {len(files)} parquet files of the splits {splits}; pass a glob such as "
                f"'DIR/{splits[0]}-*.parquet' to read one split"]
    return []


def _parquet_columns(files: list[Path]) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_schema(files[0]).names) if files else set()


def _parquet_rows(files: list[Path], columns: list[str] | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=cols, batch_size=256):
            yield from batch.to_pylist()


def _json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    if isinstance(rows, dict):  # {"data": [...]} or {id: record}
        rows = rows.get("data", list(rows.values()))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _unknown_layout(path, "its JSON is not a list of records")
    return rows


def _first_json_keys(path: Path) -> set[str]:
    rows = _json_rows(path)
    return set(rows[0]) if rows else set()


def detect_layout(path: str | os.PathLike) -> str:
    """The layout name of a local file or directory (see `LAYOUTS`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: none of the known layouts matches; the message lists them.
    """
    path = Path(path)
    if _is_glob(path):
        files = _parquet_files(path)
        if not files:
            raise FileNotFoundError(f"no parquet file matches {path}.")
        return _layout_of_columns(_parquet_columns(files), path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist; pass a local file or directory "
                                f"(or a hub name: {', '.join(HUB)}; or toyworld, toyworld-render).")
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text()).get("format") == PAIRS_FORMAT:
                    return "pairs"
            except (json.JSONDecodeError, AttributeError):
                pass
        if (path / "scores.json").is_file() and (path / "images").is_dir():
            return "best-of-n"
        for name in ("test.json", "ImageReward_test.json", "test.jsonl"):
            if (path / name).is_file():
                return detect_layout(path / name)
        files = _parquet_files(path)
        if not files and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            return "images"
        if not files:
            raise _unknown_layout(path, "a directory with no parquet files, images, manifest.json or test.json")
        return _layout_of_columns(_parquet_columns(files), path)
    if path.suffix == ".parquet":
        return _layout_of_columns(_parquet_columns([path]), path)
    if path.suffix in (".json", ".jsonl"):
        try:
            keys = _first_json_keys(path)
        except json.JSONDecodeError as e:
            raise _unknown_layout(path, f"not valid JSON: {e}") from None
        if {"prompt", "image_path", "rank"} <= keys:
            return "hpdv2"
        if {"prompt", "generations", "ranking"} <= keys:
            return "imagereward"
        if {"image_0", "image_1"} <= keys and any(k.startswith("label_") for k in keys):
            return "mhp"
        if {"image", "prompt"} <= keys:
            return "images"
        raise _unknown_layout(path, f"records with keys {sorted(keys)}")
    raise _unknown_layout(path, f"an unsupported file type {path.suffix or '(none)'}")


def _layout_of_columns(cols: set[str], path: Path) -> str:
    if {"caption", "jpg_0", "jpg_1", "label_0"} <= cols:
        return "pairs" if {"seed_0", "seed_1", "margin"} <= cols else "pickapic"
    if {"prompt_id", "rank", "image"} <= cols:
        return "imagereward"
    if {"image_0", "image_1"} <= cols and any(c.startswith("label_") for c in cols):
        return "mhp"
    raise _unknown_layout(path, f"parquet columns {sorted(cols)}")


# -- images -----------------------------------------------------------------------------------------------

def _image_ref(value: Any, root: Path | None) -> ImageRef:
    """bytes, {"bytes": ..., "path": ...} (datasets' Image feature) or a path relative to `root`."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef.from_bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef.from_bytes(bytes(value))
    if isinstance(value, str):
        p = Path(value)
        return ImageRef.from_path(p if p.is_absolute() or root is None else root / p)
    if hasattr(value, "save"):  # a PIL image from a hub dataset
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return ImageRef.from_bytes(buf.getvalue())
    raise TypeError(f"an image must be bytes, a path or a datasets Image dict; got {type(value).__name__}.")


def _pick_root(json_path: Path, first: str | None, image_root: str | os.PathLike | None,
               candidates: Iterable[str]) -> tuple[Path, list[str]]:
    """The image folder: `image_root` if given, else the first of the JSON's folder and its usual
    sub-folders that holds the first image."""
    if image_root is not None:
        return Path(image_root), []
    base = json_path.parent
    options = [base, *(base / c for c in candidates)]
    if first is not None:
        for opt in options:
            if (opt / first).is_file():
                return opt, ([f"images read from {opt}"] if opt != base else [])
    return base, []


# -- loaders ----------------------------------------------------------------------------------------------

def _load_pick_rows(rows: Iterable[dict], name: str, layout: str) -> PreferenceSet:
    b = SetBuilder()
    by_caption: dict[str, int] = {}
    unlabelled = bad = 0
    for row in rows:
        if "has_label" in row and row["has_label"] is not None and not row["has_label"]:
            unlabelled += 1
            continue
        label = row.get("label_0")
        if label is None or float(label) not in (0.0, 0.5, 1.0):
            bad += 1
            continue
        caption = row.get("caption") or ""
        # Rows that share a caption form one group: the bootstrap resamples prompts, not rows.
        g = by_caption.get(caption)
        if g is None:
            g = by_caption[caption] = b.group(caption)
        a = b.image(_image_ref(row["jpg_0"], None), g)
        c = b.image(_image_ref(row["jpg_1"], None), g)
        b.pair(a, c, {DIM: float(label)})
    notes = []
    if unlabelled:
        notes.append(f"{unlabelled} row(s) with has_label = false left out (as PickScore's evaluation does)")
    if bad:
        notes.append(f"{bad} row(s) whose label_0 is not 0, 0.5 or 1 left out")
    return b.build(name, layout, PROTOCOL[layout], (), notes)


def load_pickapic(path: str | os.PathLike, layout: str = "pickapic") -> PreferenceSet:
    """Pick-a-Pic v1 parquet file(s) or a directory of them (also our `pairs` output)."""
    path = Path(path)
    files = _parquet_files(path)
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}.")
    cols = ["caption", "jpg_0", "jpg_1", "label_0", "has_label"]
    out = _load_pick_rows(_parquet_rows(files, cols), str(path), layout)
    out.notes.extend(_split_note(files))
    return out


def load_pairs(path: str | os.PathLike) -> PreferenceSet:
    """A `reward-align pairs` directory: its shards under data/ (Pick-a-Pic columns, never a tie)."""
    path = Path(path)
    root = path / "data" if (path / "data").is_dir() else path
    return load_pickapic(root, layout="pairs")


def _load_rank_rows(rows: list[dict], name: str, layout: str, images_key: str, rank_key: str,
                    root: Path) -> PreferenceSet:
    b = SetBuilder()
    for i, row in enumerate(rows):
        paths, ranks = row.get(images_key), row.get(rank_key)
        if not isinstance(paths, list) or not isinstance(ranks, list) or len(paths) != len(ranks):
            raise ValueError(
                f"{name}: record {i} needs lists {images_key!r} and {rank_key!r} of equal length; got "
                f"{type(paths).__name__} of {len(paths) if isinstance(paths, list) else '?'} and "
                f"{type(ranks).__name__} of {len(ranks) if isinstance(ranks, list) else '?'}."
            )
        g = b.group(row.get("prompt", ""))
        idx = [b.image(_image_ref(p, root), g) for p in paths]
        pairs, labels = rank_list_pairs(ranks)
        for (x, y), lab in zip(pairs, labels):
            b.pair(idx[x], idx[y], {DIM: lab})
    return b.build(name, layout, PROTOCOL[layout])


def load_hpdv2(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """HPD v2 test.json; images under `image_root` (default: the JSON's folder, or its test/ folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "test.json"
    rows = _json_rows(path)
    first = rows[0]["image_path"][0] if rows and rows[0].get("image_path") else None
    root, notes = _pick_root(path, first, image_root, ("test", "images"))
    out = _load_rank_rows(rows, str(path), "hpdv2", "image_path", "rank", root)
    out.notes.extend(notes)
    return out


def load_imagereward(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """ImageReward test.json (per-prompt ``ranking``) or the ImageRewardDB per-image parquet."""
    path = Path(path)
    if path.is_dir() and not (path / "test.json").is_file():
        return _load_imagerewarddb(_parquet_files(path), str(path))
    if path.is_dir():
        path = path / "test.json"
    if path.suffix == ".parquet":
        return _load_imagerewarddb([path], str(path))
    rows = _json_rows(path)
    first = rows[0]["generations"][0] if rows and rows[0].get("generations") else None
    root, notes = _pick_root(path, first, image_root, ("test_images", "images"))
    out = _load_rank_rows(rows, str(path), "imagereward", "generations", "ranking", root)
    out.notes.extend(notes)
    return out


# ImageRewardDB's per-image ratings (higher = better) give extra dimensions beside the overall rank.
_IRDB_RATINGS = {"alignment": "image_text_alignment_rating", "fidelity": "fidelity_rating"}


def _load_imagerewarddb(files: list[Path], name: str) -> PreferenceSet:
    cols = ["prompt_id", "prompt", "image", "rank", *_IRDB_RATINGS.values()]
    return _load_imagerewarddb_rows(_parquet_rows(files, cols), name)


def _load_imagerewarddb_rows(rows: Iterable[dict], name: str) -> PreferenceSet:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["prompt_id"]), []).append(row)
    b = SetBuilder()
    for rows in groups.values():
        g = b.group(rows[0].get("prompt", ""))
        idx = [b.image(_image_ref(r["image"], None), g) for r in rows]
        pairs, labels = rank_list_pairs([r["rank"] for r in rows])
        for (x, y), lab in zip(pairs, labels):
            extra = {}
            for dim, col in _IRDB_RATINGS.items():
                ra, rb = rows[x].get(col), rows[y].get(col)
                if ra is not None and rb is not None:
                    extra[dim] = 1.0 if ra > rb else 0.0 if ra < rb else 0.5
            b.pair(idx[x], idx[y], {DIM: lab, **extra})
    notes = ["dimensions other than 'overall' come from ImageRewardDB's per-image ratings (not its rank)"] \
        if len(b.labels) > 1 else []
    return b.build(name, "imagereward", PROTOCOL["imagereward"], ("alignment",), notes)


def load_mhp(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """MHP-style per-dimension pairs (see the module docstring); paths relative to `image_root`
    (default: the file's folder)."""
    path = Path(path)
    if path.suffix == ".parquet" or path.is_dir():
        files = _parquet_files(path)
        rows: Iterable[dict] = _parquet_rows(files)
        base = path if path.is_dir() else path.parent
    else:
        rows = _json_rows(path)
        base = path.parent
    root = Path(image_root) if image_root is not None else base
    b = SetBuilder()
    by_prompt: dict[str, int] = {}
    for row in rows:
        prompt = row.get("prompt", row.get("caption", "")) or ""
        g = by_prompt.get(prompt)
        if g is None:
            g = by_prompt[prompt] = b.group(prompt)
        labels = {}
        for k, v in row.items():
            if k.startswith("label_") and v is not None:
                if float(v) not in (0.0, 0.5, 1.0):
                    raise ValueError(f"{path}: {k} must be 1 (image_0 preferred), 0 or 0.5 (tie); got {v!r}.")
                labels[k.removeprefix("label_")] = float(v)
        b.pair(b.image(_image_ref(row["image_0"], root), g), b.image(_image_ref(row["image_1"], root), g), labels)
    dims = tuple(d for d in b.labels if "align" in d or "semantic" in d)
    return b.build(str(path), "mhp", PROTOCOL["mhp"], dims)


def load_images_folder(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """Unlabelled images with prompts (no pairs): a folder with prompts.txt, or a JSON/JSONL of
    ``{"image", "prompt"}`` records (paths relative to `image_root`, default the file's folder)."""
    path = Path(path)
    b = SetBuilder()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pfile = path / "prompts.txt"
        lines = [ln.strip() for ln in pfile.read_text(encoding="utf-8").splitlines() if ln.strip()] if pfile.is_file() else []
        if lines and len(lines) not in (1, len(files)):
            raise ValueError(f"{pfile} has {len(lines)} prompts for {len(files)} images; give one line per image "
                             "(in file-name order) or a single line shared by all.")
        for i, f in enumerate(files):
            prompt = lines[i] if len(lines) == len(files) else (lines[0] if lines else "")
            b.image(ImageRef.from_path(f), b.group(prompt))
    else:
        root = Path(image_root) if image_root is not None else path.parent
        for row in _json_rows(path):
            b.image(_image_ref(row["image"], root), b.group(row.get("prompt", "")))
    return b.build(str(path), "images", "exclude")


def load_best_of_n(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """A `reward-align best-of-n` output: every saved image under its prompt (run it with
    ``--save-images all`` to keep all N per prompt); no pairs, a reference set for calibration and probes."""
    import re

    path = Path(path)
    doc = json.loads((path / "scores.json").read_text())
    prompts = {int(p["prompt_index"]): p["prompt"] for p in doc.get("prompts", [])}
    b = SetBuilder()
    groups: dict[int, int] = {}
    pattern = re.compile(r"prompt_(\d+)_image_(\d+)")
    for f in sorted((path / "images").glob("*.png")):
        m = pattern.match(f.name)
        if m is None or int(m[1]) not in prompts:
            continue
        i = int(m[1])
        if i not in groups:
            groups[i] = b.group(prompts[i])
        b.image(ImageRef.from_path(f), groups[i])
    if not b.images:
        raise ValueError(f"{path}/images holds no prompt_XXXX_image_YY PNG of the prompts in scores.json; run "
                         "best-of-n with --save-images top_k or all.")
    return b.build(str(path), "best-of-n", "exclude")


def load_from_hub(name: str, image_root: str | os.PathLike | None = None) -> PreferenceSet:
    """An official set by hub id from the local `datasets` / huggingface_hub cache (offline-safe)."""
    repo, split = HUB[name]
    try:
        if name == "hpdv2":
            from huggingface_hub import hf_hub_download

            return load_hpdv2(hf_hub_download(repo, split, repo_type="dataset"), image_root)
        import datasets

        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 — any hub/cache failure becomes one actionable message
        raise FileNotFoundError(
            f"cannot load the {name} set {repo!r} ({split}) from the hub or its local cache ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Download it where the network is reachable and pass "
            f"the local path instead: {LAYOUTS[name]}."
        ) from None
    rows = (dict(r) for r in ds)
    if name == "pickapic":
        return _load_pick_rows(rows, repo, "pickapic")
    return _load_imagerewarddb_rows(rows, repo)


LOADERS = {
    "pickapic": lambda p, root: load_pickapic(p),
    "pairs": lambda p, root: load_pairs(p),
    "hpdv2": load_hpdv2,
    "imagereward": load_imagereward,
    "mhp": load_mhp,
    "images": load_images_folder,
    "best-of-n": load_best_of_n,
}


def load_preference_set(
    dataset: str | os.PathLike, layout: str | None = None, image_root: str | os.PathLike | None = None,
) -> PreferenceSet:
    """Read a preference set: a local path (layout detected unless given), a hub name (``pickapic``,
    ``hpdv2``, ``imagereward``), or ``toyworld`` / ``toyworld-render`` (toy-world images labelled by its
    exact oracle, see `evaluation.toyworld`).

    Example:
        >>> ps = load_preference_set("hpdv2/test.json")
        >>> ps.summary()["pairs"]
    """
    if layout is not None and layout not in LOADERS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}.")
    path = Path(dataset)
    if not path.exists() and str(dataset) in TOYWORLD:
        # The toy world's held-out prompts, every within-prompt pair labelled by its exact oracle.
        from .toyworld import toyworld_preference_set

        return toyworld_preference_set(source=TOYWORLD[str(dataset)])
    if not path.exists() and str(dataset) in HUB:
        return load_from_hub(str(dataset), image_root)
    layout = layout or detect_layout(path)
    return LOADERS[layout](path, image_root)
