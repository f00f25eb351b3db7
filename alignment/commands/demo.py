"""`reward-align demo`: best-of-N end to end, fully offline, in seconds on a CPU.

By default it runs on the toy world (`alignment.toyworld`): the shipped, trained tiny text-to-image model
draws N images per held-out caption ("a red circle on the left"), the learned toy CLIP reward picks the
winner, and every image in the contact sheets carries the exact oracle's verdict (colour, shape,
position: 1 right, 0 wrong), so one can see whether the reward's winner is the image that matches.

`--random` keeps the plumbing check: a tiny Stable Diffusion pipeline and a tiny LeScore with RANDOM
weights, saved in their real formats (diffusers `save_pretrained`; LeScore's official `LeScore.pt` plus a
CLIP model dir) and loaded back through the real loaders; images are noise and scores meaningless.
On real weights:

    reward-align demo --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --reward lescore --checkpoint LeScore.pt
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import tempfile
import time
from pathlib import Path

DEMO_PROMPTS = [
    "a red fox sitting in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon, oil painting",
]

REAL_COMMAND = (
    "reward-align demo --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "--reward lescore --checkpoint /path/to/LeScore.pt"
)


def _lescore_module():
    """`reward_plugins.rewards.lescore` when it is installed, else None (the demo then uses PickScore)."""
    if importlib.util.find_spec("reward_plugins.rewards.lescore") is None:
        return None
    return importlib.import_module("reward_plugins.rewards.lescore")


def build_demo_reward(workdir: Path, device: str = "cpu"):
    """A tiny random reward written in its official on-disk format and loaded back with `create_reward`.

    LeScore: `write_official_lescore` -> LeScore.pt, `save_tiny_clip_dir` -> backbone dir. Without the LeScore
    module: PickScore from a tiny CLIP model dir (its checkpoint format is an HF model dir).

    Returns:
        (reward, description)
    """
    from reward_plugins import create_reward
    from reward_plugins.testing import save_tiny_clip_dir

    clip_dir = save_tiny_clip_dir(workdir / "tiny-clip")
    mod = _lescore_module()
    if mod is not None and hasattr(mod, "write_official_lescore"):
        ckpt = mod.write_official_lescore(workdir / "LeScore.pt", seed=0)
        reward = create_reward("lescore", checkpoint=str(ckpt), backbone=str(clip_dir), device=device)
        return reward, f"tiny LeScore (random) loaded from {ckpt.name} + a CLIP dir"
    reward = create_reward("pickscore", checkpoint=str(clip_dir), backbone=str(clip_dir), device=device)
    return reward, "tiny PickScore (random) loaded from a CLIP model dir (LeScore module not available)"


@contextlib.contextmanager
def _quiet_loading_bars():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was_d, was_t = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_d:
            dlog.enable_progress_bar()
        if was_t:
            tlog.enable_progress_bar()


def _banner(lines: list[str]) -> str:
    width = max(len(s) for s in lines) + 4
    bar = "=" * width
    return "\n".join([bar, *(f"  {s}" for s in lines), bar])


def run_toyworld(args: argparse.Namespace) -> int:
    """Best-of-N on the toy world with the oracle's verdict on every image."""
    import dataclasses

    from reward_plugins import create_reward

    from ..best_of_n import best_of_n
    from ..report import write_report
    from ..toyworld import models, world

    t0 = time.perf_counter()
    prompts = args.prompts or world.heldout_prompts()[::5]
    for p in prompts:
        world.parse_caption(p)  # a clear error for a prompt outside the toy grammar
    steps = args.steps or models.DEFAULT_STEPS
    guidance = models.DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    with _quiet_loading_bars():
        pipe = models.load_pipeline()
        selector = create_reward(args.selector)
    exact = create_reward("toyworld-exact")
    print(f"toy world: the shipped tiny text-to-image model ({models.PIPELINE_DIR}),\n"
          f"selector:  {args.selector} (picks the winner); judge: toyworld-exact (the oracle, never trained on)\n"
          f"best-of-{args.n} for {len(prompts)} held-out captions, {steps} steps, guidance {guidance}")
    res = best_of_n(pipe, prompts, selector, args.n, k=1, batch_size=args.batch_size, seed=args.seed,
                    num_inference_steps=steps, guidance_scale=guidance, progress=not args.no_progress)
    flat = res.images.flatten(0, 1)
    verdict = exact.score(flat, [p for p in prompts for _ in range(res.n)]).per_dim
    per_dim = {f"{args.selector.split(':')[0]}": res.scores}
    per_dim.update({f"oracle {d}": verdict[d].view(len(prompts), res.n) for d in ("color", "shape", "position", "overall")})
    shown = dataclasses.replace(res, per_dim=per_dim)
    note = ("Each image shows the selector's score and the exact oracle's verdict (1 = the caption's colour, shape "
            "or position is drawn, 0 = not). The framed image is the selector's choice.")
    files = write_report(shown, args.output_dir, title="reward-align demo: best-of-N on the toy world", note=note,
                         cell=160)
    overall = per_dim["oracle overall"]
    winners = overall.gather(1, res.top_indices[:, :1]).squeeze(1)
    print()
    for i, p in enumerate(prompts):
        marks = " ".join("*" if v else "." for v in overall[i].tolist())
        print(f"  {p:34s} oracle per image [{marks}]  winner {'matches' if winners[i] else 'does not match'}")
    print(f"\noracle overall accuracy: a random image {float(overall.mean()):.2f}, the {args.selector} winner "
          f"{float(winners.float().mean()):.2f} (best-of-{args.n})")
    print(f"wrote under {args.output_dir}/: {files.index.name}, {len(files.sheets)} contact sheets in sheets/, "
          f"{files.scores_json.name}, {files.scores_csv.name}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.random and args.pipeline is None and args.reward is None:
        return run_toyworld(args)
    from reward_plugins import create_reward

    from ..best_of_n import best_of_n
    from ..report import write_report
    from ..tiny import load_pipeline, save_tiny_pipeline
    from .best_of_n import format_summary, resolve_device, resolve_dtype

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tiny_pipe, tiny_reward = args.pipeline is None, args.reward is None
    random_parts = [name for name, tiny in (("pipeline", tiny_pipe), ("reward", tiny_reward)) if tiny]
    if random_parts:
        print(_banner([
            f"RANDOM WEIGHTS: the {' and the '.join(random_parts)} below {'are' if len(random_parts) > 1 else 'is'} "
            "tiny and randomly initialised.",
            "The images are noise and the scores mean nothing; this run checks the plumbing, offline.",
            "On real weights (a GPU helps):",
            f"  {REAL_COMMAND}",
        ]))
    from reward_plugins.registry import resolve_dtype as to_torch_dtype

    # Saving and reloading tiny models prints several "Loading/Writing ..." bars that say nothing here.
    with _quiet_loading_bars(), tempfile.TemporaryDirectory(prefix="reward-align-demo-") as tmp:
        work = Path(tmp)
        if tiny_pipe:
            # Written with save_pretrained and read back with from_pretrained: the path real checkpoints take.
            path = save_tiny_pipeline(work / "tiny-sd")
            pipe = load_pipeline(path, device=device, dtype=to_torch_dtype(dtype))
            pipe_desc = "tiny Stable Diffusion (random), saved and reloaded with from_pretrained"
        else:
            pipe = load_pipeline(args.pipeline, device=device, dtype=to_torch_dtype(dtype))
            pipe_desc = args.pipeline
        if tiny_reward:
            reward, reward_desc = build_demo_reward(work, device)
        else:
            kwargs = {k: getattr(args, k) for k in ("checkpoint", "backbone") if getattr(args, k)}
            reward = create_reward(args.reward, device=device, dtype=dtype, **kwargs)
            reward_desc = args.reward
        steps = args.steps or (6 if tiny_pipe else 30)
        prompts = args.prompts or DEMO_PROMPTS
        print(f"pipeline: {pipe_desc}\nreward:   {reward_desc}\n"
              f"best-of-{args.n} for {len(prompts)} prompts, {steps} steps, on {device} ({dtype})")
        res = best_of_n(pipe, prompts, reward, args.n, k=1, batch_size=args.batch_size, seed=args.seed,
                        num_inference_steps=steps, guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                        progress=not args.no_progress)
    note = None
    if random_parts:
        note = (f"Random weights ({' and '.join(random_parts)}): images are noise and scores are meaningless. "
                f"Run on real ones with: {REAL_COMMAND}")
    files = write_report(res, args.output_dir, title="reward-align demo: best-of-N", note=note, cell=160)
    print()
    print(format_summary(res))
    print(f"\nwrote under {args.output_dir}/: {files.index.name} (open it in a browser), "
          f"{len(files.sheets)} contact sheets in sheets/, {files.scores_json.name}, {files.scores_csv.name}, "
          f"winners in images/")
    if random_parts:
        print(f"\nThese weights are random. For real images and scores:\n  {REAL_COMMAND}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="offline best-of-N on the toy world (or --random: tiny random SD + LeScore)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/demo", help="where the report goes (default outputs/demo)")
    p.add_argument("--random", action="store_true",
                   help="the plumbing check: tiny random SD pipeline and tiny random LeScore instead of the toy world")
    p.add_argument("--selector", default="toyworld-clip",
                   help="toy world: the reward that picks the winner (default toyworld-clip; e.g. toyworld)")
    p.add_argument("--pipeline", help="real pipeline: hub id or dir (default: a tiny random one)")
    p.add_argument("--reward", help="real reward name, e.g. lescore (default: a tiny random LeScore)")
    p.add_argument("--checkpoint", help="the reward's checkpoint, e.g. LeScore.pt")
    p.add_argument("--backbone", help="the reward's backbone dir or hub id")
    p.add_argument("--prompt", dest="prompts", action="append", help="a prompt (repeatable)")
    p.add_argument("--n", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--steps", type=int, help="denoising steps (default 6 tiny, 30 real)")
    p.add_argument("--guidance-scale", type=float, help="default: the toy world's 7.0, else 7.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, bf16, fp16")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
