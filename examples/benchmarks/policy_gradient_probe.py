"""Why policy gradient does or does not learn on the toy world: the gradient's signal-to-noise ratio, and the
held-out exact oracle along one run.

``snr``: at the base model, the DDPO / Flow-GRPO gradient of each group (one caption's G rollouts, its
advantages, the trained steps' log-probs) on the LoRA, for `--epochs` x `--prompts` groups, and
``s = mean_{i != j} g_i . g_j / mean_i |g_i|^2``. Independent groups make the numerator an unbiased estimate
of |E g|^2, so s is the share of a group gradient's squared norm that is signal. An update over n groups then
points at the true gradient with cosine sqrt(n s / (1 + n s)). For a reward linear in the step noise, no
score-function estimator does better than s = 1 / (1 + D / G), D = trained steps x latent elements
(``--noise-block f``: block-constant step noise, D = trained steps x latent elements / f^2). Also printed:
``s_se``, the jackknife standard error of s over groups, ``reward_mean`` (the rollouts' mean reward) and
``reward_group_std``, the mean within-group std of the reward (how much the credited step noise moves it).

``curve``: the efficacy entry's `policy_gradient` / `flow_grpo` setup, trained epoch by epoch and judged by
the benchmark's `evaluate` (held-out captions and seeds) at each of ``--evals`` epochs. Every draw of the
trainer is seeded by its epoch, so the model at epoch e is the one an e-epoch run produces; training CPU time
is counted apart from the evaluations'.

Rewards: ``exact`` (the exact oracle's three 0/1 dimensions), ``soft`` (the soft oracle's three dimensions,
used through their values only), ``clip`` (`toyworld-clip`).

Example:
    OMP_NUM_THREADS=1 python examples/benchmarks/policy_gradient_probe.py snr --reward soft --window 0,4
    OMP_NUM_THREADS=1 python examples/benchmarks/policy_gradient_probe.py curve --reward soft --window 0,1 \\
        --epochs 80 --lr 2e-3 --evals 20,40,60,80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, world  # noqa: E402
from examples.benchmarks.efficacy_methods.registry import Context, common_train, evaluate, load_base  # noqa: E402

DIMENSIONS = ("color", "shape", "position")
REWARDS = {
    "exact": {f"toyworld-exact:{d}": 1.0 for d in DIMENSIONS},
    "soft": {f"toyworld:{d}": 1.0 for d in DIMENSIONS},
    "clip": {"toyworld-clip": 1.0},
}


def build_trainer(args, ctx: Context, epochs: int, pipe):
    """The efficacy entry's `PolicyGradientTrainer` (LoRA 8, 10 steps, CFG 7) with the probe's settings."""
    from alignment.trainers.policy_gradient import (
        PGSamplingSection,
        PolicyGradientConfig,
        PolicyGradientTrainer,
        PolicySection,
    )
    from alignment.trainers.reward_finetune import DataSection, RewardSection

    model, lora, train = common_train(ctx, "probe", epochs, args.lr, args.batch)
    steps = {"train_steps": "all"}
    if args.window is not None:
        start, size = args.window
        # window_shift 0 keeps the window at steps 0..size-1; another start is set on the trainer below
        steps = {"train_steps": "window", "window_size": size, "window_shift": 0, "ode_outside_window": True}
    cfg = PolicyGradientConfig(
        model=model, lora=lora, train=train,
        method=PolicySection(name="ddpo" if args.base == "sd" else "grpo", group_size=args.group,
                             prompts_per_epoch=args.prompts, clip_range=args.clip_range,
                             shared_noise=not args.independent_noise, global_std=args.global_std, **steps),
        sampling=PGSamplingSection(num_steps=ctx.steps, guidance_scale=ctx.guidance, eta=args.eta,
                                   noise_level=args.noise_level, flow_kind="sde", noise_block=args.noise_block,
                                   batch_size=64, reward_batch_size=64),
        reward=RewardSection(terms=REWARDS[args.reward], normalize=False),
        data=DataSection(prompts=world.train_prompts(), val_prompts=world.train_prompts()[:2]),
    )
    cfg.eval_reward = None
    trainer = PolicyGradientTrainer(cfg, pipe=pipe)
    if args.window is not None and args.window[0]:
        trainer._window_start = lambda epoch: args.window[0]  # a fixed window elsewhere than step 0
    return trainer


def snr(args, ctx: Context) -> dict:
    from alignment.sampling_logprob import transition

    tr = build_trainer(args, ctx, 1, load_base(base=args.base))
    grads, spreads, means = [], [], []
    for e in range(args.epochs):
        ro = tr.sample_epoch(100 + e)
        adv, _, _ = tr.advantages(ro)
        steps = tr._trained_steps(100 + e, args.group * args.prompts, torch.Generator().manual_seed(e))
        for g in torch.unique(ro.groups).tolist():
            rows = torch.nonzero(ro.groups == g).flatten()
            spreads.append(float(ro.rewards[rows].std(unbiased=False)))
            means.append(float(ro.rewards[rows].mean()))
            a = adv[rows].clamp(-5, 5)
            tr.optimizer.zero_grad(set_to_none=True)
            if float(a.abs().sum()) == 0:  # a group whose rewards agree has no gradient
                grads.append(None)
                continue
            cond, uncond = tr._encode([tr.prompts[i] for i in ro.prompt_ids[rows].tolist()])
            predict = tr._predictor(tr.model, cond, uncond, True)
            for j in range(steps.shape[1]):
                st = steps[rows, j]
                out = transition(tr.sampler, predict, ro.traj.latents[rows, st], ro.traj.latents[rows, st + 1], st)
                (-(a * out.log_prob).sum() / (len(rows) * steps.shape[1])).backward()
            grads.append(torch.cat([p.grad.flatten() for p in tr.params if p.grad is not None]).clone())
    width = next(x for x in grads if x is not None).numel()
    gm = torch.stack([x if x is not None else torch.zeros(width) for x in grads]).double()
    gram = gm @ gm.T
    k = gram.shape[0]
    off, diag = gram.sum() - gram.diag().sum(), gram.diag()
    s = float(off / (k * (k - 1)) / diag.mean())
    se = None  # jackknife over groups (leave one group out): the standard error of s, from 3 groups
    if k >= 3:
        row_off = gram.sum(1) - diag
        loo = ((off - 2 * row_off) / ((k - 1) * (k - 2))) / ((diag.sum() - diag) / (k - 1))
        se = round(float(((k - 1) / k * ((loo - loo.mean()) ** 2).sum()).sqrt()), 4)
    trained = steps.shape[1]
    latent = int(torch.tensor(tr._latent_shape()).prod())
    dims = trained * latent // args.noise_block**2  # the step noise's dimensions the log-probs credit
    return {"s_group": round(s, 4), "s_se": se, "groups": k, "noise_dims": dims,
            "reward_mean": round(sum(means) / len(means), 4), "reward_group_std": round(sum(spreads) / len(spreads), 4),
            "ceiling_linear_reward": round(1 / (1 + dims / args.group), 4),
            "cosine_per_64_image_update": round((64 / args.group * max(s, 0) / (1 + 64 / args.group * max(s, 0))) ** 0.5, 3)}


def curve(args, ctx: Context) -> list[dict]:
    evals = sorted({int(x) for x in args.evals.split(",")})
    c0 = time.process_time()
    tr = build_trainer(args, ctx, evals[-1], ctx.pipe)
    tr.output_dir.mkdir(parents=True, exist_ok=True)
    train_cpu = time.process_time() - c0
    rows = []
    for epoch in range(1, evals[-1] + 1):
        c1 = time.process_time()
        scalars = tr.train_epoch()
        train_cpu += time.process_time() - c1
        if epoch in evals:
            ev = evaluate(ctx.pipe, "toyworld-exact", ctx.steps, ctx.guidance, base=args.base)
            rows.append({"epoch": epoch, "images": epoch * args.group * args.prompts, "train_cpu_s": round(train_cpu),
                         "train_reward": round(scalars["reward/mean"], 3),
                         "approx_kl": scalars.get("policy/approx_kl"), "clipfrac": scalars.get("policy/clipfrac"),
                         **{d: round(v, 3) for d, v in ev["exact"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=("snr", "curve"))
    p.add_argument("--base", choices=("sd", "flow"), default="sd")
    p.add_argument("--reward", choices=sorted(REWARDS), default="soft")
    p.add_argument("--window", default="0,4", help="START,SIZE: train steps START..START+SIZE-1, ODE elsewhere; "
                                                   "'all' trains every step with noise everywhere")
    p.add_argument("--independent-noise", action="store_true", help="a group's samples start from their own noise")
    p.add_argument("--global-std", action="store_true", help="advantages divide by the epoch's std (Flow-GRPO)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6, help="snr: rollout rounds (groups = epochs x prompts)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--noise-level", type=float, default=0.7)
    p.add_argument("--noise-block", type=int, default=1, help="sampling.noise_block f: step noise drawn at latent "
                                                              "size / f and upsampled (1: per-element noise)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--clip-range", type=float, default=1e-2)
    p.add_argument("--evals", default="20,40", help="curve: epochs at which to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/pg_probe")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.window == "all":
        args.window = None
    else:
        try:
            args.window = tuple(int(x) for x in args.window.split(","))
            assert len(args.window) == 2 and args.window[0] >= 0 and args.window[1] >= 1
        except (ValueError, AssertionError):
            print(f"error: --window must be START,SIZE (e.g. 0,4) or 'all'; got {args.window!r}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ctx = Context(load_base(base=args.base), Path(args.out), models.DEFAULT_STEPS, models.DEFAULT_GUIDANCE, 1.0,
                  args.seed, base=args.base)
    t0 = time.process_time()
    res = snr(args, ctx) if args.probe == "snr" else curve(args, ctx)
    print(json.dumps({"probe": args.probe, "settings": {k: v for k, v in vars(args).items() if k != "probe"},
                      "result": res, "cpu_s": round(time.process_time() - t0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
