"""A resumable cache of scores per (reward, image[, prompt]): a large set is never scored twice.

Layout: ``<cache_dir>/<reward>-<fingerprint>/``, with ``meta.json`` (what the reward is) and
``scores.jsonl`` (one line per scored image: its key and every dimension's score), appended and flushed
after each batch. A killed run leaves at most one partial last line, which a resume detects and drops.

The fingerprint covers the reward's name, options, dtype and a digest of its weights (names, shapes and a
strided sample of every tensor's values), so another checkpoint or dtype gets its own folder and a
stale cache is never trusted. A prompt-free reward's key is the image alone: its scores are shared by
every prompt that image appears with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT = "reward-plugins/score-cache"
CACHE_VERSION = 1


def reward_fingerprint(reward: torch.nn.Module, name: str, options: Mapping[str, Any] | None = None) -> str:
    """A short hex digest identifying the reward's weights, dtype and options."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "options": {k: str(v) for k, v in (options or {}).items()}},
                        sort_keys=True).encode())
    for key, t in reward.state_dict().items():
        t = t.detach()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 64)
            h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def unit_key(image_key: str, prompt: str, uses_prompt: bool) -> str:
    """The cache key of one scoring unit: the image, and the prompt when the reward reads it."""
    if not uses_prompt:
        return image_key
    return image_key + "|" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class ScoreCache:
    """Scores of one reward, in memory and (when `root` is given) on disk.

    Example:
        >>> cache = ScoreCache("cache/", "pickscore", fingerprint)
        >>> cache.put({"sha1:..|ab12": {"pickscore": 21.3}})
        >>> cache.get("sha1:..|ab12")
    """

    def __init__(self, root: str | os.PathLike | None, name: str, fingerprint: str,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.name, self.fingerprint = name, fingerprint
        self.scores: dict[str, dict[str, float]] = {}
        self.dropped_lines = 0
        self.dir: Path | None = None
        if root is None:
            return
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.dir = Path(root) / f"{safe}-{fingerprint}"
        self.dir.mkdir(parents=True, exist_ok=True)
        info = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "reward": name, "fingerprint": fingerprint,
                **dict(meta or {})}
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old.get("fingerprint") != fingerprint or old.get("format") != CACHE_FORMAT:
                raise ValueError(
                    f"score cache {self.dir} belongs to another reward (fingerprint {old.get('fingerprint')!r}, "
                    f"expected {fingerprint!r}); remove the folder or pick another cache directory."
                )
        else:
            meta_path.write_text(json.dumps(info, indent=2) + "\n")
        self._load()

    @property
    def path(self) -> Path | None:
        return None if self.dir is None else self.dir / "scores.jsonl"

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        raw = self.path.read_bytes()
        *complete, tail = raw.split(b"\n")
        for line in complete:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                k, v = row["k"], row["v"]
                scores = {str(d): float(x) for d, x in v.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                self.dropped_lines += 1
                continue
            self.scores[k] = scores
        if tail:
            # A last line without its newline was being written when a run was killed: drop it, so later
            # appends start on a fresh line.
            self.dropped_lines += 1
            with open(self.path, "r+b") as f:
                f.truncate(len(raw) - len(tail))

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def get(self, key: str) -> dict[str, float] | None:
        return self.scores.get(key)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.scores]

    def put(self, rows: Mapping[str, Mapping[str, float]]) -> None:
        """Add scores and append them to disk (flushed, so a killed run keeps every finished batch)."""
        new = {k: {d: float(x) for d, x in v.items()} for k, v in rows.items()}
        self.scores.update(new)
        if self.path is None or not new:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for k, v in new.items():
                f.write(json.dumps({"k": k, "v": v}) + "\n")
            f.flush()
            os.fsync(f.fileno())
