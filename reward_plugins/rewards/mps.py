"""MPS, Multi-dimensional Preference Score (Kwai-Kolors, CVPR'24), "overall" checkpoint.

LeScore's architecture with a single head and one condition text, the "overall" one; the mask rule
differs (`specs/reward_models.md` §3.2): ``s = max over condition tokens of the RAW dot product`` with
each prompt token, divided by a max, then ``s > threshold``.

- ``threshold=0.3`` (default) is the official evaluation scripts' value, behind the reported numbers;
  ``threshold=0.01`` is the one `CLIPModel.forward` (the README example) uses.
- ``max_mode="per_sample"`` (default) divides each prompt's ``s`` by its own max. The evaluation scripts
  score one image at a time, so this is their result, and a score does not depend on the rest of the
  batch. ``max_mode="batch"`` divides by the max over the whole batch, as the official code does on a
  batch: a prompt's mask then depends on the other prompts in the batch.

Dtype of the mask statistic: by default (``exact=False``) the prompt-condition dot products, the division
by the max and the threshold test run in float32 whatever the reward's dtype, so the mask does not
depend on fp16/bf16 rounding. The official evaluation runs everything in fp16, where both the ratio and
the threshold are rounded to fp16 (0.3 becomes 0.30005): a prompt token whose ratio lies within fp16
rounding of the threshold (e.g. 0.30002) is kept here but dropped by the official fp16 run, which changes
that prompt's score. ``exact=True`` follows the dtype the towers computed in (the weights' dtype, or
autocast's), statistic and final cosine included, so ``exact=True, dtype=torch.float16`` reproduces the
official fp16 masks.

All-masked rows (possible in batch mode, or when a max is not positive): ``exact=True`` reproduces the
official NaN; the default keeps the prompt's EOT token as the only key of such a row, so it differs from
the official code only where that code is NaN.

Checkpoint: `MPS_overall_checkpoint.pth` (Google Drive), a whole pickled module under the official
class paths (`trainer.models.clip_model.CLIPModel`, ...), most likely fp16. It is read with
`reward_plugins.unpickle` (no pickled code runs) into ``model.*`` / ``cross_model.*`` keys; plain state
dicts with those keys load too. The official evaluation runs the whole model in fp16 (``dtype=torch.float16``
here); rotary angles are recomputed from the stored `inv_freq` in its dtype, as the official code does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPModel

from ..checkpoints import drop_position_ids, load_into, load_state_dict, resolve_file
from ..clip_backbone import LAION_H14, build_clip, clip_config, clip_tokenizer
from ..cross_attention import CrossModel
from ..registry import register_reward
from ..testing import seeded, tiny_clip
from ..tokenization import tiny_clip_tokenizer
from ..unpickle import load_module_state_dict
from .lescore import TINY_CROSS, ConditionedCrossReward, _check_options, _cross_configs, keep_eot_if_all_masked

MPS_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
MPS_FILE = "MPS_overall_checkpoint.pth"
MPS_GDRIVE_ID = "17qrK_aJkVNM75ZEvMEePpLj6L867MLkN"
MPS_WHERE = (
    f"MPS_overall_checkpoint.pth is published only on Google Drive: https://drive.google.com/file/d/{MPS_GDRIVE_ID} "
    "(linked from the README of github.com/Kwai-Kolors/MPS); download it and pass checkpoint='path/to/it'."
)
MAX_MODES = ("per_sample", "batch")


class MPS(ConditionedCrossReward):
    """MPS overall: ``exp(logit_scale) * cos(text_embedding, Cross_model(image_tokens, masked prompt)[:, 0])``.

    Args:
        model: transformers CLIPModel (``model.*``).
        cross_model: the head (``cross_model.*``).
        tokenizer: the CLIP tokenizer of the backbone.
        exact: official step-by-step computation (NaN on an all-masked row), in the towers' dtype (the
            default computes the mask statistic and the cosine in float32; see the module docstring).
        threshold: 0.3 (evaluation scripts, default) or 0.01 (`forward`/README).
        max_mode: "per_sample" (default; batch-independent, = the evaluation scripts) or "batch"
            (divide by the batch-global max, as the official code does on a batch).

    Example:
        >>> reward = create_reward("mps", checkpoint="MPS_overall_checkpoint.pth", device="cuda")
        >>> reward(images, prompts).scores
    """

    dimensions = ("mps",)
    default_dimension = "mps"
    conditions = {"mps": MPS_CONDITION}

    def __init__(self, model: CLIPModel, cross_model: CrossModel, tokenizer, *, exact: bool = False,
                 threshold: float = 0.3, max_mode: str = "per_sample") -> None:
        super().__init__(model, tokenizer, exact=exact, threshold=threshold)
        _check_max_mode(max_mode)
        self.cross_model = cross_model
        self.max_mode = max_mode

    def prompt_condition_similarity(self, text_f: torch.Tensor, cond_f: torch.Tensor) -> torch.Tensor:
        """Max over condition tokens of the raw dot product with each prompt token, (B, 77)."""
        return torch.einsum("bpd,jd->bjp", text_f, cond_f[0]).amax(dim=1)

    def masks(self, stat: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Kept prompt tokens (B, 77): ``stat / max > threshold`` (+ EOT guard unless exact)."""
        denom = stat.amax(dim=-1, keepdim=True) if self.max_mode == "per_sample" else stat.max()
        keep = (stat / denom) > self.threshold
        return keep if self.exact else keep_eot_if_all_masked(keep, eot)

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        text_f, text_eos, stat, eot = self.encode_prompts(prompts)
        img = self.image_tokens(images)
        keep = self.masks(stat, eot)
        return {"mps": self.head_score(self.cross_model, img, text_f.to(img.dtype), text_eos, keep)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_mode={self.max_mode!r}"


def _check_max_mode(max_mode: str) -> None:
    if max_mode not in MAX_MODES:
        raise ValueError(
            f"max_mode must be 'per_sample' (each prompt divided by its own max; default) or 'batch' "
            f"(official batch-global max); got {max_mode!r}."
        )


def load_mps_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``model.*``/``cross_model.*`` tensors from a plain state dict or the official whole pickled module.

    Plain state dicts (and `.safetensors`) are read with `torch.load(weights_only=True)`; a whole module
    goes through the restricted unpickler, which runs no pickled code.
    """
    if Path(path).suffix == ".safetensors":
        return load_state_dict(path)
    try:
        return load_state_dict(path)
    except ValueError:
        # Not a plain state dict (or not one torch's weights-only loader reads): the restricted unpickler,
        # which runs no pickled code, rebuilds a whole module or says why the file is refused or invalid.
        return load_module_state_dict(path)


def load_mps(
    checkpoint: str | os.PathLike | None,
    backbone: str | os.PathLike = LAION_H14,
    tokenizer: str | os.PathLike | None = None,
    *,
    exact: bool = False,
    threshold: float = 0.3,
    max_mode: str = "per_sample",
) -> MPS:
    """Build MPS from its checkpoint and the backbone's CLIP config and tokenizer.

    Raises:
        FileNotFoundError: no checkpoint (the message says where to get it), backbone or tokenizer.
        RefusedGlobalError: the pickle would run code outside the allow-list (nothing ran).
        ValueError: the checkpoint is not MPS's (missing/unexpected keys listed).
    """
    _check_options(exact, threshold)
    _check_max_mode(max_mode)
    if checkpoint is None:
        raise FileNotFoundError(f"MPS needs its checkpoint file. {MPS_WHERE}")
    path = resolve_file(checkpoint, MPS_FILE, where=MPS_WHERE)
    sd = drop_position_ids(load_mps_state_dict(path))
    tok = clip_tokenizer(backbone, tokenizer)
    config = clip_config(backbone)
    (head_cfg,) = _cross_configs(sd, ["cross_model."], config.projection_dim)
    model = MPS(build_clip(config), CrossModel(head_cfg), tok, exact=exact, threshold=threshold, max_mode=max_mode)
    load_into(model, sd, what=f"MPS checkpoint {path}")
    return model


def build_tiny_mps(seed: int = 0, *, exact: bool = False, threshold: float = 0.3, max_mode: str = "per_sample") -> MPS:
    """A random tiny MPS: `tiny_clip(seed)` and one `TINY_CROSS` head (seeded)."""
    clip = tiny_clip(seed)
    with seeded(seed + 7):  # not LeScore's seed, so the tiny MPS head differs from LeScore's heads
        head = CrossModel(TINY_CROSS)
    return MPS(clip, head, tiny_clip_tokenizer(), exact=exact, threshold=threshold, max_mode=max_mode)


@register_reward("mps", aliases=("mps-overall",))
def mps(
    checkpoint: str | None = None,
    backbone: str = LAION_H14,
    tokenizer: str | None = None,
    exact: bool = False,
    threshold: float = 0.3,
    max_mode: str = "per_sample",
) -> MPS:
    """MPS overall from `MPS_overall_checkpoint.pth` (Google Drive; pickled module) or a state dict."""
    return load_mps(checkpoint, backbone, tokenizer, exact=exact, threshold=threshold, max_mode=max_mode)


@register_reward("mps-tiny", tiny=True)
def mps_tiny(seed: int = 0, exact: bool = False, threshold: float = 0.3, max_mode: str = "per_sample") -> MPS:
    """A random tiny MPS (real preprocessing, mask rule and head; tiny CLIP) for tests and demos."""
    return build_tiny_mps(seed, exact=exact, threshold=threshold, max_mode=max_mode)
