"""Train the toy world's text-to-image model on the real diffusers classes, on a CPU, seeded and resumable.

Two stages: (1) the AutoencoderKL on rendered scenes (reconstruction + a tiny KL term); its latent
scaling factor is set to 1 / std of the latents, as in SD. (2) the UNet2DConditionModel, conditioned on
the frozen text tower of the toy CLIP (`train_clip.py`, run first), epsilon prediction on DDPM noise, on
a fixed, seeded set of scenes whose
captions come only from the 72 training combinations. The model is deliberately imperfect: each of a
caption's three attributes (colour, shape, position) is, independently with probability
``--wrong-fraction`` (default 0.25), drawn wrong in its image, so a perfect fit follows each attribute in
about 75 % of samples; 10 % of captions are dropped (empty) for classifier-free guidance.

    python examples/toyworld/train_pipeline.py --out outputs/toyworld/pipeline      # resumes if interrupted

Writes ``<out>/final/`` (a `StableDiffusionPipeline.save_pretrained` dir, safetensors) and
``<out>/record.json`` (command, seed, data size, steps, wall time). `ship_weights.py` copies it into the
package with its manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from alignment.toyworld import models, render, world


def corrupt(attrs: world.Attributes, p: float, gen: torch.Generator) -> world.Attributes:
    """Each attribute independently replaced, with probability p, by a uniformly drawn other value."""
    choices = {"color": list(world.COLORS), "shape": list(world.SHAPES), "position": list(world.POSITIONS)}
    out = {}
    for dim, values in choices.items():
        value = attrs.get(dim)
        if float(torch.rand(1, generator=gen)) < p:
            others = [v for v in values if v != value]
            value = others[int(torch.randint(len(others), (1,), generator=gen))]
        out[dim] = value
    return world.Attributes(**out)


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def train_vae(args, out: Path):
    vae = models.build_vae()
    ckpt = out / "vae_ckpt.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
        if step >= args.vae_steps:
            return vae, st["scaling_factor"]
    combos = world.all_combinations()
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae", mininterval=10)
    while step < args.vae_steps:
        idx = torch.randint(len(combos), (args.vae_batch,), generator=gen)
        x, _ = render.render([combos[i] for i in idx], gen)
        post = vae.encode(x * 2 - 1).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x * 2 - 1) + 0.5 * F.l1_loss(rec, x * 2 - 1) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % args.save_every == 0 or step == args.vae_steps:
            scaling = latent_scaling(vae, gen) if step == args.vae_steps else None
            save_state(ckpt, model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step,
                       scaling_factor=scaling)
    bar.close()
    return vae, torch.load(ckpt, weights_only=False)["scaling_factor"]


@torch.no_grad()
def latent_scaling(vae, gen: torch.Generator) -> float:
    x, _ = render.render(world.all_combinations() * 4, gen)
    return float(1.0 / vae.encode(x * 2 - 1).latent_dist.mean.std())


@torch.no_grad()
def build_dataset(args, vae, scaling: float, tokenizer, out: Path):
    path = out / "dataset.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    gen = torch.Generator().manual_seed(args.seed + 2)
    combos = world.train_combinations()
    captions, shown = [], []
    for _ in range(args.data_size):
        a = combos[int(torch.randint(len(combos), (1,), generator=gen))]
        captions.append(world.caption(a))
        shown.append(corrupt(a, args.wrong_fraction, gen))
    latents = []
    for i in tqdm(range(0, args.data_size, 256), desc="encode", mininterval=10):
        x, _ = render.render(shown[i : i + 256], gen)
        latents.append(vae.encode(x * 2 - 1).latent_dist.mean * scaling)
    ids = tokenizer(captions, padding="max_length", max_length=models.TEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    wrong = sum(c != world.caption(s) for c, s in zip(captions, shown))
    data = {"latents": torch.cat(latents), "ids": ids, "wrong_captions": wrong}
    torch.save(data, path)
    return data


def train_unet(args, data, tokenizer, out: Path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(args.seed)
    unet = models.build_unet()
    if args.text_encoder:
        # As in Stable Diffusion: a frozen, contrastively pretrained CLIP text tower (the toy CLIP's). A text
        # encoder trained from scratch beside the UNet stayed nearly constant across captions in 800 steps.
        text = CLIPTextModel.from_pretrained(args.text_encoder).requires_grad_(False).eval()
        params = list(unet.parameters())
    else:
        text = CLIPTextModel(models.text_config(tokenizer))
        params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    noise = DDPMScheduler.from_config(models.build_scheduler().config)
    empty = tokenizer([""], padding="max_length", max_length=models.TEXT_LENGTH, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(args.seed + 3)
    ckpt = out / "unet_ckpt.pt"
    step = 0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
    sched = lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / args.steps))).item())  # noqa: E731
    n = data["latents"].shape[0]
    bar = tqdm(total=args.steps, initial=step, desc="unet", mininterval=10)
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = args.lr * sched(step)
        idx = torch.randint(n, (args.batch,), generator=gen)
        z0, ids = data["latents"][idx], data["ids"][idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        ids[drop] = empty
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise.config.num_train_timesteps, (args.batch,), generator=gen)
        zt = noise.add_noise(z0, eps, t)
        pred = unet(zt, t, encoder_hidden_states=text(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            save_state(ckpt, unet=unet.state_dict(), text=text.state_dict(), opt=opt.state_dict(),
                       gen=gen.get_state(), step=step)
    bar.close()
    return unet, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld/pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrong-fraction", type=float, default=0.25)
    p.add_argument("--data-size", type=int, default=16384)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-encoder", default="outputs/toyworld/clip/final",
                   help="a CLIPModel dir (train_clip.py's final/) whose text tower is used frozen; '' trains one")
    args = p.parse_args(argv)
    if not 0 <= args.wrong_fraction < 1:
        raise SystemExit(f"--wrong-fraction must be in [0, 1); got {args.wrong_fraction}.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"wall_s": 0.0}
    t0 = time.perf_counter()
    from diffusers import StableDiffusionPipeline

    tokenizer = models.build_tokenizer()
    vae, scaling = train_vae(args, out)
    vae.register_to_config(scaling_factor=scaling)
    data = build_dataset(args, vae, scaling, tokenizer, out)
    unet, text = train_unet(args, data, tokenizer, out)
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=models.build_scheduler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out / "final"), safe_serialization=True)
    record.update({
        "command": "python examples/toyworld/train_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "data_size": args.data_size, "wrong_captions": int(data["wrong_captions"]),
        "vae_scaling_factor": scaling, "torch": torch.__version__,
        "wall_s": record["wall_s"] + time.perf_counter() - t0,
    })
    record_path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
