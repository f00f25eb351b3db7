"""ImageReward v1.0 (Xu et al. 2023, THUDM/ImageReward) on transformers' BLIP classes.

The official model is BLIP: a ViT-L/16 image encoder (LayerNorm eps 1e-6, final norm on every token)
and a BERT-base text encoder whose layers cross-attend to the image tokens. The prompt's [CLS] output
(the first token stays [CLS]; it is not replaced by [ENC] as in BLIP's ITM head) goes through a
five-layer linear MLP with no activations, and

    score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072.

Here the image encoder is transformers' `BlipVisionModel` and the text encoder `BlipTextModel`
(built with `is_decoder=True` only so that its layers own `crossattention`; it is called
bidirectionally with `encoder_hidden_states`). The official `ImageReward.pt` is converted at load time
and, unlike the official `strict=False`, every missing or unexpected key is reported. Only the legacy
`position_ids` buffer and the unused `vision_proj`/`text_proj`/`itm_head` weights are dropped, by name.

Preprocessing follows the official `_transform(224)`: shortest side to 224 with Pillow's antialiased
bicubic kernel, centre crop with torchvision's rounding, CLIP mean/std; here in torch, differentiably
(the ReFL use). The remaining difference from the PIL path is PIL's uint8 rounding after the resize.

Example:
    >>> import reward_plugins as rp
    >>> reward = rp.create_reward("imagereward", checkpoint="ImageReward.pt", backbone="bert-base-uncased")
    >>> reward(images, ["a red bicycle"] * len(images)).scores  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from ..base import RewardModel
from ..checkpoints import StateDict, load_into, load_state_dict, resolve_file, strip_prefix
from ..heads import LinearMLPHead
from ..preprocess import ImageTransform
from ..registry import register_reward
from ..testing import seeded
from ..tokenization import PromptCache

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_BACKBONE = "bert-base-uncased"
CHECKPOINT_SOURCE = (
    f"The official weights are {CHECKPOINT_FILE} (and {MED_CONFIG_FILE}) in the hub repo {HUB_REPO}; "
    "pass checkpoint=<path to ImageReward.pt> or a dir holding it."
)

# Normalisation of the raw MLP output, fixed in the official ImageReward class.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35  # the official tokenizer call: padding="max_length", truncation=True, max_length=35
IMAGE_SIZE = 224

# BLIP's ViT-L/16 (`create_vit('large', 224)`): no pre-norm, LayerNorm eps 1e-6, exact GELU.
VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 16}

# The values of the official med_config.json (BertConfig); `encoder_width` is overwritten by the vision
# width, and BLIP's embeddings have no token-type table, so `type_vocab_size` is unused.
MED_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
              "hidden_act": "gelu", "pad_token_id": 0}

# Entries of a state dict that the score never reads: the legacy persistent `position_ids` buffer of
# BLIP's med.py, and the contrastive / matching heads of BLIP_Pretrain.
DROPPED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")
DROPPED_SUFFIXES = ("embeddings.position_ids",)

# Tiny twin: real geometry (224 px, 16 px patches, 197 image tokens, 35 text tokens), tiny widths. Its
# random weights are drawn wider than BERT's 0.02 so that image and prompt move the score visibly.
TINY_INIT = 0.1
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 224, "patch_size": 16, "initializer_range": TINY_INIT}
TINY_MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64}
TINY_WORDS = (
    "a an the of in on with and at by is are this that photo picture painting drawing portrait render "
    "cat dog bird horse fox astronaut robot car bicycle city tree forest mountain river sea sky house "
    "red blue green yellow black white small big old young happy beautiful detailed realistic oil "
    "watercolor digital art style sunset night snow riding sitting standing , . ! - ##s ##ing ##ed ##er"
).split()


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
def blip_vision_config(**overrides) -> BlipVisionConfig:
    """The BLIP ViT config (ViT-L/16 by default) with the official LayerNorm eps 1e-6 (HF's default is 1e-5)."""
    values = {**VIT_LARGE, "initializer_range": 0.02, **overrides}
    cfg = BlipVisionConfig(**values, hidden_act="gelu", layer_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    return cfg


def blip_text_config(med: Mapping[str, object], encoder_width: int, initializer_range: float = 0.02) -> BlipTextConfig:
    """A `BlipTextConfig` from med_config values, cross-attending to `encoder_width`-wide image tokens.

    `is_decoder=True` only makes `BlipTextLayer` build `crossattention`; the reward calls the model
    bidirectionally (`BlipTextModel.forward` defaults to `is_decoder=False`).
    """
    values = {**MED_CONFIG, **{k: v for k, v in med.items() if k in MED_CONFIG}}
    vocab = int(values["vocab_size"])
    # [DEC] is the second-to-last id (30522 of 30524); [SEP] is 102 in bert-base-uncased. Both only
    # matter for generation, but out-of-vocabulary ids make transformers warn on tiny vocabularies.
    cfg = BlipTextConfig(**values, encoder_hidden_size=encoder_width, is_decoder=True, use_cache=False,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         initializer_range=initializer_range, bos_token_id=vocab - 2,
                         sep_token_id=102 if vocab > 102 else None, eos_token_id=2 if vocab > 2 else None)
    cfg._attn_implementation = "eager"
    return cfg


def read_med_config(path: str | os.PathLike | None) -> dict:
    """The text-encoder values of a BLIP `med_config.json`; None gives the official file's values.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not JSON, or it describes a text encoder ImageReward cannot have
            (no cross-attention, or relative position embeddings).
    """
    if path is None:
        return dict(MED_CONFIG)
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MED_CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"med_config file not found: {str(path)!r}. It is {MED_CONFIG_FILE} in the hub repo {HUB_REPO}; "
            "or leave med_config=None for the official values."
        )
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"med_config {str(p)!r} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"med_config {str(p)!r} must hold a JSON object; got {type(raw).__name__}.")
    if raw.get("add_cross_attention") is False:
        raise ValueError(
            f"med_config {str(p)!r} sets add_cross_attention=false, but ImageReward's text encoder "
            "cross-attends to the image; use the med_config.json published with ImageReward.pt."
        )
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"med_config {str(p)!r} sets position_embedding_type={raw['position_embedding_type']!r}; "
            "BLIP's text encoder uses 'absolute' position embeddings."
        )
    return {**MED_CONFIG, **{k: raw[k] for k in MED_CONFIG if k in raw}}


def _vision_heads(width: int) -> int:
    # BLIP's ViTs use 64-wide heads (base 12 x 64, large 16 x 64). Narrower models are the tiny test
    # twins, which use 8-wide heads; head count cannot be read from tensor shapes.
    return width // 64 if width >= 64 and width % 64 == 0 else max(1, width // 8)


def vision_config_from_checkpoint(sd: Mapping[str, torch.Tensor]) -> BlipVisionConfig:
    """The ViT geometry an official-format state dict holds (ViT-L/16 when it is not one)."""
    p = "blip.visual_encoder."
    if f"{p}cls_token" not in sd or f"{p}patch_embed.proj.weight" not in sd or f"{p}pos_embed" not in sd:
        return blip_vision_config()  # another model's checkpoint: load_into then lists what differs
    width = sd[f"{p}cls_token"].shape[-1]
    patch = sd[f"{p}patch_embed.proj.weight"].shape[-1]
    grid = int(round((sd[f"{p}pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({m.group(1) for k in sd if (m := re.match(rf"{re.escape(p)}blocks\.(\d+)\.", k))})
    fc1 = sd.get(f"{p}blocks.0.mlp.fc1.weight")
    return blip_vision_config(
        hidden_size=width, patch_size=patch, image_size=grid * patch, num_hidden_layers=depth,
        intermediate_size=fc1.shape[0] if fc1 is not None else 4 * width, num_attention_heads=_vision_heads(width),
    )


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------
class ImageRewardHead(LinearMLPHead):
    """The official `mlp`: `LinearMLPHead(768)`; the official `score` casts [CLS] to fp32 before it."""


class BlipImageReward(nn.Module):
    """BLIP image encoder + cross-attending text encoder + MLP head, on transformers' BLIP classes.

    State-dict keys: `vision_model.*` (BlipVisionModel), `text_encoder.*` (BlipTextModel without pooler),
    `mlp.layers.*`; `convert_official_state_dict` maps `ImageReward.pt` onto them.

    Example:
        >>> net = BlipImageReward(blip_vision_config(), blip_text_config(MED_CONFIG, 1024))
        >>> net(pixel_values, input_ids, attention_mask).shape  # doctest: +SKIP
        torch.Size([B])
    """

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(
                f"text_config.encoder_hidden_size ({text_config.encoder_hidden_size}) must equal the vision width "
                f"({vision_config.hidden_size}): the text encoder cross-attends to the image tokens."
            )
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardHead(text_config.hidden_size)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, width): every token after the final LayerNorm, as BLIP's `visual_encoder`."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def cls_features(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's [CLS] output with cross-attention to all image tokens (no image mask)."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_tokens)
        return out.last_hidden_state[:, 0, :]

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised ImageReward scores (B,) float32 of normalised pixels (B, 3, 224, 224)."""
        h = self.cls_features(self.image_tokens(pixel_values), input_ids, attention_mask)
        return (self.mlp(h) - REWARD_MEAN) / REWARD_STD


def build_network(vision_config: BlipVisionConfig, med: Mapping[str, object]) -> BlipImageReward:
    """An fp32 `BlipImageReward` with the text encoder sized by `med` (med_config values)."""
    text_config = blip_text_config(med, vision_config.hidden_size, vision_config.initializer_range)
    net = BlipImageReward(vision_config, text_config)
    return net.float().eval()


# --------------------------------------------------------------------------------------------------
# checkpoint conversion (official BLIP names <-> transformers' BLIP names)
# --------------------------------------------------------------------------------------------------
_VIT_TOP = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
            ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
            ("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
            ("norm.weight", "post_layernorm.weight"), ("norm.bias", "post_layernorm.bias"))
_VIT_BLOCK = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
              ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
_OFFICIAL_BLOCK = re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.(.+)$")
_OURS_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")


def _rename(rest: str, table) -> str | None:
    for a, b in table:
        if rest.startswith(a):
            return b + rest[len(a):]
    return None


def is_dropped_key(key: str) -> bool:
    """Keys of `ImageReward.pt` that the score never reads (position_ids buffers, unused projection heads)."""
    return key.startswith(DROPPED_PREFIXES) or key.endswith(DROPPED_SUFFIXES)


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """`ImageReward.pt` keys -> `BlipImageReward` keys (transformers' `convert_blip_original_pytorch_to_hf` names).

    Keys that no rule maps keep their name, so a strict load reports them as unexpected under the name
    they have in the file.
    """
    sd = strip_prefix(sd, "module.")
    out: StateDict = {}
    for key, value in sd.items():
        if is_dropped_key(key):
            continue
        new = None
        if m := _OFFICIAL_BLOCK.match(key):
            rest = _rename(m.group(2), _VIT_BLOCK)
            new = None if rest is None else f"vision_model.encoder.layers.{m.group(1)}.{rest}"
        elif key.startswith("blip.visual_encoder."):
            rest = dict(_VIT_TOP).get(key[len("blip.visual_encoder."):])
            new = None if rest is None else f"vision_model.{rest}"
        elif key.startswith("blip.text_encoder."):
            new = "text_encoder." + key[len("blip.text_encoder."):]
        elif key.startswith("mlp.layers."):
            new = key
        out[new or key] = value
    return out


def to_official_state_dict(net: BlipImageReward, *, seed: int = 0, embed_dim: int = 256) -> StateDict:
    """The inverse of `convert_official_state_dict`, plus what the official file also holds: the
    persistent `position_ids` buffer and random `vision_proj`/`text_proj` (unused by the score)."""
    out: StateDict = {}
    top = {b: a for a, b in _VIT_TOP}
    for key, value in net.state_dict().items():
        value = value.detach().clone()
        if m := _OURS_BLOCK.match(key):
            rest = _rename(m.group(2), [(b, a) for a, b in _VIT_BLOCK])
            out[f"blip.visual_encoder.blocks.{m.group(1)}.{rest}"] = value
        elif key.startswith("vision_model."):
            out["blip.visual_encoder." + top[key[len("vision_model."):]]] = value
        elif key.startswith("text_encoder."):
            out["blip." + key] = value
        else:
            out[key] = value
    tcfg = net.text_encoder.config
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(tcfg.max_position_embeddings).expand(1, -1).clone()
    with seeded(seed + 1):
        vw = net.vision_model.config.hidden_size
        for name, width in (("vision_proj", vw), ("text_proj", tcfg.hidden_size)):
            lin = nn.Linear(width, embed_dim)
            out[f"blip.{name}.weight"], out[f"blip.{name}.bias"] = lin.weight.detach(), lin.bias.detach()
    return out


def _skip_random_init():
    # Random init of the 446 M parameters takes seconds and is thrown away by the strict load.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def load_official(checkpoint: str | os.PathLike, med_config: str | os.PathLike | None = None) -> BlipImageReward:
    """Build and strictly load `BlipImageReward` from an official `ImageReward.pt`.

    Args:
        checkpoint: the file, a dir holding `ImageReward.pt`, or a hub repo id (`THUDM/ImageReward`).
        med_config: the BLIP `med_config.json` (path or dir); None uses the official values.

    Raises:
        FileNotFoundError: the checkpoint or med_config cannot be found.
        ValueError: the file is not an ImageReward checkpoint: the message lists the missing, unexpected
            and mis-shaped keys (the official loader's `strict=False` would skip them silently).
    """
    path = resolve_file(checkpoint, CHECKPOINT_FILE, where=CHECKPOINT_SOURCE)
    sd = load_state_dict(path)
    med = read_med_config(med_config)
    with _skip_random_init():  # every persistent tensor is overwritten by the strict load below
        net = build_network(vision_config_from_checkpoint(sd), med)
    try:
        load_into(net, convert_official_state_dict(sd), what=f"ImageReward checkpoint {path}")
    except ValueError as e:
        given = "the official values" if med_config is None else repr(str(med_config))
        raise ValueError(
            f"{e} The text encoder's sizes come from med_config= (here {given}): pass the "
            f"{MED_CONFIG_FILE} published with the checkpoint."
        ) from None
    return net


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
def add_blip_special_tokens(tokenizer):
    """Add `[DEC]` as bos_token and `[ENC]` as additional special token, as BLIP's `init_tokenizer` does
    (ids 30522 and 30523 on bert-base-uncased). Idempotent. Returns the tokenizer."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_tokenizer(backbone: str | os.PathLike = DEFAULT_BACKBONE):
    """The official tokenizer: `BertTokenizer` of `backbone` (bert-base-uncased) plus [DEC]/[ENC].

    Raises:
        FileNotFoundError: no tokenizer can be loaded from `backbone`.
    """
    try:
        tok = BertTokenizer.from_pretrained(str(backbone))
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(
            f"cannot load the BERT tokenizer from backbone={str(backbone)!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local bert-base-uncased dir (vocab.txt) or "
            "a hub id in your cache; with HF_HUB_OFFLINE=1 only cached ids resolve."
        ) from None
    return add_blip_special_tokens(tok)


def tiny_tokenizer_dir(path: str | os.PathLike) -> Path:
    """Write a tiny WordPiece `vocab.txt` ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then `TINY_WORDS`) into
    the dir `path`, loadable with `imagereward_tokenizer(path)`. Returns the dir."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(_tiny_vocab()) + "\n", encoding="utf-8")
    return path


def _tiny_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]


def tiny_imagereward_tokenizer():
    """The tiny WordPiece tokenizer (offline, in memory) with [DEC]/[ENC] added: `len(_tiny_vocab()) + 2` ids."""
    vocab = {tok: i for i, tok in enumerate(_tiny_vocab())}
    return add_blip_special_tokens(BertTokenizer(vocab=vocab))


# --------------------------------------------------------------------------------------------------
# preprocessing and the reward
# --------------------------------------------------------------------------------------------------
def imagereward_transform(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The official `_transform(224)` on [0, 1] tensors: shortest side -> 224 (AA bicubic, Pillow's
    kernel, clamped as PIL's uint8 output), centre crop, CLIP mean/std. Differentiable."""
    return ImageTransform(size, "crop", crop_rounding="round")(images)


class ImageReward(RewardModel):
    """ImageReward v1.0: `(MLP(BLIP_text([CLS] | prompt, image)) - mean) / std`; typical scores lie in [-2, 2].

    Args:
        net: the BLIP network (`load_official` or `build_network`).
        tokenizer: bert-base-uncased with [DEC]/[ENC] (`imagereward_tokenizer`).
        max_length: tokens per prompt, padded and truncated (35 as official: at most 33 word-pieces).

    Example:
        >>> reward = create_reward("imagereward-tiny")
        >>> reward(torch.rand(2, 3, 512, 768), ["a cat", "a dog"]).scores.shape
        torch.Size([2])
    """

    dimensions = ("imagereward",)
    default_dimension = "imagereward"
    score_range = None

    def __init__(self, net: BlipImageReward, tokenizer, max_length: int = MAX_LENGTH) -> None:
        super().__init__()
        vocab = net.text_encoder.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} ids but the text encoder's vocabulary has {vocab}; "
                "backbone= must be the tokenizer the checkpoint was trained with (bert-base-uncased for ImageReward)."
            )
        self.net = net
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = net.vision_model.config.image_size
        # Text encoding needs the image (cross-attention), so only the token ids and masks are cached.
        self.prompt_cache = PromptCache()

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask), each (B, max_length) int64 on the model's device; [CLS] first."""

        def encode(new: list[str]):
            enc = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        ids, mask = self.prompt_cache.get_many(prompts, encode)
        return ids.to(self.device), mask.to(self.device)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        return imagereward_transform(images, self.image_size)

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        return {"imagereward": self.net(self.preprocess(images), ids, mask)}


# --------------------------------------------------------------------------------------------------
# tiny builders (tests, demo)
# --------------------------------------------------------------------------------------------------
def tiny_med_config() -> dict:
    """med_config values of the tiny twin (vocabulary = the tiny WordPiece vocab + [DEC]/[ENC])."""
    return {**MED_CONFIG, **TINY_MED, "vocab_size": len(_tiny_vocab()) + 2}


def tiny_network(seed: int = 0) -> BlipImageReward:
    """A random tiny `BlipImageReward` (ViT 32 x 2 layers at 224/16, text 32 x 2 layers, 4 heads)."""
    with seeded(seed):
        net = build_network(blip_vision_config(**TINY_VISION), tiny_med_config())
        # Variance-preserving head weights: nn.Linear's default init shrinks the variance threefold per
        # layer, which would leave the tiny scores nearly constant.
        for layer in net.mlp.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                nn.init.normal_(layer.bias, std=0.1)
    return net


def write_official_imagereward(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random tiny ImageReward in the official layout into the dir `path`: `ImageReward.pt`
    (official keys, `position_ids` buffer, `vision_proj`/`text_proj`) and `med_config.json`.

    Example:
        >>> d = write_official_imagereward(tmp_path)
        >>> create_reward("imagereward", checkpoint=d / "ImageReward.pt", backbone=tiny_tokenizer_dir(d),
        ...               med_config=d / "med_config.json")  # doctest: +SKIP
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    net = tiny_network(seed)
    torch.save(to_official_state_dict(net, seed=seed), path / CHECKPOINT_FILE)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1,
           "initializer_range": 0.02, "model_type": "bert", "type_vocab_size": 2, **tiny_med_config(),
           "encoder_width": 768, "add_cross_attention": True}
    (path / MED_CONFIG_FILE).write_text(json.dumps(med, indent=2), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# registrations
# --------------------------------------------------------------------------------------------------
@register_reward("imagereward", aliases=("image_reward", "imagereward-v1"))
def imagereward(
    checkpoint: str | os.PathLike = HUB_REPO,
    backbone: str | os.PathLike = DEFAULT_BACKBONE,
    med_config: str | os.PathLike | None = None,
) -> ImageReward:
    """ImageReward v1.0 from the official `ImageReward.pt` (file, dir or hub id) and the bert-base-uncased tokenizer."""
    net = load_official(checkpoint, med_config)
    return ImageReward(net, imagereward_tokenizer(backbone))


@register_reward("imagereward-tiny", tiny=True)
def imagereward_tiny(seed: int = 0) -> ImageReward:
    """A random tiny ImageReward (real preprocessing, tokenisation and scoring; tiny BLIP) for tests and demos."""
    return ImageReward(tiny_network(seed), tiny_imagereward_tokenizer())
