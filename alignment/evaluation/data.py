"""The one in-memory form every preference set is loaded into: images, prompts and labelled pairs.

Every official layout (Pick-a-Pic pairs, HPD v2 and ImageReward rank lists, MHP per-dimension pairs, our
own pair parquet) becomes a `PreferenceSet`:

- ``groups``: one prompt per group (a Pick-a-Pic row, an HPD v2 / ImageReward prompt with its images);
- ``images``: the unique images, each an `ImageRef` (a file path or encoded bytes) in one group;
- ``pairs``: (P, 2) indices into ``images``, always two images of one group;
- ``labels``: ``{dimension: (P,) float}`` with 1.0 = the first image is preferred, 0.0 = the second,
  0.5 = a human tie, NaN = this pair has no label for that dimension.

Rank lists (lower rank = better, equal ranks = a tie, as in HPD v2's ``rank`` and ImageReward's
``ranking``) expand to every pair (i, j), i < j, of a group: `rank_list_pairs`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(eq=False)
class ImageRef:
    """One image: a file (``path``) or encoded bytes (``data``), and a stable ``key`` for the score cache.

    The key of a file is its absolute path, size and modification time (re-written files are re-scored);
    the key of bytes is their SHA-1.
    """

    key: str
    path: str | None = None
    data: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageRef:
        return cls("sha1:" + hashlib.sha1(data).hexdigest(), data=bytes(data))

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> ImageRef:
        p = Path(path).absolute()
        try:
            st = p.stat()
            key = f"file:{p}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            key = f"file:{p}:missing"
        return cls(key, path=str(p))

    def exists(self) -> bool:
        return self.data is not None or (self.path is not None and os.path.isfile(self.path))

    @property
    def name(self) -> str:
        return self.path if self.path is not None else self.key


@dataclass
class PreferenceSet:
    """Images, prompts and labelled pairs of one preference test set (see the module docstring).

    Attributes:
        name: a display name (the file or hub id it came from).
        layout: the layout it was read as ('pickapic', 'hpdv2', 'imagereward', 'mhp', 'pairs', ...).
        groups: one prompt per group.
        images: unique images.
        image_group: (N,) the group of each image.
        pairs: (P, 2) image indices, both in one group.
        labels: {dimension: (P,) float}: 1 first preferred, 0 second, 0.5 tie, NaN unlabelled.
        protocol: the name of the official protocol of this set (see `accuracy.PROTOCOLS`).
        prompt_dependent: dimensions that judge image-text agreement (a reward that ignores prompts
            cannot be measured on them).
        missing: images whose file does not exist (their pairs are dropped by `drop_images`).
        notes: what the loader did that a reader should know (filters, dropped rows).
    """

    name: str
    layout: str
    groups: list[str]
    images: list[ImageRef]
    image_group: torch.Tensor
    pairs: torch.Tensor
    labels: dict[str, torch.Tensor]
    protocol: str = "exclude"
    prompt_dependent: tuple[str, ...] = ()
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image_group = torch.as_tensor(self.image_group, dtype=torch.long).reshape(-1)
        self.pairs = torch.as_tensor(self.pairs, dtype=torch.long).reshape(-1, 2)
        self.labels = {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for k, v in self.labels.items()}
        if len(self.image_group) != len(self.images):
            raise ValueError(f"image_group has {len(self.image_group)} entries for {len(self.images)} images.")
        for k, v in self.labels.items():
            if len(v) != len(self.pairs):
                raise ValueError(f"labels[{k!r}] has {len(v)} entries for {len(self.pairs)} pairs.")

    @property
    def dimensions(self) -> list[str]:
        return list(self.labels)

    @property
    def pair_group(self) -> torch.Tensor:
        """(P,) the group (prompt) of each pair."""
        return self.image_group[self.pairs[:, 0]] if len(self.pairs) else torch.zeros(0, dtype=torch.long)

    def prompt_of(self, image_index: int) -> str:
        return self.groups[int(self.image_group[image_index])]

    def summary(self) -> dict:
        ties = {k: int((v == 0.5).sum()) for k, v in self.labels.items()}
        return {
            "name": self.name, "layout": self.layout, "protocol": self.protocol, "prompts": len(self.groups),
            "images": len(self.images), "pairs": len(self.pairs), "dimensions": self.dimensions,
            "human_ties": ties, "missing_images": len(self.missing), "notes": list(self.notes),
        }

    def drop_images(self, bad: Sequence[int], reason: str) -> PreferenceSet:
        """The same set without the pairs that involve any image in `bad` (missing or unreadable files)."""
        bad_t = torch.zeros(len(self.images), dtype=torch.bool)
        if len(bad):
            bad_t[torch.as_tensor(list(bad), dtype=torch.long)] = True
        keep = ~(bad_t[self.pairs[:, 0]] | bad_t[self.pairs[:, 1]]) if len(self.pairs) else torch.ones(0, dtype=torch.bool)
        dropped = int((~keep).sum())
        notes = list(self.notes)
        if len(bad):
            notes.append(f"{len(bad)} image(s) {reason}: {dropped} pair(s) that use them were left out")
        return PreferenceSet(
            self.name, self.layout, self.groups, self.images, self.image_group, self.pairs[keep],
            {k: v[keep] for k, v in self.labels.items()}, self.protocol, self.prompt_dependent,
            list(self.missing), notes,
        )

    def limit(self, max_groups: int) -> PreferenceSet:
        """The first `max_groups` prompts only (quick runs); images outside them are kept but unused."""
        if max_groups >= len(self.groups):
            return self
        keep = self.pair_group < max_groups
        notes = [*self.notes, f"limited to the first {max_groups} of {len(self.groups)} prompts"]
        return PreferenceSet(
            self.name, self.layout, self.groups, self.images, self.image_group, self.pairs[keep],
            {k: v[keep] for k, v in self.labels.items()}, self.protocol, self.prompt_dependent,
            list(self.missing), notes,
        )

    def used_images(self) -> list[int]:
        """Indices of the images some pair uses, sorted."""
        return sorted(set(self.pairs.reshape(-1).tolist()))


def rank_list_pairs(ranks: Sequence[float]) -> tuple[list[tuple[int, int]], list[float]]:
    """Expand one rank list (lower = better, equal = tie) into every pair (i, j), i < j, and its label.

    Example:
        >>> rank_list_pairs([2, 1, 2])
        ([(0, 1), (0, 2), (1, 2)], [0.0, 0.5, 1.0])
    """
    ranks = [float(r) for r in ranks]
    for r in ranks:
        if not math.isfinite(r):
            raise ValueError(f"rank lists must hold finite numbers; got {ranks}.")
    pairs, labels = [], []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            pairs.append((i, j))
            labels.append(1.0 if ranks[i] < ranks[j] else 0.0 if ranks[i] > ranks[j] else 0.5)
    return pairs, labels


class SetBuilder:
    """Accumulates groups, images and pairs while a loader reads a file (images de-duplicated by key)."""

    def __init__(self) -> None:
        self.groups: list[str] = []
        self.images: list[ImageRef] = []
        self.image_group: list[int] = []
        self.pairs: list[tuple[int, int]] = []
        self.labels: dict[str, list[float]] = {}
        self._index: dict[tuple[str, int], int] = {}

    def group(self, prompt: str) -> int:
        self.groups.append("" if prompt is None else str(prompt))
        return len(self.groups) - 1

    def image(self, ref: ImageRef, group: int) -> int:
        key = (ref.key, group)
        if key not in self._index:
            self._index[key] = len(self.images)
            self.images.append(ref)
            self.image_group.append(group)
        return self._index[key]

    def pair(self, a: int, b: int, labels: dict[str, float]) -> None:
        n = len(self.pairs)
        self.pairs.append((a, b))
        for k in labels:
            if k not in self.labels:
                self.labels[k] = [math.nan] * n
        for k, col in self.labels.items():
            col.append(float(labels.get(k, math.nan)))

    def build(self, name: str, layout: str, protocol: str, prompt_dependent: tuple[str, ...] = (),
              notes: list[str] | None = None) -> PreferenceSet:
        missing = [ref.name for ref in self.images if not ref.exists()]
        return PreferenceSet(
            name, layout, self.groups, self.images, torch.tensor(self.image_group, dtype=torch.long),
            torch.tensor(self.pairs, dtype=torch.long).reshape(-1, 2),
            {k: torch.tensor(v, dtype=torch.float64) for k, v in self.labels.items()},
            protocol, prompt_dependent, missing, list(notes or []),
        )
