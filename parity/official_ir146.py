"""Official side of `make parity` for ImageReward and the LAION aesthetic predictor (runs in .parity/ir146).

- ImageReward: the image-reward package's own `ImageReward.load(checkpoint, med_config=...)` and
  `model.score(prompt, image)`; model math through its `score_gard(ids, mask, pixels)`. BLIP's
  `init_tokenizer` asks the hub for bert-base-uncased; with no hub here the tokenizer is read from the
  vocab dir that run.py wrote (the only stand-in on this side).
- Aesthetic: improved-aesthetic-predictor's inference: OpenAI clip's `build_model` and `_transform` (what
  `clip.load(..., jit=False)` runs on a checkpoint's state dict), `encode_image`, L2-normalised embedding, and the MLP class image-reward ships
  (`ImageReward.models.AestheticScore.MLP`) loaded with the real trained head.

Writes `official_<name>.pt` like official_hf457.py. It imports nothing from reward_plugins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def imagereward(work: Path, images: list[Image.Image], prompts: list[str], ours_pixels: torch.Tensor) -> dict:
    import transformers

    d = work / "imagereward"
    original = transformers.BertTokenizer.from_pretrained.__func__

    def local_bert(cls, name, *args, **kwargs):
        return original(cls, str(d / "bert-vocab") if name == "bert-base-uncased" else name, *args, **kwargs)

    transformers.BertTokenizer.from_pretrained = classmethod(local_bert)
    import ImageReward as RM

    model = RM.load(str(d / "ImageReward.pt"), device="cpu", med_config=str(d / "med_config.json"))
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(im) for im in images])
        e2e = torch.tensor([float(model.score(p, im)) for p, im in zip(prompts, images)])
        tok = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        math = model.score_gard(tok.input_ids, tok.attention_mask, ours_pixels).squeeze(-1)
    return {"pixels": pixels, "e2e": e2e, "math": math, "processor": "ImageReward _transform(224)"}


def aesthetic(work: Path, images: list[Image.Image], prompts: list[str], ours_pixels: torch.Tensor) -> dict:
    import clip
    from ImageReward.models.AestheticScore import MLP

    # What clip.load(name, jit=False) does with the state dict of OpenAI's (TorchScript) file: build_model,
    # float on CPU, and _transform(input_resolution). Our file is a plain state dict, so we call those two.
    sd = torch.load(work / "openai_clip_l14_small.pt", map_location="cpu")
    model = clip.model.build_model(sd).float().eval()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    mlp = MLP(768)
    mlp.load_state_dict(torch.load(work / "aesthetic_head.pth", map_location="cpu"))
    mlp.eval()

    def score(pixels: torch.Tensor) -> torch.Tensor:
        return mlp(F.normalize(model.encode_image(pixels)).float()).squeeze(-1)

    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        return {"pixels": pixels, "e2e": score(pixels), "math": score(ours_pixels), "processor": "clip.load preprocess"}


REWARDS = {"imagereward": imagereward, "aesthetic": aesthetic}


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
