"""Official side of `make parity` for PickScore, CLIPScore and HPS v2 (runs in .parity/hf457).

Each reward is scored the way its own package or published inference code does it, on the random
official-format checkpoints and PNGs that `parity/run.py` wrote into the work dir:
- PickScore: transformers `AutoProcessor` + `AutoModel` (the PickScore README's inference code);
- CLIPScore: torchmetrics' own functions (`_get_clip_model_and_processor`, `_clip_score_update`);
- HPS v2: hpsv2's bundled open_clip (`create_model_and_transforms`, `get_tokenizer`, checkpoint 'state_dict').

For each reward it writes `official_<name>.pt`: the official preprocessed pixels, the end-to-end scores
(PNG -> official preprocessing -> official model) and the model-math scores (official model on the pixels
our preprocessing produced, `ours_pixels_<name>.pt`). It imports nothing from reward_plugins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def pickscore(work: Path, images: list[Image.Image], prompts: list[str], ours_pixels: torch.Tensor) -> dict:
    from transformers import AutoModel, AutoProcessor

    d = work / "pickscore"
    processor = AutoProcessor.from_pretrained(d)
    model = AutoModel.from_pretrained(d).eval()

    def score(pixels: torch.Tensor) -> torch.Tensor:
        text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
        txt = F.normalize(model.get_text_features(**text), dim=-1)
        return model.logit_scale.exp() * (img * txt).sum(-1)

    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixels": pixels, "e2e": score(pixels), "math": score(ours_pixels),
                "processor": type(processor.image_processor).__name__}


def clipscore(work: Path, images: list[Image.Image], prompts: list[str], ours_pixels: torch.Tensor) -> dict:
    import numpy as np
    from torchmetrics.functional.multimodal.clip_score import (
        _clip_score_update,
        _get_clip_model_and_processor,
        _get_features,
    )

    model, processor = _get_clip_model_and_processor(str(work / "openai-clip-vit-large-patch14-small"))
    model.eval()
    # torchmetrics takes uint8 (C, H, W) tensors.
    tensors = [torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    with torch.no_grad():
        e2e, _ = _clip_score_update(tensors, prompts, model, processor)  # 100 * cos per pair, before the clamp
        pixels = processor(images=tensors, return_tensors="pt", padding=True)["pixel_values"]
        txt = F.normalize(_get_features(prompts, "text", torch.device("cpu"), model, processor), dim=-1)
        img = F.normalize(model.get_image_features(ours_pixels), dim=-1)
        math = 100 * (img * txt).sum(-1)
    return {"pixels": pixels, "e2e": e2e, "math": math, "processor": type(processor.image_processor).__name__}


def hpsv2(work: Path, images: list[Image.Image], prompts: list[str], ours_pixels: torch.Tensor) -> dict:
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    from hpsv2.src.open_clip.factory import add_model_config

    add_model_config(work / "hps_model_config")  # the small ViT-H-14-shaped config, hps-parity.json
    # The arguments of hpsv2.img_score.initialize_model, with no pretrained tag (random official-format file).
    model, _, preprocess_val = create_model_and_transforms(
        "hps-parity", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False,
    )
    checkpoint = torch.load(work / "HPS_v2_parity.pt", map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")

    def score(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixels, tokenizer(prompts))
        return (out["image_features"] * out["text_features"]).sum(-1)  # diag(image @ text.T)

    with torch.no_grad():
        pixels = torch.stack([preprocess_val(im) for im in images])
        return {"pixels": pixels, "e2e": score(pixels), "math": score(ours_pixels), "processor": "hpsv2 preprocess_val"}


REWARDS = {"pickscore": pickscore, "clipscore": clipscore, "hpsv2": hpsv2}


def main(work: Path) -> None:
    manifest = json.loads((work / "manifest.json").read_text())
    images = [Image.open(work / name).convert("RGB") for name in manifest["images"]]
    for name in manifest["rewards"]:
        if name not in REWARDS:
            continue
        ours = torch.load(work / f"ours_pixels_{name}.pt")
        out = REWARDS[name](work, images, manifest["prompts"][name], ours)
        torch.save({k: (v.detach().float() if torch.is_tensor(v) else v) for k, v in out.items()},
                   work / f"official_{name}.pt")
        print(f"[official] {name} done", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
