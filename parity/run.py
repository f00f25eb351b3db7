"""`make parity`: our rewards against the official packages, on the same checkpoints and the same PNGs.

1. Writes random checkpoints in each reward's official format into the work dir (small configs of the real
   architectures, weights rounded to fp16 as the official files are), PNG images of several sizes, and
   prompts that exercise text cleaning (curly quote, HTML entity) and, for CLIPScore, a prompt over 77 tokens.
2. Scores them through our path: our loaders read the official files; our preprocessing runs on the
   decoded PNGs as tensors.
3. Runs the official scripts in their own environments (.parity/<env>, built by parity/build_envs.sh).
4. Prints one table row per reward and part:
   - model math: both models on the SAME pixels (ours), so only the model code differs;
   - preprocessing: our pixels against the official processor's (max abs difference, normalised units);
   - end to end: PNG -> each side's own preprocessing and model.
   rel = max |ours - official| / max |official| over the images. Exits non-zero if a reward is out of bounds.

Usage: .venv/bin/python parity/run.py [--work .parity/work] [--only pickscore,hpsv2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reward_plugins as rp  # noqa: E402
from reward_plugins.checkpoints import hf_clip_to_openclip  # noqa: E402
from reward_plugins.clip_backbone import _config, build_clip  # noqa: E402
from reward_plugins.rewards import imagereward as ir  # noqa: E402
from reward_plugins.testing import random_images, seeded  # noqa: E402
from reward_plugins.tokenization import CLIP_NUM_MERGES, clip_tokenizer_from_bpe  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BPE = SHARED / "clip_bpe_simple_vocab_16e6.txt.gz"
AESTHETIC_HEAD = SHARED / "laion_aesthetic_sac_logos_ava1_l14_linearMSE.pth"

ENV_OF = {"pickscore": "hf457", "clipscore": "hf457", "hpsv2": "hf457", "imagereward": "ir146", "aesthetic": "ir146"}
SCRIPT_OF = {"hf457": "official_hf457.py", "ir146": "official_ir146.py"}
# End-to-end bounds: where the official path resizes with PIL (HF's slow processor, torchvision on PIL
# images) ours uses PIL's kernel on tensors, and PIL's uint8 rounding remains: 5e-3. hpsv2 resizes the
# float tensor after ToTensor (torchvision's antialiased bicubic), as ours does: 1e-3.
MATH_BOUND = 1e-4
E2E_BOUND = {"pickscore": 5e-3, "clipscore": 5e-3, "aesthetic": 5e-3, "imagereward": 5e-3, "hpsv2": 1e-3}
SIZES = [(512, 512), (480, 640), (700, 300), (224, 224)]
CLIP_PROMPTS = [
    "a corgi’s head depicted as an explosion of a nebula",
    "salt &amp; pepper shakers on a wooden table",
    "a photo of a cat",
    "an oil painting of a red fox sitting in the snow at sunset",
]
LONG = ("a detailed oil painting of an old lighthouse on a rocky cliff above a stormy sea at night, with "
        "crashing waves, dark clouds, a full moon behind the clouds, seagulls, a small fishing boat, warm light "
        "from the windows of the keeper's house, rain, wind-bent grass and a winding stone path up the hill, "
        "painted in thick impasto brush strokes in the style of a nineteenth century romantic landscape")
IR_PROMPTS = ["a photo of a cat", "a red car in the city", "a portrait of an old astronaut", "a blue bird on a tree"]

# Small configs of the real architectures (widths multiple of 64: OpenAI's builder infers heads = width / 64).
SMALL_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2}
SMALL_VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2}
# ImageReward: the official class always builds BLIP's ViT-L/16 and an MLP on 768-d text features.
IR_MED = {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12, "intermediate_size": 3072}


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    # The official files are fp16 (OpenAI's clip.load even rounds to fp16 on CPU): both sides see these values.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def small_clip(seed: int, act: str, projection_dim: int):
    cfg = _config(SMALL_TEXT, SMALL_VISION, projection_dim, act)
    # As in the real config.json files: the towers' configs carry the projection size too (a vision-only
    # load of the dir, like the aesthetic predictor's, reads it there).
    cfg.vision_config.projection_dim = cfg.text_config.projection_dim = projection_dim
    with seeded(seed):
        model = build_clip(cfg)
        model.logit_scale.data.fill_(4.6052)
    return fp16_rounded(model.eval())


def write_hf_tokenizer(tok, d: Path) -> None:
    """CLIPTokenizer's slow-format files (vocab.json, merges.txt), which every transformers version reads."""
    vocab = tok.get_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with gzip.open(BPE, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + CLIP_NUM_MERGES]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False}))


def write_processor(d: Path) -> None:
    """preprocessor_config.json with the values of laion/CLIP-ViT-H-14 and openai/clip-vit-large-patch14."""
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 224}))
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))


def write_hf_dir(model, tok, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    write_hf_tokenizer(tok, d)
    write_processor(d)
    return d


def prepare(work: Path, rewards: list[str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (h, w) in enumerate(SIZES):
        img = (random_images(1, h, w, seed=100 + i)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(img).save(work / f"image_{i}.png")
        names.append(f"image_{i}.png")
    tok = clip_tokenizer_from_bpe(BPE)
    h14 = small_clip(1, "gelu", 64)  # ViT-H-14's architecture family (exact GELU), small widths
    l14 = small_clip(2, "quick_gelu", 768)  # OpenAI ViT-L/14's (quick GELU), 768-d embedding for the aesthetic MLP
    if "pickscore" in rewards:
        write_hf_dir(h14, tok, work / "pickscore")
    if "hpsv2" in rewards:
        torch.save({"state_dict": {k: v.half() for k, v in hf_clip_to_openclip(h14.state_dict()).items()}},
                   work / "HPS_v2_parity.pt")
        cfg = h14.config
        (work / "hps_model_config").mkdir(exist_ok=True)
        (work / "hps_model_config" / "hps-parity.json").write_text(json.dumps({
            "embed_dim": cfg.projection_dim,
            "vision_cfg": {"image_size": 224, "layers": SMALL_VISION["num_hidden_layers"],
                           "width": SMALL_VISION["hidden_size"], "head_width": 64, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": SMALL_TEXT["hidden_size"],
                         "heads": SMALL_TEXT["num_attention_heads"], "layers": SMALL_TEXT["num_hidden_layers"]}}))
    if "clipscore" in rewards or "aesthetic" in rewards:
        write_hf_dir(l14, tok, work / "openai-clip-vit-large-patch14-small")
    if "aesthetic" in rewards:
        sd = hf_clip_to_openclip(l14.state_dict())  # open_clip's native keys are OpenAI's
        torch.save({k: v.half() for k, v in sd.items()}, work / "openai_clip_l14_small.pt")
        (work / "aesthetic_head.pth").write_bytes(AESTHETIC_HEAD.read_bytes())
    if "imagereward" in rewards:
        d = work / "imagereward"
        d.mkdir(exist_ok=True)
        ir.tiny_tokenizer_dir(d / "bert-vocab")
        med = {**ir.MED_CONFIG, **IR_MED, "vocab_size": len(ir._tiny_vocab()) + 2}
        with seeded(3):
            net = fp16_rounded(ir.build_network(ir.blip_vision_config(), med).eval())
        torch.save(ir.to_official_state_dict(net, seed=3), d / "ImageReward.pt")
        (d / "med_config.json").write_text(json.dumps({
            "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1,
            "initializer_range": 0.02, "model_type": "bert", "type_vocab_size": 2, **med,
            "encoder_width": 1024, "add_cross_attention": True}))
    prompts = {r: (IR_PROMPTS if r == "imagereward" else CLIP_PROMPTS) for r in rewards}
    prompts["clipscore"] = [*CLIP_PROMPTS[:3], LONG] if "clipscore" in rewards else None
    manifest = {"images": names, "rewards": rewards, "prompts": {r: prompts[r] for r in rewards}}
    (work / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
    return manifest


def load_ours(name: str, work: Path):
    if name == "pickscore":
        return rp.create_reward("pickscore", checkpoint=str(work / "pickscore"), backbone=str(work / "pickscore"))
    if name == "clipscore":  # torchmetrics' truncation: the parity prompts include one over 77 tokens
        return rp.create_reward("clipscore", checkpoint=str(work / "openai-clip-vit-large-patch14-small"),
                                truncation="torchmetrics")
    if name == "hpsv2":
        return rp.create_reward("hpsv2", checkpoint=str(work / "HPS_v2_parity.pt"), backbone=str(work / "pickscore"),
                                tokenizer=str(BPE))
    if name == "aesthetic":
        return rp.create_reward("aesthetic", checkpoint=str(work / "aesthetic_head.pth"),
                                backbone=str(work / "openai-clip-vit-large-patch14-small"))
    if name == "imagereward":
        d = work / "imagereward"
        return rp.create_reward("imagereward", checkpoint=str(d / "ImageReward.pt"), backbone=str(d / "bert-vocab"),
                                med_config=str(d / "med_config.json"))
    raise ValueError(f"unknown reward {name!r}; choose from {sorted(ENV_OF)}")


def our_scores(name: str, reward, inputs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Our score of `inputs` (pixels if reward.transform is the identity, else [0, 1] images)."""
    with torch.no_grad():
        if name == "clipscore":  # compared before the clamp at 0: random weights give cosines of either sign
            img = reward.image_embedding(inputs)
            return 100 * (img * reward.encode_prompts(prompts)).sum(-1)
        return reward.compute(inputs, prompts)[reward.default_dimension].float()


def ours(manifest: dict, work: Path) -> dict:
    decoded = [torch.from_numpy(np.asarray(Image.open(work / n).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
               for n in manifest["images"]]
    results = {}
    for name in manifest["rewards"]:
        reward = load_ours(name, work)
        prompts = manifest["prompts"][name]
        with torch.no_grad():
            pixels = torch.cat([reward.transform(x[None]) for x in decoded])  # images differ in size
        torch.save(pixels, work / f"ours_pixels_{name}.pt")
        e2e = torch.cat([our_scores(name, reward, x[None], [p]) for x, p in zip(decoded, prompts)])
        # Model math: the same pixels go into both models. Set in the instance __dict__, which attribute
        # lookup reads before a class method (ImageReward.transform) and before registered submodules.
        reward.__dict__["transform"] = torch.nn.Identity()
        results[name] = {"pixels": pixels, "math": our_scores(name, reward, pixels, prompts), "e2e": e2e}
    return results


def run_official(manifest: dict, work: Path, parity_dir: Path) -> float:
    t0 = time.perf_counter()
    for env in sorted({ENV_OF[r] for r in manifest["rewards"]}):
        py = parity_dir / env / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"{py} not found: build the official environments first (bash parity/build_envs.sh).")
        subprocess.run([str(py), str(ROOT / "parity" / SCRIPT_OF[env]), str(work)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def table(manifest: dict, ours_out: dict, work: Path) -> list[str]:
    """Print the table; returns the rewards out of bounds."""
    failed = []
    print(f"\n{'reward':<12} {'part':<14} {'ours':>28} {'official':>28} {'max abs':>10} {'rel':>9} {'bound':>7}  result")
    for name in manifest["rewards"]:
        off = torch.load(work / f"official_{name}.pt")
        mine = ours_out[name]
        fmt = lambda t: " ".join(f"{v:6.3f}" for v in t.tolist())  # noqa: E731
        rows = [("model math", mine["math"], off["math"], MATH_BOUND),
                ("end to end", mine["e2e"], off["e2e"], E2E_BOUND[name])]
        for part, a, b, bound in rows:
            r = rel(a, b)
            passed = r <= bound
            if not passed and name not in failed:
                failed.append(name)
            print(f"{name:<12} {part:<14} {fmt(a):>28} {fmt(b):>28} {float((a - b).abs().max()):10.2e} {r:9.2e} "
                  f"{bound:7.0e}  {'ok' if passed else 'FAIL'}")
        dp = (mine["pixels"] - off["pixels"]).abs()
        print(f"{name:<12} {'preprocessing':<14} {'pixels ' + str(tuple(mine['pixels'].shape)):>28} "
              f"{off['processor'][:28]:>28} {float(dp.max()):10.2e} {'mean':>5} {float(dp.mean()):.1e}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / ".parity" / "work"))
    ap.add_argument("--parity-dir", default=str(ROOT / ".parity"))
    ap.add_argument("--only", default=",".join(ENV_OF), help="comma-separated rewards")
    args = ap.parse_args(argv)
    rewards = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rewards if r not in ENV_OF]
    if unknown:
        ap.error(f"unknown rewards {unknown}; choose from {sorted(ENV_OF)}")
    if not BPE.is_file():
        ap.error(f"{BPE} is missing: the parity check needs ../shared/data (CLIP BPE vocabulary, aesthetic head).")
    work = Path(args.work)
    t0 = time.perf_counter()
    manifest = prepare(work, rewards)
    t_prep = time.perf_counter() - t0
    ours_out = ours(manifest, work)
    t_ours = time.perf_counter() - t0 - t_prep
    t_off = run_official(manifest, work, Path(args.parity_dir))
    failed = table(manifest, ours_out, work)
    print(f"\ntimes: checkpoints {t_prep:.0f} s, ours {t_ours:.0f} s, official {t_off:.0f} s; rel = max|ours - "
          f"official| / max|official| over {len(manifest['images'])} images; CLIPScore before its clamp at 0")
    print("all rewards within bounds" if not failed else f"out of bounds: {', '.join(failed)} (rows marked FAIL)")
    print(f"parity: {len(rewards) - len(failed)} passed, {len(failed)} failed")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
