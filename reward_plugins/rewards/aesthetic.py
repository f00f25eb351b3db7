"""LAION improved aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor).

score = MLP(normalize(CLIP ViT-L/14 image embedding)); the MLP (768->1024->128->64->16->1, dropouts,
no activations) is affine overall. The official file `sac+logos+ava1-l14-linearMSE.pth` collapses to
`5.23665 + w.e` with |w| = 17.9956, so scores lie in [-12.76, 23.23] and typical images give 4-7.
The embedding must be L2-normalised before the head. No prompt is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..base import RewardModel
from ..checkpoints import load_into, load_state_dict, resolve_file
from ..clip_backbone import OPENAI_L14, image_embeds, tiny_clip_config
from ..heads import LinearMLPHead
from ..preprocess import ImageTransform
from ..registry import register_reward
from ..testing import seeded

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_SOURCE = (
    f"Get {HEAD_FILE} from the GitHub repo christophschuhmann/improved-aesthetic-predictor "
    "(also vendored in ddpo-pytorch and DiffusionDPO) and pass checkpoint=<path>."
)


class AestheticHead(LinearMLPHead):
    """The official head file's module: `LinearMLPHead(768)` (kept in fp32 whatever the reward's dtype)."""


class LaionAesthetic(RewardModel):
    """LAION aesthetic v2: `head(normalize(image_embedding))`; prompts are ignored."""

    dimensions = ("aesthetic",)
    default_dimension = "aesthetic"
    requires_prompts = False
    score_range = (-12.76, 23.23)

    def __init__(self, vision: CLIPVisionModelWithProjection, head: AestheticHead) -> None:
        super().__init__()
        self.vision = vision
        self.head = head
        # OpenAI CLIP's torchvision preprocess: Resize(224, bicubic) + CenterCrop with torchvision rounding.
        self.transform = ImageTransform(224, "crop", crop_rounding="round")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_embeds(self.vision, self.preprocess(images)), dim=-1)  # = .image_embeds

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"aesthetic": self.head(self.embed(images))}


def load_head(path) -> AestheticHead:
    head = AestheticHead()
    load_into(head, load_state_dict(path), what=f"aesthetic head {path}")
    return head


def _vision_from(backbone) -> CLIPVisionModelWithProjection:
    try:
        return CLIPVisionModelWithProjection.from_pretrained(
            str(backbone), dtype=torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load the CLIP ViT-L/14 image tower from backbone={str(backbone)!r} "
            f"({type(e).__name__}). Pass a local openai/clip-vit-large-patch14 dir or a cached hub id."
        ) from None


@register_reward("aesthetic", aliases=("laion-aesthetic", "laion_aesthetic"))
def aesthetic(checkpoint: str | None = None, backbone: str = OPENAI_L14) -> LaionAesthetic:
    """LAION aesthetic v2: the official `.pth` head on the openai/clip-vit-large-patch14 image tower."""
    if checkpoint is None:
        raise FileNotFoundError(f"the aesthetic head is not on the hub. {HEAD_SOURCE}")
    head = load_head(resolve_file(checkpoint, where=HEAD_SOURCE))
    return LaionAesthetic(_vision_from(backbone), head)


@register_reward("aesthetic-tiny", tiny=True)
def aesthetic_tiny(seed: int = 4, checkpoint: str | None = None) -> LaionAesthetic:
    """A random tiny ViT (quick_gelu, 768-d projection) with a random head, or the real head via checkpoint=."""
    with seeded(seed):
        cfg: CLIPVisionConfig = tiny_clip_config(act="quick_gelu", projection_dim=768).vision_config
        cfg.projection_dim = 768
        cfg._attn_implementation = "sdpa"
        vision = CLIPVisionModelWithProjection(cfg).float()
        head = AestheticHead() if checkpoint is None else load_head(resolve_file(checkpoint, where=HEAD_SOURCE))
    return LaionAesthetic(vision, head)
