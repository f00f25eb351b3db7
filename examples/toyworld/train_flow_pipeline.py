"""Train the toy world's flow-matching twin: a real diffusers `StableDiffusion3Pipeline`, on a CPU, seeded
and resumable.

What it reuses from the shipped toy models (`alignment/toyworld/weights/`): both CLIP text encoders are the
toy CLIP's frozen text tower with its text projection, as `CLIPTextModelWithProjection` (a text encoder
trained from scratch failed to condition the SD toy); the VAE is the SD toy's trained AutoencoderKL
(32 px <-> 8 x 8 x 4), frozen, with SD3's latent convention z' = (z - shift_factor) * scaling_factor, the
shift and scale measured here as the mean and 1 / std of its latents. There is no T5 (`text_encoder_3=None`:
the pipeline feeds zero tokens in its place, `models.FLOW_MAX_SEQUENCE_LENGTH` of them).

What it trains: an SD3Transformer2DModel (`models.build_flow_transformer`) with the rectified-flow objective
of `alignment.pipelines.sd3.SD3Adapter` (the one every flow trainer uses): σ from the logit-normal(0, 1)
density over the scheduler's training schedule (shift `models.FLOW_SHIFT`), x_t = (1 - σ) x0 + σ ε,
MSE to the velocity ε - x0. Data: like the SD toy (`train_pipeline.py`), a fixed seeded set of scenes with
captions only from the 72 training combinations, each attribute drawn wrong in the image with probability
``--wrong-fraction`` (0.25, the SD toy's), so the model is deliberately imperfect; 10 % of captions are
dropped (the empty prompt) for classifier-free guidance. The text encoders are frozen, so the 72 captions'
and the empty prompt's embeddings are computed once.

    python examples/toyworld/train_flow_pipeline.py --out outputs/toyworld/flow     # resumes if interrupted

Writes ``<out>/final/`` (`StableDiffusion3Pipeline.save_pretrained`, safetensors) and ``<out>/record.json``
(command, seed, data size, steps, wall and CPU time); `ship_weights.py --flow <out>` copies it into the package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, render, world  # noqa: E402
from examples.toyworld.train_pipeline import corrupt, save_state  # noqa: E402


def build_pipeline(args, transformer=None):
    """The SD3 pipeline around a (fresh, seeded) transformer; the frozen parts come from the shipped toy models."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(args.clip, local_files_only=True)
    text = models.flow_text_encoder(clip)
    tokenizer = models.build_tokenizer()
    tokenizer.model_max_length = models.FLOW_TEXT_LENGTH
    # The SD toy's architecture with its trained weights (built from our config, not from_pretrained, so that
    # the shipped config carries no local `_name_or_path`).
    vae = models.build_vae()
    vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae, local_files_only=True).state_dict())
    vae.eval().requires_grad_(False)
    if transformer is None:
        torch.manual_seed(args.seed)
        transformer = models.build_flow_transformer(args.dim, args.layers)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=models.build_flow_scheduler(), text_encoder=text,
        tokenizer=tokenizer, text_encoder_2=text, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def latent_stats(vae, gen: torch.Generator) -> tuple[float, float]:
    """(shift_factor, scaling_factor): the mean of the VAE's latents and 1 / std around it (SD3's convention)."""
    x, _ = render.render(world.all_combinations() * 4, gen)
    z = vae.encode(x * 2 - 1).latent_dist.mean
    shift = float(z.mean())
    return shift, float(1.0 / (z - shift).std())


@torch.no_grad()
def build_dataset(args, vae, out: Path) -> dict:
    """Latents (in the transformer's space) of `--data-size` scenes and the index of each one's caption in
    `world.train_prompts()`; cached in ``<out>/dataset.pt``."""
    path = out / "dataset.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    gen = torch.Generator().manual_seed(args.seed + 2)
    shift, scaling = latent_stats(vae, torch.Generator().manual_seed(args.seed + 1))
    combos = world.train_combinations()
    index, shown = [], []
    for _ in range(args.data_size):
        i = int(torch.randint(len(combos), (1,), generator=gen))
        index.append(i)
        shown.append(corrupt(combos[i], args.wrong_fraction, gen))
    latents = []
    for i in tqdm(range(0, args.data_size, 256), desc="encode", mininterval=10):
        x, _ = render.render(shown[i : i + 256], gen)
        latents.append((vae.encode(x * 2 - 1).latent_dist.mean - shift) * scaling)
    wrong = sum(world.caption(combos[i]) != world.caption(s) for i, s in zip(index, shown))
    data = {"latents": torch.cat(latents), "index": torch.tensor(index), "wrong_captions": wrong,
            "shift_factor": shift, "scaling_factor": scaling}
    torch.save(data, path)
    return data


def train_transformer(args, pipe, data: dict, out: Path, on_save=lambda: None) -> None:
    from alignment.pipelines import PipelineAdapter, PromptEmbeds

    adapter = PipelineAdapter(pipe)
    adapter.max_sequence_length = models.FLOW_MAX_SEQUENCE_LENGTH
    transformer = pipe.transformer.train().requires_grad_(True)
    with torch.no_grad():  # frozen text encoders: each training caption is encoded once
        cond = adapter.encode_prompts(world.train_prompts())
        empty = adapter.encode_prompts([""])
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 3)
    ckpt = out / "transformer_ckpt.pt"
    step = 0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        transformer.load_state_dict(st["transformer"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]

    def lr_factor(s: int) -> float:  # linear warm-up over 100 steps, then cosine down to 10 %
        return min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / args.steps))).item())

    n = data["latents"].shape[0]
    bar = tqdm(total=args.steps, initial=step, desc="transformer", mininterval=10)
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step)
        idx = torch.randint(n, (args.batch,), generator=gen)
        x0, caption = data["latents"][idx], data["index"][idx]
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        embeds = torch.where(drop[:, None, None], empty.embeds, cond.embeds[caption])
        pooled = torch.where(drop[:, None], empty.pooled, cond.pooled[caption])
        noise = torch.randn(x0.shape, generator=gen)
        t = adapter.sample_timesteps(args.batch, generator=gen)
        pred = adapter.predict(adapter.add_noise(x0, noise, t), t, PromptEmbeds(embeds, pooled))
        weights = adapter.loss_weights(t).view(-1, 1, 1, 1)
        loss = (weights * (pred - adapter.target(x0, noise, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            save_state(ckpt, transformer=transformer.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step)
            on_save()
    bar.close()
    transformer.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld/flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrong-fraction", type=float, default=0.25)
    p.add_argument("--data-size", type=int, default=16384)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=64, help="transformer width (heads of 16)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clip", default=str(models.CLIP_DIR), help="a CLIPModel dir whose text tower is used frozen")
    p.add_argument("--vae", default=str(models.PIPELINE_DIR / "vae"), help="an AutoencoderKL dir (frozen)")
    args = p.parse_args(argv)
    if not 0 <= args.wrong_fraction < 1:
        raise SystemExit(f"--wrong-fraction must be in [0, 1); got {args.wrong_fraction}.")
    if args.dim % 16 or args.dim < 16:
        raise SystemExit(f"--dim must be a positive multiple of 16 (heads of 16); got {args.dim}.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
    t0, c0 = time.perf_counter(), time.process_time()
    spent = {"wall_s": record["wall_s"], "cpu_s": record.get("cpu_s", 0.0)}

    def flush() -> None:  # time spent so far, kept with every checkpoint so that a resumed run adds to it
        record.update(wall_s=spent["wall_s"] + time.perf_counter() - t0, cpu_s=spent["cpu_s"] + time.process_time() - c0)
        record_path.write_text(json.dumps(record, indent=2))

    pipe = build_pipeline(args)
    data = build_dataset(args, pipe.vae, out)
    pipe.vae.register_to_config(shift_factor=data["shift_factor"], scaling_factor=data["scaling_factor"])
    train_transformer(args, pipe, data, out, on_save=flush)
    pipe.save_pretrained(str(out / "final"), safe_serialization=True)
    flush()
    record.update({
        "command": "python examples/toyworld/train_flow_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "data_size": args.data_size, "wrong_captions": int(data["wrong_captions"]),
        "vae_shift_factor": data["shift_factor"], "vae_scaling_factor": data["scaling_factor"],
        "scheduler_shift": models.FLOW_SHIFT, "max_sequence_length": models.FLOW_MAX_SEQUENCE_LENGTH,
        "torch": torch.__version__,
    })
    record_path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
