"""DeQA-Score (You et al. 2025): image quality from mPLUG-Owl2's next-token distribution over five level words.

Official scoring (`src/evaluate/scorer.py` of zhiyuanyou/DeQA-Score):
1. pad the image to a square with the CLIP mean colour (122, 116, 104), centred at (max - min) // 2;
2. CLIPImageProcessor at 448 px (bicubic, CLIP mean/std);
3. the fixed prompt ``"USER: How would you rate the quality of this image?\\n<|image|>\\nASSISTANT: The quality of
   the image is"`` tokenised with `tokenizer_image_token` (LLaMA-2 SentencePiece with BOS; -200 for the image);
4. score = softmax(logits[last, ids of excellent/good/fair/poor/bad]) @ [5, 4, 3, 2, 1], in [1, 5].

Here all of it is a differentiable torch function of [0, 1] image tensors: the padding and the antialiased
bicubic resize run in torch (`ImageTransform(448, "square")`), the prompt ids are computed once, and the
five-way softmax and its expectation run in float32 (the official code does them in fp16). The `iqa_eval.py`
form of the prompt (" " instead of "\\n" before ASSISTANT) is available as ``prompt="iqa_eval"``.

Checkpoints: a directory (or hub id) in the official layout, `config.json` plus sharded weights
(`model-0000i-of-0000n.safetensors` or `pytorch_model-0000i-of-0000n.bin` with their index json) under the
mPLUG-Owl2 key names; or the LoRA variant (`adapter_config.json`, `adapter_model.*`, `non_lora_trainables.bin`)
merged at load time into its base mPLUG-Owl2 (W + alpha/r * B @ A).

Example:
    >>> reward = create_reward("deqa", device="cuda", dtype=torch.bfloat16, backbone="tokenizer.model")
    >>> reward(images).scores          # (B,) in [1, 5]
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..base import RewardModel
from ..checkpoints import load_state_dict, looks_like_repo_id, resolve_file
from ..deqa_model import (
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    MplugOwl2,
    MplugOwl2Config,
    build_mplug_owl2,
    tiny_mplug_owl2_config,
)
from ..preprocess import CLIP_MEAN, ImageTransform
from ..registry import register_reward, resolve_dtype

DEFAULT_CHECKPOINT = "zhiyuanyou/DeQA-Score-Mix3"
DEFAULT_LORA_BASE = "MAGAer13/mplug-owl2-llama2-7b"
LEVEL_WORDS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_IDS = (15129, 1781, 6534, 6460, 4319)  # ▁excellent ▁good ▁fair ▁poor ▁bad in the LLaMA-2 vocabulary
LEVEL_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
# `expand2square(img, tuple(int(x * 255) for x in image_mean))`: the truncated CLIP mean colour.
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
PAD_FILL = tuple(c / 255.0 for c in PAD_COLOR)
PROMPTS = {
    "scorer": "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is",
    "iqa_eval": "USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The quality of the image is",
}
WHERE = (
    "DeQA-Score weights: https://huggingface.co/zhiyuanyou/DeQA-Score-Mix3 (full) or "
    "zhiyuanyou/DeQA-Score-LoRA-Mix3 with base MAGAer13/mplug-owl2-llama2-7b; the tokenizer is "
    "preprocessor/tokenizer.model of github.com/zhiyuanyou/DeQA-Score."
)
_DERIVED = ("rotary_emb.inv_freq", "attention.q_pos_embed", "attention.k_pos_embed")

Encoder = Callable[[str], list[int]]


# ----------------------------------------------------------------------------------------------------
# prompt tokenisation
# ----------------------------------------------------------------------------------------------------
class SentencePieceLlama:
    """The LLaMA-2 SentencePiece tokenizer as DeQA's slow `LlamaTokenizer` (transformers 4.36, BOS added)
    applies it to plain text: `[bos] + sp.encode(text)`.

    transformers 5's `LlamaTokenizer` drops a lone leading "▁" (id 29871) for text that starts with a space,
    which changes the `iqa_eval` prompt, so SentencePiece is used directly.

    Example:
        >>> tok = SentencePieceLlama("tokenizer.model")
        >>> tok.encode("excellent")
        [1, 15129]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {str(path)!r}. {WHERE}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_token_id = self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *self.sp.encode(text)]

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


def byte_fallback_encode(text: str) -> list[int]:
    """Offline stand-in for the tiny reward: BOS, then each UTF-8 byte as LLaMA-2's byte-fallback piece
    `<0xNN>` (id 3 + byte). Every id is a real entry of the 32,000-token vocabulary."""
    return [1, *(3 + b for b in text.encode("utf-8"))]


def tokenizer_image_token(prompt: str, encode: Encoder, bos_token_id: int = 1) -> list[int]:
    """The official `tokenizer_image_token`: encode the text around each `<|image|>` separately (each with
    BOS), keep one leading BOS, drop the others, and put `IMAGE_TOKEN_INDEX` (-200) at each placeholder."""
    chunks = [encode(c) if c else [] for c in prompt.split(DEFAULT_IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def resolve_prompt(prompt: str) -> str:
    """"scorer" / "iqa_eval" -> the official text; any other string must hold exactly one `<|image|>`."""
    text = PROMPTS.get(prompt, prompt)
    if not isinstance(text, str) or text.count(DEFAULT_IMAGE_TOKEN) != 1:
        raise ValueError(
            f"prompt must be 'scorer', 'iqa_eval' or a string with exactly one {DEFAULT_IMAGE_TOKEN!r} "
            f"placeholder; got {prompt!r}."
        )
    return text


def level_token_ids(encode: Encoder) -> list[int]:
    """`[tok(w).input_ids[1] for w in level words]`, as the official scorer derives them."""
    return [encode(w)[1] for w in LEVEL_WORDS]


def _encoder_from(source: str | os.PathLike) -> Encoder:
    """A `tokenizer.model` file, a dir holding one, or a hub id -> an encode function (BOS first).

    There is no fallback to transformers' LlamaTokenizer: in transformers 5 it drops a token of the
    iqa_eval prompt, so the ids would silently differ from the official (slow, 4.36) tokenizer.
    """
    where = f"DeQA-Score needs the SentencePiece LLaMA-2 tokenizer.model; pass backbone= it or its dir. {WHERE}"
    return SentencePieceLlama(resolve_file(source, "tokenizer.model", where=where)).encode


# ----------------------------------------------------------------------------------------------------
# the reward
# ----------------------------------------------------------------------------------------------------
class DeQAScore(RewardModel):
    """DeQA-Score: E[level] under softmax over the five level-word logits, in [1, 5]; no prompt needed.

    Args:
        model: an `MplugOwl2`.
        input_ids: the tokenised fixed prompt with one -200 (see `tokenizer_image_token`).
        level_ids: vocabulary ids of excellent, good, fair, poor, bad.

    Example:
        >>> reward = create_reward("deqa-tiny")
        >>> reward(torch.rand(2, 3, 300, 500)).per_dim["quality"].shape
        torch.Size([2])
    """

    dimensions = ("quality",)
    default_dimension = "quality"
    is_differentiable = True
    requires_prompts = False
    score_range = (1.0, 5.0)

    def __init__(self, model: MplugOwl2, input_ids: Sequence[int], level_ids: Sequence[int] = LEVEL_IDS) -> None:
        super().__init__()
        ids = torch.as_tensor(list(input_ids), dtype=torch.long)
        if int((ids == IMAGE_TOKEN_INDEX).sum()) != 1:
            raise ValueError(f"input_ids must contain exactly one {IMAGE_TOKEN_INDEX}; got {ids.tolist()}.")
        vocab = model.config.text.vocab_size
        bad = [i for i in list(level_ids) + [i for i in ids.tolist() if i != IMAGE_TOKEN_INDEX] if not 0 <= i < vocab]
        if bad or len(level_ids) != len(LEVEL_WEIGHTS):
            raise ValueError(
                f"level_ids must be {len(LEVEL_WEIGHTS)} ids and all ids must lie in [0, {vocab}); got level_ids="
                f"{list(level_ids)}, out-of-range ids {bad}."
            )
        self.model = model
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("level_ids", torch.as_tensor(list(level_ids), dtype=torch.long), persistent=False)
        self.transform = ImageTransform(model.config.vision.image_size, "square", pad_fill=PAD_FILL)

    def gradient_checkpointing_enable(self) -> DeQAScore:
        """Recompute activations in backward: ~layer-boundary memory for reward-gradient training."""
        self.model.gradient_checkpointing_enable()
        return self

    def gradient_checkpointing_disable(self) -> DeQAScore:
        self.model.gradient_checkpointing_disable()
        return self

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> the model's normalised 448 px input."""
        return self.preprocess(images)

    def next_token_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits after the prompt, (B, vocab)."""
        return self.model(self.input_ids, self.pixel_values(images))

    def level_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 5) logits of excellent, good, fair, poor, bad."""
        return self.next_token_logits(images)[:, self.level_ids]

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        probs = torch.softmax(self.level_logits(images).float(), dim=-1)
        weights = torch.tensor(LEVEL_WEIGHTS, device=probs.device)
        return {"quality": probs @ weights}


# ----------------------------------------------------------------------------------------------------
# official checkpoint layout
# ----------------------------------------------------------------------------------------------------
def resolve_model_dir(source: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A local directory, or a hub repo id fetched with `snapshot_download` (honours HF_HUB_OFFLINE).

    Raises:
        FileNotFoundError: neither exists; the message says where to get the weights.
    """
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        raise ValueError(
            f"{what}= must be a model directory (config.json + weight shards) or a hub id; got the file {str(p)!r}."
        )
    if looks_like_repo_id(source):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"]))
        except Exception as e:  # offline, missing repo, auth ...
            raise FileNotFoundError(
                f"could not get {what} {source!r} from the hub ({type(e).__name__}). {WHERE} With no network, "
                "download it elsewhere and pass the local directory."
            ) from None
    raise FileNotFoundError(f"{what} directory not found: {str(source)!r}. {WHERE}")


def read_config(model_dir: Path) -> tuple[MplugOwl2Config, torch.dtype | None]:
    """The official config.json -> (`MplugOwl2Config`, its `torch_dtype` or None)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json (the official layout has one). {WHERE}")
    d = json.loads(path.read_text())
    dt = d.get("torch_dtype") or d.get("dtype")
    try:
        dtype = resolve_dtype(dt) if isinstance(dt, str) else None
    except ValueError:  # e.g. "auto": fall back to float32 / the caller's choice
        dtype = None
    return MplugOwl2Config.from_official(d), dtype


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of an official model dir, sharded (index json) or single, safetensors first."""
    model_dir = Path(model_dir)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} in {model_dir} lists shards that are absent: {missing}.")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    found = sorted(p.name for p in model_dir.iterdir())[:12]
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
        f"found {found}. {WHERE}"
    )


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        yield from load_state_dict(path).items()


def _is_derived(key: str) -> bool:
    return key.endswith(_DERIVED)


def _report(module_name: str, what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    if not (missing or unexpected or shapes):
        return

    def show(xs: list[str]) -> str:
        return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

    parts = [f"{n}: {show(x)}" for n, x in (("missing keys", missing), ("unexpected keys", unexpected),
                                            ("shape mismatches", shapes)) if x]
    raise ValueError(
        f"{what} does not match {module_name}: " + "; ".join(parts)
        + ". Is it an mPLUG-Owl2 / DeQA-Score checkpoint, and does its config.json describe it?"
    )


@torch.no_grad()
def _assign(model: MplugOwl2, tensors: Iterator[tuple[str, torch.Tensor]], what: str, partial: bool) -> set[str]:
    """Copy tensors into the model's parameters by official key; returns the keys set. Derived buffers
    (rotary inv_freq, abstractor sin-cos tables) are skipped because the model recomputes them."""
    own = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected, shapes = [], []
    for key, value in tensors:
        if _is_derived(key):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        own[key].copy_(value)
        seen.add(key)
    missing = [] if partial else sorted(set(own) - seen)
    _report(type(model).__name__, what, missing, sorted(unexpected), sorted(shapes))
    return seen


def _strip_peft(key: str) -> str:
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return key.replace(".base_layer.", ".")


def _pattern_value(name: str, patterns: dict, default):
    for pat, value in (patterns or {}).items():
        if name == pat or re.fullmatch(rf"(.*\.)?{pat}", name):
            return value
    return default


@torch.no_grad()
def merge_lora(model: MplugOwl2, adapter_dir: str | os.PathLike) -> list[str]:
    """Merge a peft LoRA adapter (adapter_config.json + adapter_model.*) into the model's weights:
    W <- W + (lora_alpha / r) * B @ A (alpha / sqrt(r) with rslora), computed in float32.

    Returns:
        The merged module names.

    Raises:
        ValueError: unsupported adapter kinds (DoRA), or modules the model does not have.
    """
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise ValueError(f"{adapter_dir} is a DoRA adapter (use_dora=true); only plain LoRA merges are supported.")
    files = [adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors/.bin.")
    sd = load_state_dict(files[0])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", _strip_peft(key))
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_" in key:
            raise ValueError(f"unsupported LoRA tensor {key!r} in {files[0].name} (only linear lora_A/lora_B merge).")
        else:  # biases trained with bias="all"/"lora_only"
            plain[_strip_peft(key)] = value
    params = dict(model.named_parameters())
    merged = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or f"{name}.weight" not in params:
            raise ValueError(
                f"LoRA module {name!r} in {files[0].name} is incomplete or not in the model (lora parts {sorted(ab)})."
            )
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        alpha = float(_pattern_value(name, cfg.get("alpha_pattern"), cfg.get("lora_alpha", r)))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        delta = (b @ a) * scale
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        w = params[f"{name}.weight"]
        w.copy_((w.float() + delta).to(w.dtype))
        merged.append(name)
    if plain:
        _assign(model, iter(plain.items()), f"{files[0].name} (non-LoRA tensors)", partial=True)
    return merged


def load_mplug_owl2(
    checkpoint: str | os.PathLike, *, base: str | os.PathLike | None = None, dtype: torch.dtype | None = None
) -> MplugOwl2:
    """Load an official mPLUG-Owl2 / DeQA-Score model directory (or hub id) into `MplugOwl2` on the CPU.

    The model is allocated once, directly in `dtype` (default: the config's `torch_dtype`, else float32),
    and filled shard by shard, so peak memory is the model plus one shard.
    A LoRA directory (with `adapter_config.json`) loads `base` first (default `MAGAer13/mplug-owl2-llama2-7b`),
    then `non_lora_trainables.bin` (the vision tower and abstractor DeQA trains fully), then merges the adapter.

    Raises:
        FileNotFoundError: a directory, config or weight file is missing (says where to get it).
        ValueError: keys or shapes do not match the config.

    Example:
        >>> model = load_mplug_owl2("checkpoints/DeQA-Score-Mix3", dtype=torch.float16)
    """
    ckpt_dir = resolve_model_dir(checkpoint, "checkpoint")
    is_lora = (ckpt_dir / "adapter_config.json").is_file()
    weights_dir = resolve_model_dir(base or DEFAULT_LORA_BASE, "base") if is_lora else ckpt_dir
    if base is not None and not is_lora:
        raise ValueError(f"base= is only for LoRA checkpoints (with adapter_config.json); {ckpt_dir} has none.")
    config_dir = ckpt_dir if (ckpt_dir / "config.json").is_file() else weights_dir
    config, config_dtype = read_config(config_dir)
    dtype = dtype or config_dtype or torch.float32
    model = build_mplug_owl2(config, "cpu", dtype, init="empty")

    def all_tensors():
        for f in weight_files(weights_dir):
            yield from _iter_tensors(f)

    _assign(model, all_tensors(), f"weights in {weights_dir}", partial=False)
    if is_lora:
        extra = ckpt_dir / "non_lora_trainables.bin"
        if extra.is_file():
            sd = {_strip_peft(k): v for k, v in load_state_dict(extra).items()}
            _assign(model, iter(sd.items()), str(extra), partial=True)
        merge_lora(model, ckpt_dir)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# tiny twin and official-format writer
# ----------------------------------------------------------------------------------------------------
TINY_INIT_STD = 0.2


def tiny_deqa_model(seed: int = 0) -> MplugOwl2:
    """A random tiny mPLUG-Owl2 (`tiny_mplug_owl2_config`) with real-vocabulary size, fp32, on the CPU."""
    return build_mplug_owl2(tiny_mplug_owl2_config(), "cpu", torch.float32, init="random", std=TINY_INIT_STD, seed=seed)


def official_state_dict(model: MplugOwl2) -> dict[str, torch.Tensor]:
    """The model's state dict as the official code saves it, including the abstractor's sin-cos buffers
    (persistent there)."""
    sd = dict(model.state_dict())
    for name, buf in model.named_buffers():
        if name.endswith(("q_pos_embed", "k_pos_embed")):
            sd[name] = buf.float()
    return sd


def write_official_deqa(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    model: MplugOwl2 | None = None,
    shards: int = 2,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float16,
    tokenizer_file: str | os.PathLike | None = None,
) -> Path:
    """Write a model (default: `tiny_deqa_model(seed)`) in the official DeQA-Score layout: config.json and
    `shards` weight files with their index json, fp16 like the published checkpoints.

    Args:
        fmt: "safetensors" (model-0000i-of-0000n.safetensors) or "bin" (pytorch_model-0000i-of-0000n.bin).
        tokenizer_file: a SentencePiece model copied in as tokenizer.model (as the hub repos ship one).

    Example:
        >>> d = write_official_deqa(tmp_path / "deqa")
        >>> reward = create_reward("deqa", checkpoint=str(d), backbone="llama2_tokenizer.model")
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin'; got {fmt!r}.")
    if shards < 1:
        raise ValueError(f"shards must be >= 1; got {shards}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else tiny_deqa_model(seed)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in official_state_dict(model).items()}
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(part, path / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    dtype_name = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(model.config.to_official(dtype_name), indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / "tokenizer.model")
    return path


# ----------------------------------------------------------------------------------------------------
# registrations
# ----------------------------------------------------------------------------------------------------
def _tokenizer_source(backbone, ckpt_dir: Path, base) -> str | os.PathLike:
    if backbone is not None:
        return backbone
    candidates = [ckpt_dir]
    if (ckpt_dir / "adapter_config.json").is_file():
        candidates.append(resolve_model_dir(base or DEFAULT_LORA_BASE, "base"))
    for d in candidates:
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    raise FileNotFoundError(
        f"no tokenizer.model in {', '.join(str(c) for c in candidates)}; pass backbone= the LLaMA-2 SentencePiece "
        f"file (or a dir holding it). {WHERE}"
    )


@register_reward("deqa", aliases=("deqa-score",))
def deqa(
    checkpoint: str = DEFAULT_CHECKPOINT,
    backbone: str | None = None,
    base: str | None = None,
    prompt: str = "scorer",
    load_dtype: str | torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> DeQAScore:
    """DeQA-Score (mPLUG-Owl2, ~8.2 B params) from an official model dir or hub id; pass dtype=torch.bfloat16.

    Args:
        checkpoint: DeQA-Score-Mix3 dir/hub id, or the LoRA variant's (then `base` is the mPLUG-Owl2 base).
        backbone: the LLaMA-2 tokenizer: a tokenizer.model file, a dir with one, or a hub id
            (default: the one inside `checkpoint`).
        prompt: "scorer" (src/evaluate/scorer.py, default), "iqa_eval" (src/evaluate/iqa_eval.py), or a
            custom prompt with one "<|image|>".
        load_dtype: dtype the weights are loaded in (default the checkpoint's, fp16); `create_reward(dtype=)`
            then casts, so pass `dtype=` there too or the model is promoted to float32 (33 GB).
        gradient_checkpointing: recompute activations in backward (for reward-gradient training).
    """
    text = resolve_prompt(prompt)
    ckpt_dir = resolve_model_dir(checkpoint, "checkpoint")
    encode = _encoder_from(_tokenizer_source(backbone, ckpt_dir, base))
    levels = level_token_ids(encode)
    if levels != list(LEVEL_IDS):
        raise ValueError(
            f"the tokenizer maps {list(LEVEL_WORDS)} to {levels}, not DeQA-Score's {list(LEVEL_IDS)}; backbone= must "
            f"be the LLaMA-2 SentencePiece tokenizer. {WHERE}"
        )
    model = load_mplug_owl2(ckpt_dir, base=base, dtype=resolve_dtype(load_dtype) if load_dtype else None)
    reward = DeQAScore(model, tokenizer_image_token(text, encode), levels)
    return reward.gradient_checkpointing_enable() if gradient_checkpointing else reward


@register_reward("deqa-tiny", tiny=True)
def deqa_tiny(
    seed: int = 0, prompt: str = "scorer", tokenizer: str | None = None, gradient_checkpointing: bool = False
) -> DeQAScore:
    """A random tiny DeQA-Score (real preprocessing, prompt layout and level ids; tiny mPLUG-Owl2).

    The prompt is encoded with LLaMA-2's byte-fallback pieces unless `tokenizer=` names the real tokenizer.model.
    """
    encode = _encoder_from(tokenizer) if tokenizer is not None else byte_fallback_encode
    reward = DeQAScore(tiny_deqa_model(seed), tokenizer_image_token(resolve_prompt(prompt), encode), LEVEL_IDS)
    return reward.gradient_checkpointing_enable() if gradient_checkpointing else reward
