"""LeScore (LePref, RL2065): per-dimension preference scores — aesthetic, fidelity, alignment — and overall.

A laion CLIP-ViT-H/14 (transformers `CLIPModel`) plus three cross-attention heads (`Cross_model`,
`reward_plugins.cross_attention`), one per condition. For each condition k (`specs/reward_models.md` §2.2):

1. The prompt and the condition text are tokenized padded to exactly 77 with EOT and encoded with **no
   attention mask**; the per-token features are `text_projection(last_hidden_state)` (B, 77, P).
2. ``S = max over condition tokens of cos(condition token, prompt token)`` (B, 77);
   the prompt tokens with ``S > 0.3`` are the keys the head may attend to (pads included).
3. The image tokens are `visual_projection` of the whole vision sequence **without** post_layernorm.
4. ``f_k = Cross_model_k(image_tokens, prompt_tokens, mask)[:, 0]``;
   ``score_k = exp(logit_scale) * cos(text_embedding, f_k)``.

``overall = (aesthetic + fidelity + alignment) / 3``, the mean of the three logits. The official code runs
in float32 and scores one image at a time; here a batch shares one image-tower pass across the three
heads, condition texts are encoded once per instance and prompt features once per prompt.

All-masked rows: when no prompt token passes the threshold, the official attention computes
``-inf - (-inf)`` and returns NaN. ``exact=True`` reproduces that (and every other step); the default
instead keeps the prompt's EOT token (where CLIP pools the prompt embedding) as the one key of such a
row, so it differs from the official code only where the official code is NaN. In practice LeScore's
mask is never empty at threshold 0.3: under the causal text mask the start token's features are the
same for every text, so its cosine with the condition's start token is exactly 1. The guard matters for
thresholds >= 1 and for MPS's batch-global mode.

Checkpoint: `LeScore.pt`, a plain state dict of the official module: ``model.*`` (transformers CLIP,
with the legacy ``position_ids`` keys of transformers 4.27, dropped here) and
``cross_models.{0,1,2}.*`` (0 aesthetic, 1 fidelity, 2 alignment). It is only on Google Drive.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from ..base import RewardModel
from ..checkpoints import drop_position_ids, load_into, load_state_dict, resolve_file
from ..clip_backbone import LAION_H14, build_clip, clip_config, clip_tokenizer, image_tokens, text_tokens_and_embeds
from ..cross_attention import CrossModel, CrossModelConfig
from ..preprocess import ImageTransform
from ..registry import register_reward
from ..testing import save_tiny_clip_dir, seeded, tiny_clip
from ..tokenization import CLIP_CONTEXT, PromptCache, clip_token_ids, tiny_clip_tokenizer

LESCORE_CONDITIONS: dict[str, str] = {
    "aesthetic": "light, color, clarity, tone, style, ambiance, artistry.",
    "fidelity": "shape, face, hair, hands, limbs, structure, instance, texture.",
    "alignment": "quantity, attributes, position, number, location ;",
}
LESCORE_FILE = "LeScore.pt"
LESCORE_GDRIVE_ID = "1g3JnycSLlmKqIXGDjYYR5eoDxrowiGte"
LESCORE_WHERE = (
    f"LeScore.pt is published only on Google Drive: https://drive.google.com/file/d/{LESCORE_GDRIVE_ID} "
    "(linked from the README of github.com/RL2065/LePref); download it and pass checkpoint='path/to/LeScore.pt'."
)
# Sizes of the random heads of the `-tiny` rewards (dim = tiny CLIP projection dim).
TINY_CROSS = CrossModelConfig(dim=32, depth=2, heads=4, dim_head=8, ff_inner=128)


def _check_options(exact: bool, threshold: float) -> None:
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False; got {exact!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (official: 0.3); got {threshold!r}.")


def keep_eot_if_all_masked(keep: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Where a row of `keep` (B, ..., L) keeps no key, keep the prompt's EOT position `eot` (B,) instead.

    Example:
        >>> keep_eot_if_all_masked(torch.zeros(1, 5, dtype=torch.bool), torch.tensor([2]))
        tensor([[False, False,  True, False, False]])
    """
    pos = torch.arange(keep.shape[-1], device=keep.device)
    eot_hot = pos == eot.to(keep.device).view(-1, *([1] * (keep.ndim - 1)))
    return keep | (eot_hot & ~keep.any(dim=-1, keepdim=True))


class ConditionedCrossReward(RewardModel):
    """What LeScore and MPS share: CLIP towers, condition texts, prompt cache and the head score.

    Subclasses set `conditions` (dimension -> condition text), implement `prompt_condition_similarity`
    (the per-prompt-token statistic the mask thresholds) and `compute`.

    Args:
        model: the transformers CLIPModel (``model.*`` keys).
        tokenizer: its CLIP tokenizer; pads with EOT to 77 as the official code does.
        exact: reproduce the official computation step for step, NaN included (see the module docstring).
        threshold: the mask threshold.
    """

    conditions: ClassVar[dict[str, str]] = {}
    score_range = None

    def __init__(self, model: CLIPModel, tokenizer, *, exact: bool = False, threshold: float = 0.3) -> None:
        super().__init__()
        _check_options(exact, threshold)
        self.model = model
        self.tokenizer = tokenizer
        self.transform = ImageTransform(224, "crop")
        self.exact = exact
        self.threshold = float(threshold)
        self.prompt_cache = PromptCache()
        self._condition_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    # -- text side: computed once and cached ----------------------------------------------------
    def condition_features(self) -> torch.Tensor:
        """Per-token features of the condition texts, (C, 77, P), encoded once per device and dtype."""
        key = (str(self.device), self.dtype)
        if key not in self._condition_cache:
            ids = clip_token_ids(self.tokenizer, list(self.conditions.values())).to(self.device)
            with torch.no_grad():
                self._condition_cache[key] = text_tokens_and_embeds(self.model, ids)[0]
        return self._condition_cache[key]

    def prompt_condition_similarity(self, text_f: torch.Tensor, cond_f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_dtype(self, features: torch.Tensor) -> torch.dtype:
        # The mask statistic decides hard thresholds and the cosine is a small difference of large sums:
        # float32 by default. exact=True follows the dtype the towers computed in (the weights' dtype, or
        # autocast's), as the official code does: its fp16 run thresholds fp16 values.
        return features.dtype if self.exact else torch.float32

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """(token features (B, 77, P), text embedding (B, P), mask statistic, EOT position (B,)), cached."""

        def encode(new: list[str]) -> tuple[torch.Tensor, ...]:
            ids = clip_token_ids(self.tokenizer, new).to(self.device)
            text_f, text_eos = text_tokens_and_embeds(self.model, ids)
            dt = self._compute_dtype(text_f)
            stat = self.prompt_condition_similarity(text_f.to(dt), self.condition_features().to(dt))
            # CLIP pools at the first occurrence of the largest id, EOT.
            return text_f, text_eos, stat, ids.argmax(dim=-1)

        return self.prompt_cache.get_many(list(prompts), encode, key_extra=(str(self.device), self.dtype, self.exact))

    # -- one head -------------------------------------------------------------------------------
    def head_score(
        self, head: CrossModel, img_tokens: torch.Tensor, text_f: torch.Tensor, text_eos: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """``exp(logit_scale) * cos(text_eos, head(img_tokens, text_f, keep)[:, 0])``, (B,)."""
        f = head(img_tokens, text_f, keep, exact=self.exact, first_only=True)[:, 0]
        dt = self._compute_dtype(f)
        cos = (F.normalize(text_eos.to(dt), dim=-1) * F.normalize(f.to(dt), dim=-1)).sum(-1)
        return self.model.logit_scale.to(dt).exp() * cos

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, not post-layernormed, vision tokens (B, 257, P) of [0, 1] images."""
        return image_tokens(self.model, self.preprocess(images))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, exact={self.exact}, threshold={self.threshold}"


class LeScore(ConditionedCrossReward):
    """LeScore: aesthetic, fidelity and alignment heads over one image-tower pass, and their mean.

    `.scores` is ``overall`` unless a dimension or weights are selected (``create_reward("lescore:fidelity")``,
    ``create_reward("lescore", weights={"fidelity": 1.0, "alignment": 0.5})``).

    Args:
        model: transformers CLIPModel.
        cross_models: the three heads, in the official order aesthetic, fidelity, alignment.
        tokenizer: the CLIP tokenizer of the backbone.
        exact: official step-by-step computation (NaN on an all-masked row); default keeps the EOT token
            of such a row and is otherwise identical.
        threshold: cosine threshold of the mask (official 0.3).

    Example:
        >>> reward = create_reward("lescore", checkpoint="LeScore.pt", device="cuda", dtype=torch.bfloat16)
        >>> out = reward(images, prompts)
        >>> out.per_dim["fidelity"], out.scores       # scores = overall
    """

    dimensions = ("aesthetic", "fidelity", "alignment", "overall")
    default_dimension = "overall"
    conditions = LESCORE_CONDITIONS

    def __init__(self, model: CLIPModel, cross_models: Sequence[CrossModel], tokenizer, *, exact: bool = False,
                 threshold: float = 0.3) -> None:
        super().__init__(model, tokenizer, exact=exact, threshold=threshold)
        if len(cross_models) != len(self.conditions):
            raise ValueError(f"LeScore needs {len(self.conditions)} cross models; got {len(cross_models)}.")
        self.cross_models = nn.ModuleList(cross_models)

    def prompt_condition_similarity(self, text_f: torch.Tensor, cond_f: torch.Tensor) -> torch.Tensor:
        """Max over condition tokens of the cosine with each prompt token, (B, C, 77)."""
        sim = torch.einsum("cjd,bpd->bcjp", F.normalize(cond_f, dim=-1), F.normalize(text_f, dim=-1))
        return sim.amax(dim=2)

    def masks(self, stat: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Kept prompt tokens per condition, (B, C, 77) bool: cosine > threshold (+ EOT guard unless exact)."""
        keep = stat > self.threshold
        return keep if self.exact else keep_eot_if_all_masked(keep, eot)

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        text_f, text_eos, stat, eot = self.encode_prompts(prompts)
        keep = self.masks(stat, eot)
        img = self.image_tokens(images)
        text_f = text_f.to(img.dtype)
        out = {
            name: self.head_score(head, img, text_f, text_eos, keep[:, k])
            for k, (name, head) in enumerate(zip(self.conditions, self.cross_models))
        }
        out["overall"] = (out["aesthetic"] + out["fidelity"] + out["alignment"]) / 3
        return out


def _cross_configs(sd: dict, prefixes: Sequence[str], dim: int) -> list[CrossModelConfig]:
    """Head sizes from the checkpoint; official sizes where it has none, so the key check can list them."""
    configs = []
    for p in prefixes:
        try:
            configs.append(CrossModelConfig.from_state_dict(sd, p))
        except ValueError:
            configs.append(CrossModelConfig(dim=dim, ff_inner=4 * dim))
    return configs


def load_lescore(
    checkpoint: str | os.PathLike | None,
    backbone: str | os.PathLike = LAION_H14,
    tokenizer: str | os.PathLike | None = None,
    *,
    exact: bool = False,
    threshold: float = 0.3,
) -> LeScore:
    """Build LeScore from the official `LeScore.pt` and the backbone's CLIP config and tokenizer.

    Raises:
        FileNotFoundError: no checkpoint (the message says where to download it), backbone or tokenizer.
        ValueError: the checkpoint is not LeScore's (missing/unexpected keys listed) or does not match
            the backbone's sizes.
    """
    _check_options(exact, threshold)
    if checkpoint is None:
        raise FileNotFoundError(f"LeScore needs its checkpoint file. {LESCORE_WHERE}")
    path = resolve_file(checkpoint, LESCORE_FILE, where=LESCORE_WHERE)
    sd = drop_position_ids(load_state_dict(path))
    tok = clip_tokenizer(backbone, tokenizer)
    config = clip_config(backbone)
    heads = [CrossModel(c) for c in _cross_configs(sd, [f"cross_models.{i}." for i in range(3)],
                                                   config.projection_dim)]
    model = LeScore(build_clip(config), heads, tok, exact=exact, threshold=threshold)
    load_into(model, sd, what=f"LeScore checkpoint {path}")
    return model


def build_tiny_lescore(seed: int = 0, *, exact: bool = False, threshold: float = 0.3) -> LeScore:
    """A random tiny LeScore: `tiny_clip(seed)` and three `TINY_CROSS` heads (seeded)."""
    clip = tiny_clip(seed)
    with seeded(seed + 1):
        heads = [CrossModel(TINY_CROSS) for _ in range(3)]
    return LeScore(clip, heads, tiny_clip_tokenizer(), exact=exact, threshold=threshold)


def write_official_lescore(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny LeScore in the official `LeScore.pt` format (plain state dict, with `position_ids`).

    Its CLIP weights are `tiny_clip(seed)`, so `tiny_backbone_dir(dir, seed)` is the matching backbone.

    Example:
        >>> ckpt = write_official_lescore(tmp / "LeScore.pt")
        >>> reward = create_reward("lescore", checkpoint=ckpt, backbone=tiny_backbone_dir(tmp / "clip"))
    """
    model = build_tiny_lescore(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k, v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()
    )
    n_vision = model.model.vision_model.embeddings.position_embedding.weight.shape[0]
    # transformers 4.27 (pinned by LePref) stored these buffers; newer versions do not.
    sd["model.text_model.embeddings.position_ids"] = torch.arange(CLIP_CONTEXT).unsqueeze(0)
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(n_vision).unsqueeze(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def tiny_backbone_dir(path: str | os.PathLike, seed: int = 0) -> Path:
    """An HF model dir with the tiny CLIP config and tokenizer, usable as ``backbone=`` (no network)."""
    return save_tiny_clip_dir(path, seed)


@register_reward("lescore", aliases=("lepref",))
def lescore(
    checkpoint: str | None = None,
    backbone: str = LAION_H14,
    tokenizer: str | None = None,
    exact: bool = False,
    threshold: float = 0.3,
) -> LeScore:
    """LeScore from `LeScore.pt` (Google Drive) with the laion CLIP-H config and tokenizer of `backbone`."""
    return load_lescore(checkpoint, backbone, tokenizer, exact=exact, threshold=threshold)


@register_reward("lescore-tiny", tiny=True)
def lescore_tiny(seed: int = 0, exact: bool = False, threshold: float = 0.3) -> LeScore:
    """A random tiny LeScore (real preprocessing, masks and heads; tiny CLIP) for tests and demos."""
    return build_tiny_lescore(seed, exact=exact, threshold=threshold)
