"""LePref's annotation pipeline with a VLM judge: prompts -> JSONL, image sets -> per-dimension scores -> pairs.

Layout of `output_dir`:
    manifest.json        the run's settings (templates, backend, what is annotated); a resume must match them
    annotations.jsonl    one line per finished request (answered or failed, with the raw answers), appended
                         and flushed as requests finish: the source of truth for resuming
    summary.json         the cost summary (requests, backend calls, tokens, failures), rewritten at the end
    pairs/               (image sets) Pick-a-Pic parquet in `reward-align pairs` format (`alignment.pairs`)

Resuming: every request has a content key (template + messages hash). A new run reads annotations.jsonl,
drops a torn last line (a run killed mid-write), and sends only requests whose key is not there, so no
recorded request is repeated and none is lost. Failed requests stay recorded as failures (raw text kept);
`retry_failed=True` asks them again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reward_plugins.judge import Cost, Judge, Outcome
from reward_plugins.judge.requests import ChatRequest

PROMPT_TEMPLATES = ("prompt_processing", "prompt_NSFW_filtering", "prompt_classification")
MANIFEST = "manifest.json"
ANNOTATIONS = "annotations.jsonl"
SUMMARY = "summary.json"


@dataclass
class ImageSet:
    """One prompt and its candidate images (paths, encoded bytes or PIL images), with their seeds if known."""

    prompt: str
    images: list[Any]
    seeds: list[int] = field(default_factory=list)
    prompt_index: int = 0
    indices: list[int] = field(default_factory=list)  # each image's index among the prompt's N (default 0..)

    def index(self, position: int) -> int:
        return self.indices[position] if self.indices else position


@dataclass
class AnnotationResult:
    output_dir: Path
    records: list[dict[str, Any]]
    cost: Cost
    new_requests: int
    pairs_files: list[Path] = field(default_factory=list)
    num_pairs: int = 0


# -- the resumable log -----------------------------------------------------------------------------------
def read_log(path: Path) -> dict[str, dict[str, Any]]:
    """Records by key (the last line of a key wins). A torn final line is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]  # a run killed mid-write leaves a line without its newline
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    out: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(good.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e}); the log is damaged, start a new output_dir.") from e
        if not isinstance(rec, dict) or "key" not in rec:
            raise ValueError(f"{path} line {n} has no 'key'; it was not written by reward-align annotate.")
        out[rec["key"]] = rec
    return out


def _check_manifest(out: Path, settings: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in diff)}); "
                "use a new output_dir, or the same settings to resume."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, path)


Item = tuple[Callable[[], ChatRequest], dict[str, Any]]


def _run_logged(judge: Judge, items: list[Item], out: Path, chunk: int, retry_failed: bool,
                progress: bool) -> tuple[list[dict[str, Any]], Cost, int]:
    """Send the requests not yet in the log, appending each chunk's records; returns every item's record.

    Requests are built lazily from `items` (a builder and its metadata): once to learn each key, again just
    before sending, so only a chunk's images are held encoded in memory at a time.
    """
    from tqdm.auto import tqdm

    log = out / ANNOTATIONS
    done = read_log(log)
    keys = [build().key for build, _ in items]
    seen: set[str] = set()
    todo = []
    for i, key in enumerate(keys):
        if key in seen or (key in done and not (retry_failed and not done[key].get("ok"))):
            continue
        seen.add(key)
        todo.append(i)
    bar = tqdm(total=len(set(keys)), initial=len(set(keys)) - len(todo), desc="annotate", unit="req",
               disable=not progress)
    with open(log, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), chunk):
            part = todo[s : s + chunk]
            outcomes: list[Outcome] = judge.run([items[i][0]() for i in part])
            for i, o in zip(part, outcomes):
                rec = {**items[i][1], **o.to_dict()}
                done[o.key] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
    bar.close()
    cost = Cost()
    records = [done[k] for k in keys]
    for rec in {k: done[k] for k in keys}.values():
        cost.requests += 1
        cost.attempts += rec.get("attempts", 0)
        cost.prompt_tokens += rec.get("prompt_tokens", 0)
        cost.completion_tokens += rec.get("completion_tokens", 0)
        cost.failures += 0 if rec.get("ok") else 1
    return records, cost, len(todo)


def _summary(out: Path, cost: Cost, new: int, extra: dict[str, Any] | None = None) -> None:
    doc = {"requests": cost.requests, "backend_calls": cost.attempts, "prompt_tokens": cost.prompt_tokens,
           "completion_tokens": cost.completion_tokens, "failures": cost.failures, "sent_this_run": new, **(extra or {})}
    (out / SUMMARY).write_text(json.dumps(doc, indent=2) + "\n")


def _settings(judge: Judge, what: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"what": what, "templates": judge.templates.source, "faithful": judge.templates.faithful,
            "backend": judge.backend.name, **extra}


# -- prompts ---------------------------------------------------------------------------------------------
def annotate_prompts(judge: Judge, prompts: Sequence[str], output_dir: str | os.PathLike,
                     templates: Sequence[str] = PROMPT_TEMPLATES, *, chunk: int = 32, retry_failed: bool = False,
                     progress: bool = False) -> AnnotationResult:
    """Run the prompt templates (processing, NSFW filtering, classification) over `prompts` into JSONL."""
    for t in templates:
        if judge.templates[t].kind != "prompt":
            raise ValueError(f"template {t!r} is not a prompt template; choose among {list(PROMPT_TEMPLATES)}.")
    out = Path(output_dir)
    _check_manifest(out, _settings(judge, "prompts", {"template_types": list(templates), "num_prompts": len(prompts)}))
    items = [(functools.partial(judge.request, t, p), {"prompt_index": i, "prompt": p})
             for i, p in enumerate(prompts) for t in templates]
    records, cost, new = _run_logged(judge, items, out, chunk, retry_failed, progress)
    _summary(out, cost, new)
    return AnnotationResult(out, records, cost, new)


# -- image sets ------------------------------------------------------------------------------------------
def _groups(n: int, limit: int | None) -> list[list[int]]:
    step = limit or n
    return [list(range(s, min(n, s + step))) for s in range(0, n, step)]


def annotate_image_sets(
    judge: Judge,
    sets: Sequence[ImageSet],
    output_dir: str | os.PathLike,
    dimensions: Sequence[str] = ("alignment", "aesthetic", "fidelity"),
    *,
    max_images_per_request: int | None = None,
    rule: str = "composite",
    dimension: str | None = None,
    margin: float = 0.0,
    pairs_per_prompt: int | None = 1,
    image_format: str = "png",
    chunk: int = 32,
    retry_failed: bool = False,
    progress: bool = False,
) -> AnnotationResult:
    """Score every set's images on `dimensions` (list-wise, as LePref does) and write preference pairs.

    Pairs follow `alignment.pairs.select_pairs` (`rule` 'dimension', 'composite' = mean of the dimensions,
    'dominance', or 'each' = one dataset per dimension under pairs/<dimension>/). A prompt with a failed
    request gets no pairs (its failure stays in the log).
    """
    from .pairs import RULES

    if rule not in (*RULES, "each"):
        raise ValueError(f"rule must be one of {[*RULES, 'each']}; got {rule!r}.")
    limit = max_images_per_request or judge.backend.max_images
    out = Path(output_dir)
    _check_manifest(out, _settings(judge, "images", {
        "dimensions": list(dimensions), "max_images_per_request": limit, "num_sets": len(sets)}))
    items = []
    for s in sets:
        for dim in dimensions:
            for g in _groups(len(s.images), limit):
                build = functools.partial(judge.request, f"annotation_{dim}", s.prompt, [s.images[i] for i in g])
                items.append((build, {"prompt_index": s.prompt_index, "prompt": s.prompt, "dimension": dim,
                                    "image_indices": g}))
    records, cost, new = _run_logged(judge, items, out, chunk, retry_failed, progress)
    scores = {}
    for s in sets:
        scores[s.prompt_index] = {d: torch.full((len(s.images),), float("nan")) for d in dimensions}
    for rec in records:
        if rec["ok"]:
            scores[rec["prompt_index"]][rec["dimension"]][rec["image_indices"]] = torch.tensor(
                rec["result"]["scores"], dtype=torch.float32)
    files, num = _write_pairs(sets, scores, list(dimensions), out / "pairs", rule, dimension, margin,
                              pairs_per_prompt, image_format)
    _summary(out, cost, new, {"pairs": num, "pair_files": [str(f.relative_to(out)) for f in files]})
    return AnnotationResult(out, records, cost, new, files, num)


def _image_bytes(image: Any, image_format: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    import io

    from reward_plugins.judge.requests import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buf.getvalue()


def _write_pairs(sets, scores, dims, pairs_dir: Path, rule, dimension, margin, pairs_per_prompt, image_format):
    from .pairs import _column, _schema, _write_shard, select_pairs

    plans = [(d, "dimension", d, pairs_dir / d) for d in dims] if rule == "each" else [(None, rule, dimension, pairs_dir)]
    files, total = [], 0
    for _, r, dim, where in plans:
        rows = []
        for s in sets:
            per_dim = scores[s.prompt_index]
            if any(torch.isnan(v).any() for v in per_dim.values()):
                continue
            composite = torch.stack([per_dim[d] for d in dims]).mean(0)
            main = per_dim[dim] if r == "dimension" else composite
            for w, lo, gap in select_pairs(composite, per_dim, r, dim, margin, pairs_per_prompt):
                seeds = s.seeds or [-1] * len(s.images)
                row = {"caption": s.prompt, "jpg_0": _image_bytes(s.images[w], image_format),
                       "jpg_1": _image_bytes(s.images[lo], image_format), "label_0": 1.0, "label_1": 0.0,
                       "prompt_index": s.prompt_index, "index_0": s.index(w), "index_1": s.index(lo), "seed_0": int(seeds[w]),
                       "seed_1": int(seeds[lo]), "score_0": float(main[w]), "score_1": float(main[lo]),
                       "margin": float(gap)}
                for d in dims:
                    row[_column(d) + "_0"] = float(per_dim[d][w])
                    row[_column(d) + "_1"] = float(per_dim[d][lo])
                rows.append(row)
        if rows:
            (where / "data").mkdir(parents=True, exist_ok=True)
            path = where / "data" / "train-p0-s0.parquet"
            _write_shard(path, rows, _schema(dims))
            files.append(path)
            total += len(rows)
    return files, total


# -- reading image sets ------------------------------------------------------------------------------------
def read_image_sets(source: str | os.PathLike) -> list[ImageSet]:
    """Image sets from a JSONL manifest ({"prompt", "images": [paths], "seeds"?} per line, paths relative to
    it), a `reward-align best-of-n` output dir (scores.json + images/), or a `reward-align pairs` dir."""
    src = Path(source)
    if src.is_file():
        return _from_jsonl(src)
    if (src / "scores.json").is_file():
        return _from_best_of_n(src)
    if (src / "manifest.json").is_file() and (src / "data").is_dir():
        return _from_pairs(src)
    raise FileNotFoundError(
        f"no image sets at {str(src)!r}: pass a JSONL manifest (one {{\"prompt\": ..., \"images\": [...]}} per line), "
        "a best-of-n output dir (with scores.json and images/), or a pairs dir (with manifest.json and data/)."
    )


def _from_jsonl(path: Path) -> list[ImageSet]:
    sets = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e}).") from e
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("images"), list) or not rec["images"]:
            raise ValueError(f"{path} line {n}: expected {{\"prompt\": str, \"images\": [path, ...]}}; got {line[:80]!r}.")
        imgs = [str((path.parent / p) if not Path(p).is_absolute() else p) for p in rec["images"]]
        for p in imgs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{path} line {n}: image {p!r} not found.")
        sets.append(ImageSet(rec["prompt"], imgs, list(rec.get("seeds") or []), len(sets)))
    if not sets:
        raise ValueError(f"{path} holds no image sets.")
    return sets


def _from_best_of_n(src: Path) -> list[ImageSet]:
    doc = json.loads((src / "scores.json").read_text())
    sets = []
    for p in doc["prompts"]:
        i = p["prompt_index"]
        found = sorted((src / "images").glob(f"prompt_{i:04d}_image_*_rank_*.png"))
        if len(found) < 2:
            continue
        idx = [int(f.name.split("_image_")[1].split("_")[0]) for f in found]
        seed_of = {r.get("image_index"): r.get("seed") for r in p["images"]}
        seeds = [int(seed_of[j]) if seed_of.get(j) is not None else -1 for j in idx]
        sets.append(ImageSet(p["prompt"], [str(f) for f in found], seeds, i, idx))
    if not sets:
        raise ValueError(f"{src}/images has fewer than 2 images for every prompt; rerun best-of-n with --save-images all.")
    return sets


def _from_pairs(src: Path) -> list[ImageSet]:
    import pyarrow.parquet as pq

    by_prompt: dict[int, dict[str, Any]] = {}
    for f in sorted((src / "data").rglob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            s = by_prompt.setdefault(row["prompt_index"], {"prompt": row["caption"], "images": {}})
            s["images"][row["index_0"]] = (row["jpg_0"], row["seed_0"])
            s["images"][row["index_1"]] = (row["jpg_1"], row["seed_1"])
    if not by_prompt:
        raise ValueError(f"{src}/data holds no pairs.")
    sets = []
    for i in sorted(by_prompt):
        imgs = by_prompt[i]["images"]
        order = sorted(imgs)
        sets.append(ImageSet(by_prompt[i]["prompt"], [imgs[j][0] for j in order], [imgs[j][1] for j in order], i, order))
    return sets
