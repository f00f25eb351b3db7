"""Pick-a-Pic preference pairs for Diffusion-DPO: parquet files, dirs of shards or `datasets` sources.

Columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0`` (1 -> image 0 wins,
0 -> image 1 wins, 0.5 -> tie). Everything is checked before training starts (missing columns,
unreadable bytes, mixed resolutions), so a bad dataset fails fast and writes nothing.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from alignment.trainers.dpo import DataSection

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
# SDXL micro-conditioning of a pair: "pair" = both images get jpg_0's original size and crop (diffusers' SDXL DPO
# script), "constant" = (res, res, 0, 0) for every image (the official DiffusionDPO code), "image" = each its own.
MICRO_MODES = ("pair", "constant", "image")
# data.resize: "bilinear" = torchvision's Resize(res, BILINEAR) + CenterCrop(res) of the official scripts (long
# side truncated, crop offset rounded); "bicubic" = bicubic, long side rounded, crop offset floored.
RESIZE_FILTERS = ("bicubic", "bilinear")


def _encode_png(array) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, through the pair miner's encoder (exact for uint8 input)."""
    from alignment.pairs import encode_image

    return encode_image(torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def make_synthetic_pairs(
    path: str | os.PathLike,
    n: int,
    resolution: int = 32,
    seed: int = 0,
    captions: Sequence[str] | None = None,
    tie_every: int = 0,
) -> Path:
    """Write `n` Pick-a-Pic-format pairs where the winner is always the same image.

    The winner is a smooth colour gradient, the loser a fixed high-frequency noise image; which one sits
    in ``jpg_0`` is random per row and `label_0` says which wins, so the reader's ordering is exercised.
    With ``tie_every=k`` every k-th row is a tie (label_0 = 0.5).

    Example:
        >>> make_synthetic_pairs("pairs.parquet", 64, resolution=32)
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n < 1:
        raise ValueError(f"n must be >= 1 pairs; got {n}.")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    smooth = np.stack([xx, yy, 1 - xx * yy], -1)
    winner = _encode_png((smooth * 255).astype(np.uint8))
    loser = _encode_png(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
    captions = list(captions or ["a smooth gradient", "a calm picture", "soft colours", "a clean image"])
    rows = {c: [] for c in PAIR_COLUMNS}
    for i in range(n):
        w_first = bool(rng.integers(0, 2))
        rows["caption"].append(captions[i % len(captions)])
        rows["jpg_0"].append(winner if w_first else loser)
        rows["jpg_1"].append(loser if w_first else winner)
        rows["label_0"].append(0.5 if tie_every and i % tie_every == tie_every - 1 else (1.0 if w_first else 0.0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "caption": pa.array(rows["caption"], pa.string()),
        "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
        "jpg_1": pa.array(rows["jpg_1"], pa.binary()),
        "label_0": pa.array(rows["label_0"], pa.float64()),
    })
    pq.write_table(table, out)
    return out


def _parquet_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.parquet") if f.is_file())
            if not found:
                raise FileNotFoundError(f"data.path {str(p)!r} is a directory without *.parquet files.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"data.path {str(p)!r} does not exist; give parquet file(s) or dir(s) of shards "
                "(e.g. the output dir of `reward-align pairs`)."
            )
    return files


class PairSource:
    """Row access to Pick-a-Pic columns in a pyarrow Table or a `datasets.Dataset` (bytes, not PIL)."""

    def __init__(self, table, where: str) -> None:
        self.where = where
        names = list(getattr(table, "column_names", None) or [])
        missing = [c for c in PAIR_COLUMNS if c not in names]
        if missing:
            raise ValueError(
                f"{where} lacks the Pick-a-Pic column(s) {missing}; found {names}. Preference pairs need "
                "caption (str), jpg_0 and jpg_1 (encoded image bytes) and label_0 (1.0 = image 0 wins, "
                "0.0 = image 1 wins, 0.5 = tie); rename columns or write pairs with alignment.pairs.mine_pairs."
            )
        self.table = table
        import pyarrow as pa

        self.is_arrow = isinstance(table, pa.Table)
        if self.is_arrow:
            self.captions = table.column("caption").to_pylist()
            self.labels = table.column("label_0").to_pylist()
            self._images = {c: table.column(c) for c in IMAGE_COLUMNS}
        else:
            from datasets import Image as ImageFeature

            for c in IMAGE_COLUMNS:
                if isinstance(table.features.get(c), ImageFeature):
                    table = table.cast_column(c, ImageFeature(decode=False))
            self.table = table
            self.captions = table["caption"]
            self.labels = table["label_0"]
            self._images = {c: table.select_columns([c]) for c in IMAGE_COLUMNS}

    def __len__(self) -> int:
        return len(self.captions)

    def image_bytes(self, i: int, column: str) -> bytes:
        value = self._images[column][i]
        if self.is_arrow:
            value = value.as_py()
        else:
            value = value[column]
        if isinstance(value, dict):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes") is None and value.get("path"):
                return Path(value["path"]).read_bytes()
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(
                f"{self.where} row {i} column {column!r} holds {type(value).__name__}, not encoded image bytes; "
                "jpg_0/jpg_1 must be JPEG/PNG file contents."
            )
        return bytes(value)


def read_pair_source(data: DataSection, dataset=None) -> PairSource:
    """Open the configured pairs (or a given `datasets.Dataset` / pyarrow Table) as a `PairSource`."""
    if dataset is not None:
        return PairSource(dataset, "the given dataset")
    if data.path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = _parquet_files(data.path)
        tables = []
        for f in files:
            try:
                tables.append(pq.read_table(f))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"cannot read parquet file {str(f)!r} ({e}); is it a complete parquet file?") from None
        names = [set(t.column_names) for t in tables]
        if any(n != names[0] for n in names):
            raise ValueError(f"the parquet shards under {data.path!r} have different columns: {[sorted(n) for n in names]}.")
        where = str(files[0]) if len(files) == 1 else f"{len(files)} parquet files under {data.path!r}"
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        return PairSource(table, where)
    if data.dataset:
        import datasets

        try:
            ds = datasets.load_dataset(data.dataset, split=data.split)
        except Exception as e:  # datasets raises many types; they all mean "cannot open this source"
            raise FileNotFoundError(f"cannot load data.dataset {data.dataset!r} split {data.split!r}: {e}") from None
        return PairSource(ds, f"dataset {data.dataset!r}[{data.split}]")
    raise ValueError("no data source: set data.path or data.dataset (or pass dataset=).")


def _decode(raw: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: unreadable image bytes ({type(e).__name__}: {e}); re-encode it as JPEG or PNG.") from None
    return img.convert("RGB")


@dataclass
class PairIndex:
    """The usable rows of a source: (row, winner column, loser column), plus what was skipped."""

    rows: list[tuple[int, str, str]]
    ties: int
    sizes: set


def index_pairs(source: PairSource, data: DataSection) -> PairIndex:
    """Orient every pair by label_0, skip ties and check the images as `data.validate` says.

    Raises:
        ValueError: bad label, tie with ``ties: error``, unreadable image bytes, or mixed image sizes
            without ``resize: true``. Nothing has been written when this raises.
    """
    from PIL import Image, UnidentifiedImageError

    rows, ties, sizes = [], 0, {}
    for i in range(len(source)):
        label, caption = source.labels[i], source.captions[i]
        if not isinstance(caption, str):
            raise ValueError(f"{source.where} row {i}: caption must be a string; got {type(caption).__name__}.")
        if label is None or isinstance(label, bool) or not isinstance(label, (int, float)) or math.isnan(label) or not 0 <= label <= 1:
            raise ValueError(
                f"{source.where} row {i}: label_0 must be a number in [0, 1] (1 = image 0 wins, 0 = image 1 wins, "
                f"0.5 = tie); got {label!r}."
            )
        if label == 0.5:
            if data.ties == "error":
                raise ValueError(f"{source.where} row {i} is a tie (label_0 = 0.5); set data.ties=skip to drop ties.")
            ties += 1
            continue
        win, lose = ("jpg_0", "jpg_1") if label > 0.5 else ("jpg_1", "jpg_0")
        rows.append((i, win, lose))
        if data.max_pairs and len(rows) >= data.max_pairs:
            break
    if data.validate != "none":
        for i, _, _ in rows:
            for col in IMAGE_COLUMNS:
                where = f"{source.where} row {i} column {col!r}"
                raw = source.image_bytes(i, col)
                if data.validate == "full":
                    size = _decode(raw, where).size
                else:
                    try:
                        size = Image.open(io.BytesIO(raw)).size
                    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                        raise ValueError(f"{where}: unreadable image bytes ({type(e).__name__}); re-encode it as JPEG or PNG.") from None
                sizes.setdefault(size, where)
                if len(sizes) > 1 and not data.resize:
                    (s0, w0), (s1, w1) = list(sizes.items())[:2]
                    raise ValueError(
                        f"mixed image resolutions: {w0} is {s0[0]}x{s0[1]} but {w1} is {s1[0]}x{s1[1]}. "
                        "Set data.resize=true to resize and centre-crop every image to model.resolution."
                    )
    if not rows:
        raise ValueError(f"{source.where} has no usable pairs ({ties} ties skipped); DPO needs pairs with a winner.")
    return PairIndex(rows, ties, set(sizes))


class PairDataset(torch.utils.data.Dataset):
    """(winner, loser, caption) tensors in [0, 1], (3, R, R), for the rows of a `PairIndex`."""

    def __init__(self, source: PairSource, index: PairIndex, resolution: int, resize: bool, micro: str = "pair",
                 resize_filter: str = "bicubic") -> None:
        if micro not in MICRO_MODES:
            raise ValueError(f"micro must be one of {MICRO_MODES}; got {micro!r}.")
        if resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter must be one of {RESIZE_FILTERS}; got {resize_filter!r}.")
        self.source, self.index, self.resolution, self.resize = source, index, resolution, resize
        self.micro, self.resize_filter = micro, resize_filter

    def __len__(self) -> int:
        return len(self.index.rows)

    def _image(self, row: int, col: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The image (3, R, R) in [0, 1] and SDXL's micro-conditioning for it: (original h, original w,
        crop top, crop left), the crop in resized coordinates as diffusers' SDXL training scripts record it."""
        import numpy as np
        from PIL import Image

        where = f"{self.source.where} row {row} column {col!r}"
        img = _decode(self.source.image_bytes(row, col), where)
        r = self.resolution
        top = left = 0
        original = (img.size[1], img.size[0])
        if self.resize and self.resize_filter == "bilinear":
            w, h = img.size
            # torchvision's Resize(r): the shorter side becomes r, the longer int(r * long / short); for PIL
            # images it calls PIL's bilinear resize, as here. CenterCrop(r) rounds the offsets.
            size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
            if size != img.size:
                img = img.resize(size, Image.BILINEAR)
            left, top = int(round((img.size[0] - r) / 2.0)), int(round((img.size[1] - r) / 2.0))
            img = img.crop((left, top, left + r, top + r))
        elif self.resize:
            scale = r / min(img.size)
            img = img.resize((max(r, round(img.size[0] * scale)), max(r, round(img.size[1] * scale))), Image.BICUBIC)
            left, top = (img.size[0] - r) // 2, (img.size[1] - r) // 2
            img = img.crop((left, top, left + r, top + r))
        elif img.size != (r, r):
            raise ValueError(
                f"{where} is {img.size[0]}x{img.size[1]} but training runs at {r}x{r}; set data.resize=true "
                f"or model.resolution={img.size[0]} (square images)."
            )
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return pixels, torch.tensor([*original, top, left], dtype=torch.float32)

    def __getitem__(self, k: int) -> dict:
        row, win, lose = self.index.rows[k]
        (pw, cw), (pl, cl) = self._image(row, win), self._image(row, lose)
        if self.micro == "pair":  # one conditioning per pair, jpg_0's: no size shortcut between winner and loser
            cw = cl = cw if win == "jpg_0" else cl
        elif self.micro == "constant":
            r = float(self.resolution)
            cw = cl = torch.tensor([r, r, 0.0, 0.0])
        return {"pixel_w": pw, "pixel_l": pl, "micro_w": cw, "micro_l": cl.clone(), "caption": self.source.captions[row]}


def collate_pairs(items: list[dict]) -> dict:
    out = {k: torch.stack([x[k] for x in items]) for k in ("pixel_w", "pixel_l", "micro_w", "micro_l")}
    out["caption"] = [x["caption"] for x in items]
    return out


class PairSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, cut to whole global batches, starting at a given position.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
    one would; accelerate shards the batches across processes. accelerate only calls `set_epoch` on
    samplers that define it; this one is positioned by the trainer with `set_position`.
    """

    def __init__(self, n: int, seed: int, global_batch: int) -> None:
        self.n, self.seed, self.global_batch = n, seed, global_batch
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _usable(self) -> int:
        return (self.n // self.global_batch) * self.global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self._usable()]
        return iter(perm[self.start :].tolist())

    def __len__(self) -> int:
        return max(self._usable() - self.start, 0)

