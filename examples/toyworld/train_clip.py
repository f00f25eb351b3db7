"""Train the toy world's learned reward: a tiny transformers `CLIPModel`, contrastively, on rendered scenes.

Each step draws one scene per training caption (the 72 training combinations, so a batch has no
duplicate captions) and minimises CLIP's symmetric InfoNCE loss. It is deliberately good but imperfect:
it never sees the 18 held-out combinations, it is small and briefly trained, and with probability
``--wrong-fraction`` (default 0.1) a scene shows one attribute different from its caption. Images get
light pixel noise so that the reward tolerates the blur of generated samples.

    python examples/toyworld/train_clip.py --out outputs/toyworld/clip      # resumes if interrupted

Writes ``<out>/final/`` (`CLIPModel.save_pretrained` + tokenizer) and ``<out>/record.json``.
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
from transformers import CLIPModel

from alignment.toyworld import models, render, world
from reward_plugins.clip_backbone import image_embeds, text_embeds
from reward_plugins.preprocess import ImageTransform

TRANSFORM = ImageTransform(32, "crop")  # what the `toyworld-clip` reward applies


def one_wrong(attrs: world.Attributes, gen: torch.Generator) -> world.Attributes:
    choices = {"color": list(world.COLORS), "shape": list(world.SHAPES), "position": list(world.POSITIONS)}
    dim = list(choices)[int(torch.randint(3, (1,), generator=gen))]
    others = [v for v in choices[dim] if v != attrs.get(dim)]
    return attrs.replace(**{dim: others[int(torch.randint(len(others), (1,), generator=gen))]})


def batch(combos, p: float, noise: float, gen: torch.Generator) -> torch.Tensor:
    shown = [one_wrong(a, gen) if float(torch.rand(1, generator=gen)) < p else a for a in combos]
    x, _ = render.render(shown, gen)
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, combos, gen: torch.Generator, reps: int = 4) -> float:
    """Share of clean scenes of `combos` whose best caption among all 90 is their own."""
    everything = world.all_combinations()
    ids = tokenizer([world.caption(a) for a in everything], padding="max_length", max_length=models.TEXT_LENGTH,
                    return_tensors="pt").input_ids
    txt = F.normalize(text_embeds(model, ids), dim=-1)
    hits = total = 0
    for _ in range(reps):
        x, scenes = render.render(combos, gen)
        img = F.normalize(image_embeds(model, TRANSFORM(x)), dim=-1)
        best = (img @ txt.T).argmax(dim=1)
        hits += sum(everything[int(b)] == s.attrs for b, s in zip(best, scenes))
        total += len(scenes)
    return hits / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld/clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wrong-fraction", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = models.build_tokenizer()
    torch.manual_seed(args.seed)
    model = CLIPModel(models.clip_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    combos = world.train_combinations()
    ids = tokenizer([world.caption(a) for a in combos], padding="max_length", max_length=models.TEXT_LENGTH,
                    return_tensors="pt").input_ids
    ckpt, step, elapsed = out / "ckpt.pt", 0, 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, elapsed = st["step"], st["elapsed"]
    bar = tqdm(total=args.steps, initial=step, desc="clip", mininterval=10)
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / args.steps)).item())
        perm = torch.randperm(len(combos), generator=gen)
        x = batch([combos[i] for i in perm], args.wrong_fraction, args.noise, gen)
        out_ = model(input_ids=ids[perm], pixel_values=TRANSFORM(x))
        labels = torch.arange(len(combos))
        loss = (F.cross_entropy(out_.logits_per_image, labels) + F.cross_entropy(out_.logits_per_text, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            st = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                  "elapsed": elapsed + time.perf_counter() - t0}
            torch.save(st, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    bar.close()
    model.eval()
    model.save_pretrained(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    eval_gen = torch.Generator().manual_seed(12345)
    record = {
        "command": "python examples/toyworld/train_clip.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "images_seen": args.steps * len(combos), "torch": torch.__version__,
        "retrieval_accuracy_train_combos": retrieval_accuracy(model, tokenizer, combos, eval_gen),
        "retrieval_accuracy_heldout_combos": retrieval_accuracy(model, tokenizer, world.heldout_combinations(), eval_gen),
        "wall_s": elapsed + time.perf_counter() - t0,
    }
    (out / "record.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
