"""`ClipSimilarityReward`: the image-text cosine rewards (PickScore, HPS v2/v2.1, CLIPScore).

They differ only in the checkpoint, the image transform and how the cosine is scaled, which the
reward files supply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from .base import RewardModel
from .clip_backbone import image_embeds, text_embeds
from .preprocess import ImageTransform
from .tokenization import PromptCache, check_truncation, clip_token_ids, openai_clean, trim_after_eot


class ClipSimilarityReward(RewardModel):
    """score = `scale_fn(cos(image_embedding, text_embedding), logit_scale)`.

    Args:
        model: a transformers CLIPModel.
        tokenizer: its CLIP tokenizer (prompts are padded to 77 with EOT; EOT pooling under the causal
            mask makes the embedding independent of padding).
        transform: the official image processor as a tensor function.
        scale_fn: maps (cosine (B,), logit_scale scalar) to the score.
        prompt_prefix: prepended to every prompt (CLIPScore's paper convention uses "A photo depicts ").
        clean_text: apply OpenAI/open_clip text cleaning (html unescape, ftfy) as the official code of
            rewards built on those packages does (HPS, CLIPScore paper).
        truncation: how prompts over 77 tokens are cut, see `clip_token_ids` ("keep_eot" or "torchmetrics").
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer,
        transform: ImageTransform,
        scale_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        prompt_prefix: str = "",
        clean_text: bool = False,
        truncation: str = "keep_eot",
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.scale_fn = scale_fn
        self.prompt_prefix = prompt_prefix
        self.clean_text = clean_text
        self.truncation = check_truncation(truncation)
        self.prompt_cache = PromptCache()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, P), cached per prompt."""

        def encode(new: list[str]) -> torch.Tensor:
            texts = [self.prompt_prefix + (openai_clean(p) if self.clean_text else p) for p in new]
            ids = clip_token_ids(self.tokenizer, texts, truncation=self.truncation)
            # EOT pooling under the causal mask: the padding after EOT never matters, so it is not computed.
            ids = trim_after_eot(ids, self.tokenizer.eos_token_id).to(self.device)
            return F.normalize(text_embeds(self.model, ids), dim=-1)

        return self.prompt_cache.get_many(prompts, encode, key_extra=(str(self.device), self.dtype))

    def compile_image_tower(self, **kwargs) -> ClipSimilarityReward:
        """`torch.compile` the image tower in place with static shapes (``dynamic=False``); returns self.

        The transform always feeds it (B, 3, 224, 224), so it compiles once per batch size; keep the batch
        size fixed (best-of-N, pair mining) to reuse one graph. Parameter names and gradients are
        unchanged. Meant for CUDA (on CPU the first call compiles for minutes). `kwargs` go to
        `torch.compile`, e.g. ``mode="max-autotune"``.

        Example:
            >>> reward = create_reward("pickscore", device="cuda", dtype=torch.bfloat16).compile_image_tower()
        """
        self.model.vision_model.compile(dynamic=False, **kwargs)
        return self

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, P) of [0, 1] images."""
        return F.normalize(image_embeds(self.model, self.preprocess(images)), dim=-1)

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        img = self.image_embedding(images)
        txt = self.encode_prompts(prompts).to(img.dtype)
        cos = (img * txt).sum(-1)
        return {self.default_dimension: self.scale_fn(cos.float(), self.model.logit_scale.float())}
