"""Shared by the evaluation tests: rewards whose answers are known, and writers of each official layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from reward_plugins.base import RewardModel


def solid_png(r: int, g: int = 0, b: int = 0, size: int = 16) -> bytes:
    """A PNG of one colour (uint8 channels), so a channel mean is known exactly."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (r, g, b)).save(buf, format="PNG")
    return buf.getvalue()


class ChannelReward(RewardModel):
    """Known answers: 'red' = mean red, 'green' = mean green; prompts ignored."""

    dimensions = ("red", "green")
    default_dimension = "red"
    requires_prompts = False

    def __init__(self) -> None:
        super().__init__()
        self.name = "channels"
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype

    def compute(self, images, prompts):
        return {"red": images[:, 0].mean(dim=(1, 2)), "green": images[:, 1].mean(dim=(1, 2))}


class PromptColourReward(RewardModel):
    """Known answers that read the prompt: the mean of the channel the prompt names ('red'/'green'/'blue')."""

    dimensions = ("match",)
    default_dimension = "match"
    requires_prompts = True

    def __init__(self) -> None:
        super().__init__()
        self.name = "prompt-colour"
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def compute(self, images, prompts):
        idx = torch.tensor([["red", "green", "blue"].index(next(w for w in ("red", "green", "blue") if w in p))
                            if any(w in p for w in ("red", "green", "blue")) else 0 for p in prompts])
        means = images.mean(dim=(2, 3))
        return {"match": means[torch.arange(len(prompts)), idx]}


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# Pick-a-Pic rows: (red of image 0, red of image 1, label_0). Expected accuracies with ChannelReward:red
# are worked out by hand in test_evaluation_harness.
PICK_ROWS = [(200, 100, 1.0), (100, 200, 1.0), (150, 150, 1.0), (200, 50, 0.5), (80, 80, 0.5), (30, 60, 0.0)]


def write_pickapic(path: Path, rows=PICK_ROWS, caption: str = "a red thing {i}") -> Path:
    out = []
    for i, (ra, rb, lab) in enumerate(rows):
        # Green differs so that images of equal red are distinct files.
        out.append({"caption": caption.format(i=i), "jpg_0": solid_png(ra, 10), "jpg_1": solid_png(rb, 20),
                    "label_0": lab, "label_1": 1 - lab if lab != 0.5 else 0.5, "has_label": True})
    return write_parquet(out, path)


def write_rank_json(folder: Path, kind: str, groups: list[tuple[list[int], list[int]]], skip: set[str] = frozenset()) -> Path:
    """HPD v2 (kind 'hpdv2') or ImageReward ('imagereward') test.json plus the image files.

    groups: (reds, ranks) per prompt; files named g<group>_<i>.png; names in `skip` are not written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images_key, rank_key = ("image_path", "rank") if kind == "hpdv2" else ("generations", "ranking")
    records = []
    for gi, (reds, ranks) in enumerate(groups):
        names = []
        for i, r in enumerate(reds):
            name = f"g{gi}_{i}.png"
            if name not in skip:
                (folder / name).write_bytes(solid_png(r, 5 * i))
            names.append(name)
        rec = {"prompt": f"prompt {gi}", images_key: names, rank_key: ranks}
        if kind == "imagereward":
            rec["id"] = f"{gi:06d}"
        records.append(rec)
    path = folder / "test.json"
    path.write_text(json.dumps(records))
    return path
