"""`reward-align demo`: best-of-N end to end, fully offline, in seconds on a CPU.

By default it runs on the toy world (`alignment.toyworld`): the shipped, trained tiny text-to-image model
draws N images per held-out caption ("a red circle on the left"), the learned toy CLIP reward picks the
winner, and every image in the contact sheets carries the exact oracle's verdict (colour, shape,
position: 1 right, 0 wrong), so one can see whether the reward's winner is the image that matches.

`--train draft` is the short training demo: DRaFT-K on the toy world's soft oracle for `--train-steps`
steps on the training captions, then a before/after grid on the held-out captions (the same held-out
seeds before and after, every image with the exact oracle's verdict) and the accuracy gain it measured.

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


# The training demo's recipes: reward-gradient methods on the soft oracle, LoRA rank 8 on the UNet's
# attention, batch 8, lr 1e-3, 10 DDIM steps at guidance 7 (the efficacy benchmark's settings). DRaFT-K with
# K = 10 is the one that learns on this world (efficacy benchmark: 50 steps 0.188 -> 0.292 held-out exact,
# 200 steps 0.438); the others are there to compare and move less at the same budget.
# Each recipe: (description, method settings for `steps` sampler steps).
TRAIN_METHODS = {
    "draft": ("DRaFT-K (K = every sampler step, 10 by default)", lambda steps: {"k": steps}),
    "draft-lv": ("DRaFT-LV (n = 2)", lambda steps: {"lv_n": 2}),
    "alignprop": ("AlignProp (K ~ U{1..sampler steps})", lambda steps: {"truncation_range": [1, steps]}),
    "refl": ("ReFL (one gradient step at a late x0-hat)", lambda steps: {"refl_target": 1.0, "refl_scale": 1.0}),
}
TRAIN_LR = 1e-3
TRAIN_BATCH = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


def _train_config(method: str, steps: int, seed: int, sampler_steps: int, guidance: float, output_dir: Path):
    from ..toyworld import models, world
    from ..trainers.common import LoraSection, ModelSection, TrainSection
    from ..trainers.reward_finetune import (
        DataSection,
        MethodSection,
        RewardFinetuneConfig,
        RewardSection,
        SamplingSection,
    )

    return RewardFinetuneConfig(
        model=ModelSection(pipeline=str(models.PIPELINE_DIR)),
        lora=LoraSection(rank=8, target_modules=list(LORA_TARGETS)),
        train=TrainSection(seed=seed, lr=TRAIN_LR, max_steps=steps, batch_size=TRAIN_BATCH, save_every=0, log_every=1,
                           validate_every=0, output_dir=str(output_dir), report_to="none", max_grad_norm=1.0,
                           weight_decay=0.0),
        method=MethodSection(name=method, **TRAIN_METHODS[method][1](sampler_steps)),
        sampling=SamplingSection(num_steps=sampler_steps, guidance_scale=guidance, scheduler="ddim",
                                 checkpoint_unet=False, checkpoint_vae=False),
        reward=RewardSection(terms={"toyworld": 1.0}, normalize=False),
        data=DataSection(prompts=world.train_prompts(), val_prompts=world.train_prompts()[:2]),
    )


def _held_out_draw(pipe, prompts: list[str], n: int, seed: int, steps: int, guidance: float, batch_size: int) -> dict:
    """`n` images per prompt from fixed seeds, with the exact oracle's verdict and the soft oracle's score."""
    import torch

    from reward_plugins import create_reward

    from ..best_of_n import best_of_n

    exact, soft = create_reward("toyworld-exact"), create_reward("toyworld")
    res = best_of_n(pipe, prompts, exact, n, k=1, batch_size=batch_size, seed=seed, num_inference_steps=steps,
                    guidance_scale=guidance, progress=False)
    flat = res.images.flatten(0, 1)
    with torch.no_grad():
        soft_scores = soft.score(flat, [p for p in prompts for _ in range(n)]).scores.view(len(prompts), n)
    return {"images": res.images, "seeds": res.seeds, "soft": soft_scores,
            "verdict": {d: res.per_dim[d].float() for d in ("color", "shape", "position", "overall")}}


def _accuracy_line(draw: dict) -> str:
    return ", ".join(f"{d} {float(v.mean()):.3f}" for d, v in draw["verdict"].items())


def run_toyworld_training(args: argparse.Namespace) -> int:
    """Train a reward-gradient method on the soft oracle, then show held-out images before and after."""
    import html
    import json
    import shutil

    import torch

    from ..report import contact_sheet
    from ..toyworld import models, world
    from ..trainers.common import read_jsonl
    from ..trainers.reward_finetune import RewardFinetuner

    if args.train not in TRAIN_METHODS:
        raise ValueError(f"--train {args.train!r} is not a training demo; use one of {', '.join(TRAIN_METHODS)} "
                         "(e.g. --train draft).")
    if args.random or args.pipeline is not None or args.reward is not None:
        raise ValueError("--train runs on the toy world only; drop --random, --pipeline and --reward.")
    if args.train_steps < 1:
        raise ValueError(f"--train-steps must be >= 1; got {args.train_steps}.")
    t0 = time.perf_counter()
    prompts = args.prompts or world.heldout_prompts()
    for p in prompts:
        world.parse_caption(p)  # a clear error for a prompt outside the toy grammar
    steps = args.steps or models.DEFAULT_STEPS
    guidance = models.DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    seed = world.EVAL_SEED + args.seed  # held-out seeds: training samples use seeds below EVAL_SEED
    out = Path(args.output_dir)
    label, _ = TRAIN_METHODS[args.train]
    with _quiet_loading_bars():
        pipe = models.load_pipeline()
    print(f"toy world training demo: {label} on the soft oracle `toyworld`, lr {TRAIN_LR:g}, batch {TRAIN_BATCH}, "
          f"{args.train_steps} steps on the {len(world.train_prompts())} training captions;\n"
          f"judged by the exact oracle (never trained on) on {len(prompts)} captions x {args.n} seeds from {seed}, "
          f"{steps} sampler steps, guidance {guidance}")
    before = _held_out_draw(pipe, prompts, args.n, seed, steps, guidance, args.batch_size)
    print(f"before: {_accuracy_line(before)}")
    train_dir = out / "train"  # the demo's own run dir: a rerun starts it afresh
    shutil.rmtree(train_dir, ignore_errors=True)
    t_train = time.perf_counter()
    print(f"training ({args.train_steps} steps, about 3 CPU seconds each on one thread) ...", flush=True)
    torch.manual_seed(args.seed)
    with _quiet_loading_bars():
        trainer = RewardFinetuner(_train_config(args.train, args.train_steps, args.seed, steps, guidance, train_dir),
                                  pipe=pipe)
        summary = trainer.train()
    train_s = time.perf_counter() - t_train
    curve = [(r["step"], r["reward/mean"]) for r in read_jsonl(Path(summary["metrics"])) if "reward/mean" in r]
    if curve:
        shown = curve[:: max(1, len(curve) // 8)] + ([curve[-1]] if len(curve) > 1 else [])
        print("training reward (soft oracle, this step's batch): " +
              ", ".join(f"step {s} {r:.3f}" for s, r in dict(shown).items()))
    after = _held_out_draw(trainer.pipe, prompts, args.n, seed, steps, guidance, args.batch_size)
    print(f"after:  {_accuracy_line(after)}")

    dims = ("color", "shape", "position", "overall")
    gain = {d: float(after["verdict"][d].mean() - before["verdict"][d].mean()) for d in dims}
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    header = (f"top row: the base model; bottom row: after {args.train} ({args.train_steps} steps), the same seeds. "
              "Under each image the exact oracle's verdict (1 = drawn as the caption says, 0 = not).")
    sheets, per_prompt = [], []
    for i, p in enumerate(prompts):
        imgs = torch.cat([before["images"][i], after["images"][i]])
        per_dim = {f"oracle {d}": torch.cat([before["verdict"][d][i], after["verdict"][d][i]]).tolist()
                   for d in ("color", "shape", "position")}
        seeds = torch.cat([before["seeds"][i], after["seeds"][i]]).tolist()
        sheet = contact_sheet(imgs, p, per_dim, seeds=seeds, image_indices=list(range(args.n)) * 2, cell=128,
                              columns=args.n, header=header)
        path = out / "sheets" / f"prompt_{i:04d}.png"
        sheet.save(path)
        sheets.append(path)
        b, a = int(before["verdict"]["overall"][i].sum()), int(after["verdict"]["overall"][i].sum())
        per_prompt.append({"prompt": p, "before_overall": b, "after_overall": a, "images": args.n})
    doc = {"method": args.train, "description": label, "train_steps": args.train_steps, "lr": TRAIN_LR,
           "batch_size": TRAIN_BATCH, "reward": "toyworld", "judge": "toyworld-exact", "sampler_steps": steps,
           "guidance_scale": guidance, "seed": seed, "images_per_prompt": args.n,
           "before": {d: float(v.mean()) for d, v in before["verdict"].items()},
           "after": {d: float(v.mean()) for d, v in after["verdict"].items()}, "gain": gain,
           "soft_oracle": {"before": float(before["soft"].mean()), "after": float(after["soft"].mean())},
           "prompts": per_prompt, "lora": summary["lora"], "train_s": train_s}
    (out / "before_after.json").write_text(json.dumps(doc, indent=2))
    e = html.escape
    cards = "\n".join(f'<section><h2>{i}. {e(r["prompt"])}</h2><p>oracle overall: {r["before_overall"]}/{r["images"]} '
                      f'before, {r["after_overall"]}/{r["images"]} after</p><img src="sheets/{s.name}" '
                      f'alt="{e(r["prompt"])}" loading="lazy"></section>' for i, (r, s) in enumerate(zip(per_prompt, sheets)))
    gains = ", ".join(f"{d} {gain[d] * 100:+.1f}" for d in dims)
    (out / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>reward-align demo --train {e(args.train)}</title>"
        f"<h1>reward-align demo: {e(label)} on the toy world, before / after</h1><p>{e(header)}</p>"
        f"<p>held-out exact oracle accuracy, points: {e(gains)}</p>\n{cards}\n")
    print()
    for r in per_prompt:
        print(f"  {r['prompt']:34s} oracle overall {r['before_overall']}/{r['images']} -> {r['after_overall']}/{r['images']}")
    n_img = len(prompts) * args.n
    print(f"\nheld-out exact oracle accuracy ({n_img} images), before -> after: " +
          ", ".join(f"{d} {doc['before'][d]:.3f} -> {doc['after'][d]:.3f}" for d in dims) +
          f"\ngain, points: {gains} (one run; near 0.2 the standard error of {n_img} images is "
          f"~{100 * (0.2 * 0.8 / n_img) ** 0.5:.0f} points)")
    print(f"soft oracle (the training reward) on these images: {doc['soft_oracle']['before']:.3f} -> "
          f"{doc['soft_oracle']['after']:.3f}")
    print(f"wrote under {out}/: index.html, {len(sheets)} before/after sheets in sheets/, before_after.json; "
          f"the LoRA in train/")
    print(f"done in {time.perf_counter() - t0:.1f} s (training {train_s:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.train is not None:
        return run_toyworld_training(args)
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
    p.add_argument("--train", metavar="METHOD",
                   help=f"the training demo instead of best-of-N: {', '.join(TRAIN_METHODS)} on the toy world's soft "
                        "oracle, then a before/after grid on the held-out captions (--n images each; its run in "
                        "<output-dir>/train, replaced on every run)")
    p.add_argument("--train-steps", type=int, default=50,
                   help="--train: optimizer steps (default 50, about 3 CPU minutes)")
    p.set_defaults(func=run)
