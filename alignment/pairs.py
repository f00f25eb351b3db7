"""Preference-pair mining: N images per prompt -> (winner, loser) pairs -> a Pick-a-Pic style parquet dataset.

Columns (what diffusers' Diffusion-DPO example reads, plus provenance):
    caption (str), jpg_0, jpg_1 (encoded image bytes: PNG by default, or JPEG), label_0 (1.0 if image 0 wins,
    0.0 if image 1 wins; never a tie), label_1 = 1 - label_0, prompt_index, index_0/index_1 (image index within
    the prompt's N), seed_0/seed_1 (regenerate with `best_of_n.image_seed`), score_0/score_1 (the reward's
    `.scores`), score_<dimension>_0/_1 for every dimension, and margin (the pair's winning gap).

Layout of `output_dir`:
    manifest.json                   the run's settings (checked on resume) and a summary: pairs, shards and
                                    `prompts_done` (finished prompt index ranges), rewritten at the end of a run
    progress-p<process>.json        which prompts each process has finished (its blocks), rewritten atomically
                                    after every shard: the source of truth while a run is going
    data/train-p<process>-s<block>.parquet   one shard per block of `shard_size` prompts (none if it had no pairs)

Resuming: prompts are processed in a fixed order in blocks of `shard_size`; a block's shard is written to a
temporary file and renamed, then the progress file is rewritten (also by rename). A killed run therefore
leaves only whole shards; the next run skips finished blocks and redoes the rest. A block's content depends
only on the settings and the prompts (seeds are per prompt), so a resumed dataset equals an uninterrupted one.
A resume does not trust the progress files blindly: each finished shard must still exist with its recorded
size, a readable parquet footer and its recorded row count, or its block is mined again (with a warning).
A directory whose run finished no block (it failed before its first shard) is not a run to protect: a rerun
with other settings replaces its manifest.

Scores: with ``image_format='jpeg'`` every image is encoded, decoded and scored again before pairs are chosen,
so the stored scores, margins and labels describe the stored (lossy) images (a JPEG can flip a pair with a
small margin); PNG stores the generated images up to uint8 rounding and keeps their scores.

Several GPUs: pass an accelerate `Accelerator`; prompts are split across processes with
`accelerator.split_between_processes`, each process writes its own shard set, and the main process writes
the summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .best_of_n import (
    _check_positive_int,
    _check_prompts,
    _check_reward,
    best_of_n,
    check_generation,
    check_same_device,
)
from .pipelines import check_pipeline

__all__ = ["PairsResult", "RULES", "mine_pairs", "select_pairs", "dominance_dimensions", "encode_image"]

RULES = ("dimension", "composite", "dominance")
FORMAT = "reward-plugins/pairs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "data"
# Aggregates are not independent axes: dominance is judged on the dimensions they are made of.
AGGREGATE_DIMENSIONS = ("overall", "composite")


def dominance_dimensions(dimensions: Sequence[str]) -> list[str]:
    """The dimensions dominance is judged on: all but the aggregates ('overall', 'composite').

    Example:
        >>> dominance_dimensions(("aesthetic", "fidelity", "alignment", "overall"))
        ['aesthetic', 'fidelity', 'alignment']
    """
    dims = [d for d in dimensions if d not in AGGREGATE_DIMENSIONS]
    return dims or list(dimensions)


def select_pairs(
    scores: torch.Tensor,
    per_dim: Mapping[str, torch.Tensor],
    rule: str = "composite",
    dimension: str | None = None,
    margin: float = 0.0,
    max_pairs: int | None = 1,
) -> list[tuple[int, int, float]]:
    """Choose (winner, loser, gap) pairs among one prompt's N images. A pure function of the scores.

    A pair qualifies when the winner is strictly better and by at least `margin`:
    ``rule="dimension"`` on `per_dim[dimension]`; ``"composite"`` on `scores` (the reward's `.scores`);
    ``"dominance"`` on every dimension of `dominance_dimensions` (the gap is then the smallest of them).
    Qualifying pairs are ordered by gap, largest first (ties: lower indices first), and the first
    `max_pairs` kept (None keeps all). With ``max_pairs=1`` the pair is the best against the worst.

    Args:
        scores: (N,) the reward's `.scores` for the prompt's images.
        per_dim: {dimension: (N,)}.
        rule: 'dimension', 'composite' or 'dominance'.
        dimension: the dimension for ``rule='dimension'``.
        margin: minimum gap (>= 0).
        max_pairs: how many pairs to keep per prompt (None: all qualifying pairs).

    Example:
        >>> select_pairs(torch.tensor([0.0, 1.0, 0.5]), {}, "composite", margin=0.25, max_pairs=None)
        [(1, 0, 1.0), (1, 2, 0.5), (2, 0, 0.5)]
    """
    if rule == "dimension":
        values = [per_dim[dimension].float()]
    elif rule == "composite":
        values = [scores.float()]
    elif rule == "dominance":
        values = [per_dim[d].float() for d in dominance_dimensions(list(per_dim))]
    else:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    stacked = torch.stack(values)                                   # (D, N)
    gaps = stacked[:, :, None] - stacked[:, None, :]                # (D, N, N): gap of a over b
    gap = gaps.min(dim=0).values                                    # dominance: the weakest dimension
    n = gap.shape[0]
    cands = []
    for a in range(n):
        for b in range(n):
            g = float(gap[a, b])
            if a != b and g > 0 and g >= margin:
                cands.append((a, b, g))
    cands.sort(key=lambda c: (-c[2], c[0], c[1]))
    return cands if max_pairs is None else cands[:max_pairs]


def encode_image(image: torch.Tensor, image_format: str = "png", quality: int = 95) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG or JPEG bytes (uint8 rounding, as any saved image)."""
    from reward_plugins.preprocess import tensor_to_pil

    buf = io.BytesIO()
    pil = tensor_to_pil(image)
    if image_format == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode_image(raw: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def _encode_and_rescore(res, reward, image_format: str, jpeg_quality: int, batch_size: int) -> list[list[bytes]]:
    """Every image of a block encoded as it will be stored; with a lossy format (JPEG) the images are decoded
    again and re-scored, overwriting `res.scores` / `res.per_dim`, so pairs are chosen, labelled and stored with
    the scores of the images a trainer will read (a JPEG can flip a pair whose margin is small). PNG is
    lossless up to the uint8 rounding every saved image has, and keeps the scores of the generated images."""
    P, N = res.scores.shape
    encoded = [[encode_image(res.images[i, j], image_format, jpeg_quality) for j in range(N)] for i in range(P)]
    if image_format != "jpeg":
        return encoded
    jobs = [(i, j) for i in range(P) for j in range(N)]
    device = torch.device(reward.device)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        images = torch.stack([_decode_image(encoded[i][j]) for i, j in chunk]).to(device)
        with torch.no_grad():
            out = reward.score(images, [res.prompts[i] for i, _ in chunk])
        for b, (i, j) in enumerate(chunk):
            res.scores[i, j] = float(out.scores[b])
            for d, v in out.per_dim.items():
                if d in res.per_dim:
                    res.per_dim[d][i, j] = float(v[b])
    return encoded


def _column(dim: str) -> str:
    # Composite dimension names look like 'lescore:fidelity'; keep column names plain identifiers.
    return "score_" + re.sub(r"[^0-9A-Za-z_]+", "_", dim)


def _schema(dimensions: Sequence[str]):
    import pyarrow as pa

    fields = [
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()), ("prompt_index", pa.int64()),
        ("index_0", pa.int64()), ("index_1", pa.int64()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
        ("score_0", pa.float64()), ("score_1", pa.float64()),
    ]
    for d in dimensions:
        fields += [(_column(d) + "_0", pa.float64()), (_column(d) + "_1", pa.float64())]
    fields.append(("margin", pa.float64()))
    return pa.schema(fields)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_shard(path: Path, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    # The temp name starts with '.' and does not end in .parquet, so readers globbing *.parquet never see it.
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@dataclass
class PairsResult:
    """What `mine_pairs` wrote.

    Attributes:
        output_dir: the run's directory.
        files: every shard of the run (all processes), sorted.
        num_pairs: pairs in those shards.
        num_prompts: prompts finished (all processes).
        manifest: the manifest's content (settings and summary).
        new_pairs: pairs written by this call on this process (0 when everything was already done).
    """

    output_dir: Path
    files: list[Path]
    num_pairs: int
    num_prompts: int
    manifest: dict[str, Any]
    new_pairs: int = 0
    skipped_blocks: list[int] = field(default_factory=list)

    @property
    def data_files(self) -> list[str]:
        """Shard paths as strings, for ``datasets.load_dataset("parquet", data_files=...)``."""
        return [str(f) for f in self.files]

    def load(self):
        """The pairs as a `datasets.Dataset` (needs the `datasets` package)."""
        from datasets import load_dataset

        if not self.files:
            raise ValueError(f"no pairs were written under {self.output_dir}; lower margin= or raise n=.")
        return load_dataset("parquet", data_files=self.data_files, split="train")


def _settings(pipe, prompts, reward, n, rule, dimension, margin, shard_size, seed, num_inference_steps,
              guidance_scale, height, width, image_format, jpeg_quality, pairs_per_prompt, shuffle_slots,
              pipeline_kwargs, num_processes) -> dict[str, Any]:
    """Everything that decides the dataset's content; a resumed run must match it exactly."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return {
        "prompts_sha256": h.hexdigest(), "num_prompts": len(prompts), "n": n, "rule": rule,
        "dimension": dimension, "margin": float(margin), "pairs_per_prompt": pairs_per_prompt,
        "shard_size": shard_size, "seed": seed, "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale), "height": height, "width": width, "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None, "shuffle_slots": bool(shuffle_slots),
        "pipeline_class": type(pipe).__name__, "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
        "scores_after_encoding": image_format == "jpeg",
        "pipeline": str(getattr(getattr(pipe, "config", {}), "_name_or_path", "") or ""),
        "scheduler": type(pipe.scheduler).__name__,
        "reward": getattr(reward, "name", type(reward).__name__), "reward_dimensions": list(reward.dimensions),
        "reward_selection": reward.selection, "pipeline_kwargs": dict(pipeline_kwargs or {}),
        "num_processes": num_processes,
    }


def _check_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if compatible; None if the directory is fresh.

    Raises:
        ValueError: the directory holds another run (different settings, or shards without a manifest).
    """
    path = out / MANIFEST
    if not path.is_file():
        stray = sorted((out / DATA_DIR).glob("*.parquet")) if (out / DATA_DIR).is_dir() else []
        if stray:
            raise ValueError(
                f"output_dir {str(out)!r} holds {len(stray)} parquet shard(s) but no {MANIFEST}, so they cannot be "
                "resumed safely; pass an empty or new output_dir (or delete the old shards)."
            )
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or use another output_dir.") from None
    if old.get("format") != FORMAT:
        raise ValueError(
            f"output_dir {str(out)!r} holds a {MANIFEST} that is not a pairs manifest (format "
            f"{old.get('format')!r}); use another output_dir."
        )
    prev = old.get("settings", {})
    diff = {k: (prev.get(k), v) for k, v in settings.items() if json.loads(json.dumps(prev.get(k))) !=
            json.loads(json.dumps(v))}
    if diff and not _has_finished_blocks(out):
        return None  # the old run failed before finishing any block: nothing to protect, start afresh
    if diff:
        details = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(diff.items())[:6])
        raise ValueError(
            f"output_dir {str(out)!r} holds another run's pairs with incompatible settings ({details}). Resume with "
            "the same settings, or pass a new output_dir (or delete the old one)."
        )
    return old


def _read_progress(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"blocks": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to mine its prompts again.") from None
    if not isinstance(state, dict) or not isinstance(state.get("blocks", {}), dict):
        raise ValueError(f"{path} is not a pairs progress file; delete it to mine its prompts again.")
    return state


def _has_finished_blocks(out: Path) -> bool:
    """Whether any process of the run in `out` recorded a finished block (or left a shard)."""
    if (out / DATA_DIR).is_dir() and any((out / DATA_DIR).glob("*.parquet")):
        return True
    return any(_read_progress(p).get("blocks") for p in out.glob("progress-p*.json"))


def _shard_problem(out: Path, info: Mapping[str, Any]) -> str | None:
    """Why a finished block's shard cannot be trusted (missing, wrong size, unreadable footer, wrong row
    count), or None when it checks out. Blocks without pairs have no shard and nothing to check."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not info.get("file"):
        return None
    path = out / info["file"]
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        return f"it has {size} bytes, {info['bytes']} were written"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows  # reads the footer, which a truncated file lacks
    except (pa.ArrowInvalid, OSError) as e:
        return f"its parquet footer is unreadable ({' '.join(str(e).split())[:120]})"
    if rows != info.get("num_pairs"):
        return f"it holds {rows} rows, {info.get('num_pairs')} were written"
    return None


def _drop_broken_blocks(out: Path, done: dict[str, Any]) -> list[str]:
    """Remove finished blocks whose shard fails `_shard_problem` from `done`; returns the warnings."""
    notes = []
    for b, info in sorted(done.items(), key=lambda kv: int(kv[0])):
        problem = _shard_problem(out, info)
        if problem is not None:
            notes.append(f"{info['file']} of block {b} is broken ({problem}); its prompts are mined again.")
            del done[b]
    return notes


def mine_pairs(
    pipe,
    prompts: Sequence[str],
    reward,
    n: int,
    output_dir: str | os.PathLike,
    *,
    rule: str = "dimension",
    dimension: str | None = None,
    margin: float = 0.0,
    shard_size: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    pairs_per_prompt: int | None = 1,
    image_format: str = "png",
    jpeg_quality: int = 95,
    shuffle_slots: bool = True,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    accelerator=None,
    progress: bool = True,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> PairsResult:
    """Generate `n` images per prompt, score them, and write (winner, loser) pairs as parquet shards.

    Args:
        pipe: a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline`.
        prompts: the prompts, processed in this order (non-empty).
        reward: a `reward_plugins` reward on the pipeline's device.
        n: images per prompt (>= 2: a pair needs two).
        output_dir: where the manifest, progress files and ``data/*.parquet`` go; an existing run there with
            the same settings is resumed.
        rule: 'dimension' (one dimension, `dimension=`), 'composite' (the reward's `.scores`), or 'dominance'
            (better on every dimension except 'overall'/'composite').
        dimension: for ``rule='dimension'``; defaults to the reward's only dimension when it has one.
        margin: minimum winning gap (on the chosen dimension, the composite, or every dimension).
        shard_size: prompts per shard; also the resume granularity (a block's N images per prompt are held
            in CPU memory until its shard is written).
        seed: base seed; image j of global prompt i uses ``seed + i * n + j``.
        batch_size, num_inference_steps, guidance_scale, height, width, pipeline_kwargs: as in `best_of_n`.
        pairs_per_prompt: pairs kept per prompt, largest gap first (1 = best vs worst; None = all qualifying).
        image_format: 'png' (lossless, default) or 'jpeg' (`jpeg_quality`).
        shuffle_slots: put the winner in slot 0 or 1 at random (seeded per prompt), as in Pick-a-Pic; False
            always puts it in slot 0 (label_0 = 1.0).
        accelerator: an accelerate `Accelerator` to split prompts across processes (None: this process only).
        progress: tqdm bar over prompts (main process only).
        on_shard: called after each block is durably recorded, with a dict (process, block, file, num_pairs,
            prompts); raising from it stops the run (the recorded blocks stay valid).

    Returns:
        A `PairsResult` (shard paths, counts, manifest); `.load()` gives a `datasets.Dataset`.

    Raises:
        TypeError: unsupported pipeline class, or `reward` is not a RewardModel.
        ValueError: empty prompts, n < 2, unknown rule or dimension, negative margin, reward on another device,
            or an output_dir holding an incompatible run.

    Example:
        >>> reward = create_reward("lescore", checkpoint="LeScore.pt", device="cuda", dtype="bf16")
        >>> res = mine_pairs(pipe, prompts, reward, n=8, output_dir="pairs/", rule="dominance", margin=0.1)
        >>> ds = res.load()          # columns caption, jpg_0, jpg_1, label_0, ... for Diffusion-DPO
    """
    check_pipeline(pipe)
    _check_reward(reward)
    prompts = _check_prompts(prompts)
    n = _check_positive_int("n", n, 2, "A preference pair needs at least two images per prompt; use n=4 or more.")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    dims = list(reward.dimensions)
    if rule == "dimension":
        if dimension is None:
            if len(dims) != 1:
                raise ValueError(
                    f"rule='dimension' needs dimension=; reward {reward.name!r} reports {dims}. Pass one of them, "
                    "or use rule='composite' or rule='dominance'."
                )
            dimension = dims[0]
        if dimension not in dims:
            raise ValueError(f"dimension {dimension!r} is not reported by reward {reward.name!r}; it reports {dims}.")
    elif dimension is not None:
        raise ValueError(f"dimension={dimension!r} only applies to rule='dimension'; got rule={rule!r}.")
    if not isinstance(margin, (int, float)) or not margin >= 0:
        raise ValueError(f"margin must be a number >= 0; got {margin!r}.")
    shard_size = _check_positive_int("shard_size", shard_size, 1, "It is the number of prompts per shard.")
    if pairs_per_prompt is not None:
        _check_positive_int("pairs_per_prompt", pairs_per_prompt, 1, "Use None to keep every qualifying pair.")
    image_format = str(image_format).lower().replace("jpg", "jpeg")
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg'; got {image_format!r}.")
    check_generation(num_inference_steps, height, width)
    _check_positive_int("batch_size", batch_size, 1, "It is the number of images per pipeline call.")
    check_same_device(pipe, reward)

    proc = accelerator.process_index if accelerator is not None else 0
    nproc = accelerator.num_processes if accelerator is not None else 1
    is_main = accelerator.is_main_process if accelerator is not None else True

    out = Path(output_dir)
    settings = _settings(pipe, prompts, reward, n, rule, dimension, margin, shard_size, seed, num_inference_steps,
                         guidance_scale, height, width, image_format, jpeg_quality, pairs_per_prompt,
                         shuffle_slots, pipeline_kwargs, nproc)
    # Every process checks (so all raise together instead of some waiting forever); the main one writes.
    existing = _check_manifest(out, settings) if out.exists() else None
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    if is_main:
        if existing is None:
            _atomic_write_json(out / MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "settings": settings,
                                                "complete": False})
    if accelerator is not None:
        accelerator.wait_for_everyone()

    all_indices = list(range(len(prompts)))
    if accelerator is not None:
        with accelerator.split_between_processes(all_indices) as mine:
            my_indices = list(mine)
    else:
        my_indices = all_indices
    blocks = [my_indices[s : s + shard_size] for s in range(0, len(my_indices), shard_size)]
    progress_path = out / f"progress-p{proc:05d}.json"
    state = _read_progress(progress_path) if existing is not None else {"blocks": {}}
    done = state.setdefault("blocks", {})
    state.update({"process_index": proc, "num_processes": nproc})
    broken = _drop_broken_blocks(out, done)
    for note in broken:
        warnings.warn(f"pairs resume in {out}: {note}", stacklevel=2)
    if broken:
        _atomic_write_json(progress_path, state)
    schema = _schema(dims)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(my_indices), unit="prompt", desc="pairs", disable=not (progress and is_main))
    new_pairs = 0
    skipped = []
    try:
        for b, block in enumerate(blocks):
            if str(b) in done:
                skipped.append(b)
                bar.update(len(block))
                continue
            res = best_of_n(
                pipe, [prompts[i] for i in block], reward, n, k=1, batch_size=batch_size, seed=seed,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                progress=False, keep_images=True, pipeline_kwargs=pipeline_kwargs, prompt_indices=block,
            )
            encoded = _encode_and_rescore(res, reward, image_format, jpeg_quality, batch_size)
            rows = []
            for local, gi in enumerate(block):
                per = {d: v[local] for d, v in res.per_dim.items()}
                chosen = select_pairs(res.scores[local], per, rule, dimension, margin, pairs_per_prompt)
                # Per-prompt RNG: slot order does not depend on block boundaries or other prompts.
                slot_rng = random.Random(f"{seed}:{gi}")
                for win, lose, gap in chosen:
                    swap = shuffle_slots and slot_rng.random() < 0.5
                    a, c = (lose, win) if swap else (win, lose)
                    row = {
                        "caption": prompts[gi],
                        "jpg_0": encoded[local][a], "jpg_1": encoded[local][c],
                        "label_0": 0.0 if swap else 1.0, "label_1": 1.0 if swap else 0.0, "prompt_index": gi,
                        "index_0": a, "index_1": c, "seed_0": int(res.seeds[local, a]),
                        "seed_1": int(res.seeds[local, c]),
                        "score_0": float(res.scores[local, a]), "score_1": float(res.scores[local, c]),
                        "margin": gap,
                    }
                    for d in dims:
                        row[_column(d) + "_0"] = float(res.per_dim[d][local, a])
                        row[_column(d) + "_1"] = float(res.per_dim[d][local, c])
                    rows.append(row)
            name = None
            if rows:
                name = f"{DATA_DIR}/train-p{proc:05d}-s{b:05d}.parquet"
                _write_shard(out / name, rows, schema)
            done[str(b)] = {"file": name, "num_pairs": len(rows), "prompts": [block[0], block[-1] + 1],
                            "bytes": (out / name).stat().st_size if name else 0}
            _atomic_write_json(progress_path, state)
            new_pairs += len(rows)
            bar.update(len(block))
            if on_shard is not None:
                on_shard({"process": proc, "block": b, "file": name, "num_pairs": len(rows),
                          "prompts": [block[0], block[-1] + 1]})
    finally:
        bar.close()

    if accelerator is not None:
        accelerator.wait_for_everyone()
    return _summarise(out, settings, is_main, new_pairs, skipped)


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """[[0, 2], [2, 4], [6, 8]] -> [[0, 4], [6, 8]]: finished prompt indices as half-open ranges."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _summarise(out: Path, settings: dict[str, Any], is_main: bool, new_pairs: int, skipped: list[int]) -> PairsResult:
    files, num_pairs, num_prompts, ranges = [], 0, 0, []
    for p in range(settings["num_processes"]):
        st = _read_progress(out / f"progress-p{p:05d}.json")
        for info in st.get("blocks", {}).values():
            num_pairs += info["num_pairs"]
            num_prompts += info["prompts"][1] - info["prompts"][0]
            ranges.append(list(info["prompts"]))
            if info["file"]:
                files.append(out / info["file"])
    complete = num_prompts == settings["num_prompts"]
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "settings": settings, "complete": complete,
                "num_pairs": num_pairs, "num_prompts_done": num_prompts, "prompts_done": _merge_ranges(ranges),
                "num_shards": len(files),
                "shards": sorted(str(f.relative_to(out)) for f in files)}
    if is_main:
        _atomic_write_json(out / MANIFEST, manifest)
    return PairsResult(out, sorted(files), num_pairs, num_prompts, manifest, new_pairs, skipped)
