"""`reward-align best-of-n`: sample N images per prompt, rerank them with a reward, and write contact sheets,
an HTML index and the scores (JSON, CSV).

Example:
    reward-align best-of-n --config configs/sd15_best_of_n.yaml --output-dir outputs/bon
    reward-align best-of-n --config configs/tiny/best_of_n.yaml --n 8 --set guidance_scale=5
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..configs import count

PIPELINE_HELP = ("diffusers pipeline: hub id or dir written by save_pretrained; "
                 "'tiny-sd'/'tiny-sdxl'/'tiny-sd3'/'tiny-flux' = random tiny")


@dataclass
class GenerationConfig:
    """What every generate-and-score job shares (best-of-N, pair mining).

    `pipeline` is a hub id or local dir (``DiffusionPipeline.from_pretrained``), or ``tiny-<family>``
    (``tiny-sd``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``) for a random tiny pipeline (offline tests). `device` None picks cuda when available;
    `dtype` 'auto' is bf16 on cuda and fp32 elsewhere; `reward_dtype` None follows `dtype`.
    """

    pipeline: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    reward: str = "pickscore"
    checkpoint: str | None = None
    backbone: str | None = None
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    max_prompts: int | None = count(None)
    n: int = count(4)
    batch_size: int = count(8)
    seed: int = 0
    num_inference_steps: int = count(30)
    guidance_scale: float = 7.5
    height: int | None = count(None, minimum=8)
    width: int | None = count(None, minimum=8)
    device: str | None = None
    dtype: str = "auto"
    reward_dtype: str | None = None
    output_dir: str = "outputs/run"


@dataclass
class BestOfNJobConfig(GenerationConfig):
    """`reward-align best-of-n`: keep the top `k` of `n`; `save_images` is 'top_k', 'all' or 'none'."""

    k: int = count(1)
    output_dir: str = "outputs/best_of_n"
    save_images: str = "top_k"
    cell_size: int = count(192)


def read_prompts(cfg: GenerationConfig) -> list[str]:
    """Prompts from `cfg.prompts` then `cfg.prompts_file` (.txt: one per line, '#' comments; .tsv/.csv: the
    'Prompt' or 'prompt' column, else the first), truncated to `cfg.max_prompts`."""
    prompts = list(cfg.prompts or [])
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {str(path)!r}; pass a .txt (one prompt a line) or .tsv.")
        if path.suffix.lower() in (".tsv", ".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                cols = reader.fieldnames or []
                col = next((c for c in ("Prompt", "prompt", "caption") if c in cols), cols[0] if cols else None)
                prompts += [row[col].strip() for row in reader if col and row.get(col, "").strip()]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if cfg.max_prompts is not None:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable), --prompts-file FILE, or `prompts:` in the config.")
    return prompts


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: str) -> str:
    if dtype in (None, "auto"):
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return dtype


def build_pipeline(source: str, device: str, dtype: str):
    """A pipeline from a hub id/dir, or a random tiny one for 'tiny-<family>' (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux)."""
    from reward_plugins.registry import resolve_dtype as to_torch_dtype

    from ..tiny import load_pipeline, tiny_families, tiny_pipeline

    torch_dtype = to_torch_dtype(dtype)
    if source.startswith("tiny-") and source[5:] in tiny_families():
        return tiny_pipeline(source[5:]).to(device, torch_dtype)
    return load_pipeline(source, device=device, dtype=torch_dtype)


def build_reward(cfg: GenerationConfig, device: str, dtype: str):
    from reward_plugins import create_reward

    kwargs = {k: getattr(cfg, k) for k in ("checkpoint", "backbone") if getattr(cfg, k)}
    return create_reward(cfg.reward, device=device, dtype=cfg.reward_dtype or dtype, **kwargs)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by best-of-n and pairs; each overrides the same key of the YAML config."""
    p.add_argument("--config", help="YAML config (see configs/); flags override its keys")
    p.add_argument("--output-dir", dest="output_dir", help="where to write the results")
    p.add_argument("--pipeline", help=PIPELINE_HELP)
    p.add_argument("--reward", help="reward name, e.g. pickscore, lescore, lescore:fidelity, pickscore-tiny")
    p.add_argument("--checkpoint", help="the reward's official checkpoint file or model dir/hub id")
    p.add_argument("--backbone", help="HF model dir or hub id supplying the reward's config and tokenizer")
    p.add_argument("--prompt", dest="prompts", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", dest="prompts_file", help=".txt (one prompt per line) or .tsv with a Prompt column")
    p.add_argument("--max-prompts", dest="max_prompts", type=int)
    p.add_argument("--n", type=int, help="images per prompt")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per pipeline call (memory budget)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", dest="num_inference_steps", type=int, help="denoising steps")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", help="auto, fp32, bf16 or fp16 (pipeline; the reward too unless --reward-dtype)")
    p.add_argument("--reward-dtype", dest="reward_dtype")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (YAML value), e.g. --set guidance_scale=5")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def config_from_args(cls, args: argparse.Namespace, flag_keys: tuple[str, ...] = ()):
    """The YAML config (if any) with `--set` overrides, then the explicit flags on top."""
    from ..configs import load_config

    overrides: dict[str, Any] = {}
    for item in args.overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE (e.g. --set guidance_scale=5).")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    keys = ("output_dir", "pipeline", "reward", "checkpoint", "backbone", "prompts", "prompts_file", "max_prompts",
            "n", "batch_size", "seed", "num_inference_steps", "guidance_scale", "height", "width", "device", "dtype",
            "reward_dtype", *flag_keys)
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return load_config(cls, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from ..best_of_n import best_of_n
    from ..configs import save_config
    from ..report import write_report

    cfg = config_from_args(BestOfNJobConfig, args, ("k", "save_images"))
    prompts = read_prompts(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = build_pipeline(cfg.pipeline, device, dtype)
    reward = build_reward(cfg, device, dtype)
    res = best_of_n(
        pipe, prompts, reward, cfg.n, k=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
        width=cfg.width, progress=args.progress, keep_images=keep_all_images(pipe, cfg, len(prompts)),
    )
    out = Path(cfg.output_dir)
    files = write_report(res, out, title=f"best-of-{cfg.n}: {cfg.reward}", cell=cfg.cell_size,
                         save_images=cfg.save_images)
    save_config(cfg, out / "config.yaml")
    print(format_summary(res))
    print(f"\nwrote {files.index} ({len(files.sheets)} contact sheets), {files.scores_json.name}, {files.scores_csv.name}"
          f" under {out}{os.sep}")
    return 0


KEEP_IMAGES_BYTES = 4 * 2**30


def keep_all_images(pipe, cfg: BestOfNJobConfig, num_prompts: int) -> bool:
    """Keep every image (contact sheets show all N) unless they would take more than 4 GiB of CPU memory;
    then only the top-k are kept and shown. `save_images: all` always keeps them."""
    from ..pipelines import PipelineAdapter

    res = PipelineAdapter(pipe).default_resolution
    pixels = (cfg.height or res) * (cfg.width or res)
    return cfg.save_images == "all" or num_prompts * cfg.n * 3 * pixels * 4 <= KEEP_IMAGES_BYTES


def format_summary(res) -> str:
    """A small table: each prompt's winner, its seed and scores."""
    dims = list(res.per_dim)
    width = min(48, max(6, *(len(p) for p in res.prompts)))
    head = f"{'prompt':<{width}}  {'best':>4}  {'seed':>6}  {'score':>9}" + "".join(f"  {d[:12]:>12}" for d in dims)
    lines = [head, "-" * len(head)]
    for i, p in enumerate(res.prompts):
        j = int(res.best_indices[i])
        text = p if len(p) <= width else p[: width - 1] + "…"
        lines.append(f"{text:<{width}}  {j:>4}  {int(res.seeds[i, j]):>6}  {float(res.scores[i, j]):>9.4f}"
                     + "".join(f"  {float(res.per_dim[d][i, j]):>12.4f}" for d in dims))
    t = res.timings
    lines.append(f"\n{int(t['images'])} images in {t['total_s']:.1f} s; reward {100 * res.reward_fraction:.1f} % of it.")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("best-of-n", help="sample N images per prompt and keep the best by a reward",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--k", type=int, help="images kept per prompt")
    p.add_argument("--save-images", dest="save_images", choices=("top_k", "all", "none"))
    p.set_defaults(func=run)
