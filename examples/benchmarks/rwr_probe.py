"""RWR diagnosis probe on the toy world: what fitting each source of samples with the RWR trainer's own denoising
loss (`RewardFinetuner._denoising_pred`, uniform weights) does to the held-out exact oracle and learned reward.

Sources: ``policy`` (the model's own CFG-7 samples, online), ``base`` (fresh base-model samples), ``basert`` (the same
decoded and re-encoded by the VAE), ``base_g1`` (base samples at CFG 1), ``real`` (rendered scenes with their true
captions: a control, not RWR) and ``pool`` (an offline pool: `pool_n` base images per training caption, re-encoded,
the best `keep_k` by the learned reward `toyworld-clip` kept); ``trainer`` runs the trainer's own steps
(`RewardFinetuner.train_step`, its pool and loss, the method settings in `mkw`, training seed `seed`), i.e. the
efficacy entry judged along one run. Each run is a JSON object of `run`'s arguments;
the numbers quoted in `efficacy_methods/rwr.py` came from runs like

    python examples/benchmarks/rwr_probe.py '[{"source": "basert", "steps": 30, "eval_at": [30]}]'
    python examples/benchmarks/rwr_probe.py '[{"source": "pool", "steps": 600, "lr": 1e-3, "eval_at": [300, 600]}]'

(OMP_NUM_THREADS=1, one thread). Results are appended to ``<cache-dir>/probe_results.jsonl``; pools are cached there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, render, world  # noqa: E402
from examples.benchmarks.efficacy_methods.registry import Context, evaluate, reward_finetune_trainer  # noqa: E402
from reward_plugins import create_reward  # noqa: E402

CACHE = Path("outputs/rwr_probe")


def make_trainer(steps, lr, batch, tag, lora_kw=None, seed=0, **mkw):
    """The efficacy entry's RWR trainer (`toyworld-clip`, uniform weights unless `mkw` says otherwise)."""
    ctx = Context(pipe=models.load_pipeline(), workdir=CACHE / "work", steps=10, guidance=7.0, scale=1.0, seed=seed)
    return reward_finetune_trainer(ctx, "rwr", "toyworld-clip", steps, lr, batch, work_name=tag, lora_kw=lora_kw,
                                   **{"rwr_weighting": "exp", "rwr_temperature": 1e6, **mkw})

@torch.no_grad()
def real_latents(tr, prompts, gen):
    attrs = [world.parse_caption(p) for p in prompts]
    x, _ = render.render(attrs, gen)
    vae = tr.pipe.vae
    return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor

@torch.no_grad()
def roundtrip(tr, latents):
    vae = tr.pipe.vae
    img = vae.decode(latents / vae.config.scaling_factor).sample
    return vae.encode(img.clamp(-1, 1)).latent_dist.mean * vae.config.scaling_factor

@torch.no_grad()
def full_pool(tr, pool_n):
    cache = CACHE / f"fullpool_{pool_n}.pt"
    if cache.is_file():
        return torch.load(cache)
    clip, exact = create_reward("toyworld-clip"), create_reward("toyworld-exact")
    lats, scores, ex = [], [], []
    for i, p in enumerate(tr.prompts):
        g = torch.Generator().manual_seed(50_000 + i)
        lat, img = [], []
        for _ in range(0, pool_n, 16):  # chunks of 16 images, one generator per caption
            z, im = tr.generate([p] * 16, g, base=True)
            lat.append(z)
            img.append(im)
        lat, img = torch.cat(lat), torch.cat(img)
        scores.append(clip.score(img, [p] * pool_n).scores)
        ex.append(torch.stack([exact.score(img, [p] * pool_n).per_dim[d] for d in ("color", "shape", "position", "overall")], 1))
        lats.append(roundtrip(tr, lat))
    out = (torch.stack(lats), torch.stack(scores), torch.stack(ex))
    torch.save(out, cache)
    return out

def build_pool(tr, pool_n, keep_k, rt=True):
    lats, scores, ex = full_pool(tr, pool_n)
    top = torch.topk(scores, keep_k, dim=1).indices
    kl = torch.stack([lats[i, top[i]] for i in range(len(tr.prompts))]).flatten(0, 1)
    ke = torch.stack([ex[i, top[i]] for i in range(len(tr.prompts))]).flatten(0, 1)
    print(f"pool {pool_n} keep {keep_k}: kept exact (gen images) c/s/p/o {[round(float(v), 3) for v in ke.float().mean(0)]}", flush=True)
    return kl, [p for p in tr.prompts for _ in range(keep_k)]

def run(source, steps=30, lr=5e-4, batch=16, uncond_p=0.0, eval_at=(), tag="p", pool_n=16, keep_k=2, rt=True, mkw=None, cosine=False, lora_kw=None, seed=0):
    tr = make_trainer(steps, lr, batch, tag, lora_kw=lora_kw, seed=seed, **(mkw or {}))
    print("trainable", sum(p.numel() for p in tr.params), flush=True)
    out = {"source": source, "steps": steps, "lr": lr, "uncond_p": uncond_p, "pool": [pool_n, keep_k, rt], "mkw": mkw, "cosine": cosine, "lora_kw": lora_kw, "seed": seed, "evals": {}}
    t0 = time.process_time()
    if source == "trainer":  # the trainer's own RWR steps (its pool, weights, options in `mkw`): an efficacy run's curve
        tr.unet.train()
        while tr.step < steps:
            tr.train_step()
            if tr.step in eval_at:
                tr.model.eval()
                ev = evaluate(tr.pipe, "toyworld-clip", 10, 7.0)
                tr.model.train()
                out["evals"][tr.step] = {**{k: round(v, 3) for k, v in ev["exact"].items()}, "reward": round(ev["reward"], 2)}
                print(source, tr.step, out["evals"][tr.step], f"cpu {time.process_time()-t0:.0f}", flush=True)
        return out
    if source == "pool":
        pool_lat, pool_pr = build_pool(tr, pool_n, keep_k, rt)
        print(f"pool cpu {time.process_time()-t0:.0f}", flush=True)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(len(tr.prompts), (batch,), generator=g)
        prompts = [tr.prompts[i] for i in idx.tolist()]
        if source == "pool":
            idx = torch.randint(len(pool_pr), (batch,), generator=g)
            lat, prompts = pool_lat[idx], [pool_pr[i] for i in idx.tolist()]
        elif source == "real":
            lat = real_latents(tr, prompts, g)
        else:
            if "_g1" in source:
                tr.cfg.sampling.guidance_scale = 1.0
            lat, img = tr.generate(prompts, g, base=source.startswith("base"))
            tr.cfg.sampling.guidance_scale = 7.0
            if step == 0:
                rl = real_latents(tr, prompts, g)
                print("latent std gen", float(lat.std()), "real", float(rl.std()), "absmax gen", float(lat.abs().amax(dim=(1,2,3)).mean()), "real", float(rl.abs().amax(dim=(1,2,3)).mean()), flush=True)
            if source.endswith("rt"):
                lat = roundtrip(tr, lat)
        tp = list(prompts)
        if uncond_p:
            drop = torch.rand(batch, generator=g) < uncond_p
            tp = ["" if d else p for d, p in zip(drop.tolist(), prompts)]
        cond, uncond = tr._encode(tp)
        guided = uncond if tr.cfg.method.rwr_target == "guided" else None  # as the trainer's `_rwr_step`
        pred, target, _, _ = tr._denoising_pred(lat, cond, g, guided)
        loss = ((pred - target) ** 2).mean()
        if cosine:
            for gr in tr.optimizer.param_groups:
                gr["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        tr.optimizer.zero_grad()
        tr.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
        tr.optimizer.step()
        if step + 1 in eval_at:
            ev = evaluate(tr.pipe, "toyworld-clip", 10, 7.0)
            out["evals"][step + 1] = {**{k: round(v, 3) for k, v in ev["exact"].items()}, "reward": round(ev["reward"], 2)}
            print(source, step + 1, out["evals"][step + 1], f"cpu {time.process_time()-t0:.0f}", flush=True)
    return out

def main(argv: list[str] | None = None) -> int:
    global CACHE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a JSON list of run settings (the arguments of `run`)")
    p.add_argument("--cache-dir", default=str(CACHE))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    CACHE = Path(args.cache_dir)
    CACHE.mkdir(parents=True, exist_ok=True)
    for c in json.loads(args.runs):
        r = run(**c)
        with open(CACHE / "probe_results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
