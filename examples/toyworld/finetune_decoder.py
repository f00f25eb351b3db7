"""Fine-tune the toy world's VAE decoder alone, so that it renders what the exact oracle asks for.

The first shipped VAE (`train_pipeline.py --vae-steps 300`) never rendered blue and lost most squares: rendered
scenes judged by the exact oracle after one round trip scored 0.63 overall
(`examples/benchmarks/toyworld_vae_ceiling.py`). This trains the decoder and `post_quant_conv` on posterior
samples of rendered scenes of all 90 combinations (train_pipeline.py's reconstruction loss, MSE + 0.5 L1,
cosine lr to 0) with the encoder frozen. The latents the UNet and the flow transformer were trained on
are therefore unchanged, and so are their scaling and shift factors; only the pixels change.

    OMP_NUM_THREADS=1 python examples/toyworld/finetune_decoder.py --out outputs/toyworld/decoder --steps 3000
    python examples/toyworld/ship_weights.py --pipeline outputs/toyworld/decoder/pipeline \\
        --flow outputs/toyworld/decoder/flow

Reads the shipped SD toy pipeline and flow twin (or `--pipeline` / `--flow` dirs), writes both with the new
VAE under ``<out>/pipeline/final`` and ``<out>/flow/final``, and a ``record.json`` beside each. Each record
holds the model's earlier training record plus this stage (command, seed, steps, CPU s, ceiling before and
after). The VAE is a copy of the same weights in both pipelines.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models, render, world  # noqa: E402
from reward_plugins import create_reward  # noqa: E402

DIMS = (*world.DIMENSIONS, "overall")
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


@torch.no_grad()
def ceiling(vae, prompts: list[str], per_caption: int, seed: int = 7) -> dict:
    """Exact accuracy of rendered scenes of `prompts` after encode (posterior mean) -> decode: overall per
    dimension, and the colour / shape accuracy per named colour / shape."""
    prompts = [p for p in prompts for _ in range(per_caption)]
    attrs = [world.parse_caption(p) for p in prompts]
    x, _ = render.render(attrs, torch.Generator().manual_seed(seed))
    y = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    per_dim = create_reward("toyworld-exact").score(y, prompts).per_dim
    by = defaultdict(list)
    for i, a in enumerate(attrs):
        by[a.color].append(float(per_dim["color"][i]))
        by[a.shape].append(float(per_dim["shape"][i]))
    return {"dims": {d: float(per_dim[d].float().mean()) for d in DIMS},
            "values": {k: sum(v) / len(v) for k, v in by.items()}}


def finetune_decoder(vae, steps: int, lr: float, batch: int, seed: int, progress: bool = True):
    """Train the decoder (and post_quant_conv) on posterior samples of rendered scenes of all 90 combinations,
    the encoder frozen; train_pipeline.py's VAE reconstruction loss (MSE + 0.5 L1), cosine lr to 0."""
    vae.requires_grad_(False)
    for m in (vae.decoder, getattr(vae, "post_quant_conv", None)):
        if m is not None:
            m.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    combos, gen = world.all_combinations(), torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="decoder", mininterval=10, disable=not progress):
        idx = torch.randint(len(combos), (batch,), generator=gen)
        x, _ = render.render([combos[i] for i in idx.tolist()], gen)
        with torch.no_grad():
            z = vae.encode(x * 2 - 1).latent_dist.sample(generator=gen)
        target = x * 2 - 1
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, target) + 0.5 * F.l1_loss(rec, target)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    vae.requires_grad_(False).eval()
    return vae


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/toyworld/decoder"))
    p.add_argument("--pipeline", type=Path, default=models.PIPELINE_DIR, help="the SD toy pipeline dir to start from")
    p.add_argument("--flow", type=Path, default=models.FLOW_DIR, help="the flow twin dir that gets the same VAE")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
    if not (args.pipeline / "vae" / VAE_WEIGHTS).is_file() or not (args.flow / "vae" / VAE_WEIGHTS).is_file():
        raise SystemExit(f"{args.pipeline} and {args.flow} must be diffusers pipeline dirs with vae/{VAE_WEIGHTS}.")
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = models.load_pipeline(args.pipeline)
    before = ceiling(pipe.vae, world.heldout_prompts(), 4)
    finetune_decoder(pipe.vae, args.steps, args.lr, args.batch, args.seed)
    after = ceiling(pipe.vae, world.heldout_prompts(), 4)
    stage = {"command": "python examples/toyworld/finetune_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "torch": torch.__version__,
             "heldout_round_trip_exact_before": before, "heldout_round_trip_exact_after": after}
    manifest = models.read_manifest() if models.MANIFEST.is_file() else {"models": {}}
    state = {k: v.contiguous() for k, v in pipe.vae.state_dict().items()}
    for name, source in (("pipeline", args.pipeline), ("flow", args.flow)):
        # Each pipeline dir is copied as it is and only the VAE's weights file is replaced: every other file
        # (configs, UNet / transformer, text encoders) stays byte-identical to the source.
        dest = args.out / name
        shutil.rmtree(dest / "final", ignore_errors=True)
        shutil.copytree(source, dest / "final")
        save_file(state, str(dest / "final" / "vae" / VAE_WEIGHTS), metadata={"format": "pt"})
        earlier = manifest["models"].get(name, {}).get("training", {})
        earlier = {k: v for k, v in earlier.items() if k != "decoder_finetune"}  # a rerun replaces the stage
        (dest / "record.json").write_text(json.dumps({**earlier, "decoder_finetune": stage}, indent=2))
    print(json.dumps({"before": before["dims"], "after": after["dims"], "values_after": after["values"],
                      "cpu_s": round(stage["cpu_s"])}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
