"""Safe checkpoint loading and key conversions.

Nothing here executes pickled code: `.safetensors` files are read with safetensors, other files with
`torch.load(weights_only=True)`. Whole pickled modules (the MPS checkpoint) go through the restricted
unpickler in `reward_plugins.unpickle`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

REDOWNLOAD = "Download or export it again (a state dict saved as .safetensors, or with torch.save(model.state_dict()))."


class CheckpointError(ValueError):
    """The file is not a readable checkpoint: truncated, corrupt, or not a torch/safetensors file at all."""


class PickledObjectError(ValueError):
    """The file pickles Python objects (e.g. a whole module), which safe loading refuses to rebuild."""


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def invalid_checkpoint(path: str | os.PathLike, e: BaseException | str) -> CheckpointError:
    """The one-line error for a file that cannot be read as a checkpoint (names the file and the fix)."""
    reason = e if isinstance(e, str) else _first_line(e)
    return CheckpointError(f"{path} is not a valid checkpoint ({reason}): it is truncated, corrupt or not a "
                           f"checkpoint file. {REDOWNLOAD}")


def _weights_only_reason(e: BaseException) -> tuple[str | None, str]:
    """(the refused global, or None for garbage; a short reason) from torch's weights-only error, whose own
    text advises weights_only=False, which this library never repeats."""
    text = str(e)
    m = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", text)
    if m:
        return m.group(1), f"it pickles {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return None, (m.group(1).strip()[:160] if m else type(e).__name__)


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """`safetensors.torch.load_file` on the CPU, with a truncated or corrupt file named in a `CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a valid .safetensors file ({_first_line(e)}): it is truncated or corrupt. {REDOWNLOAD}"
        ) from None


def looks_like_repo_id(source) -> bool:
    """'owner/name' strings that are not local paths: candidates for a hub download."""
    s = str(source)
    return isinstance(source, str) and s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def resolve_file(path_or_id: str | os.PathLike, filename: str | None = None, *, where: str = "") -> Path:
    """A local file, or `filename` inside a local dir, or `filename` from a hub repo id.

    Hub ids go through `huggingface_hub.hf_hub_download`, which honours `HF_HUB_OFFLINE` and the cache.

    Raises:
        FileNotFoundError: naming what was looked for and `where` to get it.
    """
    p = Path(path_or_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename and (p / filename).is_file():
            return p / filename
        raise FileNotFoundError(
            f"{p} is a directory without {filename or 'the expected checkpoint file'}. {where}".strip()
        )
    if filename is not None and looks_like_repo_id(path_or_id):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(str(path_or_id), filename))
        except Exception as e:  # offline, missing repo, auth ...
            raise FileNotFoundError(
                f"could not get {filename!r} from hub repo {path_or_id!r} ({type(e).__name__}: {e}). {where} "
                "With no network, download it elsewhere and pass the local path."
            ) from None
    raise FileNotFoundError(f"checkpoint file not found: {str(path_or_id)!r}. {where}".strip())


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> StateDict:
    """Read a state dict from `.safetensors`, or a torch file with `weights_only=True` on the CPU.

    Args:
        path: the file.
        key: a nested entry to return (e.g. open_clip checkpoints keep weights under ``"state_dict"``);
            when None and the file holds a dict with exactly a ``state_dict``/``model`` entry, it is used.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: (a ValueError) the file is truncated, corrupt or not a checkpoint.
        PickledObjectError: (a ValueError) the file pickles Python objects (for example a whole module).
        ValueError: the file holds something other than a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused, reason = _weights_only_reason(e)
        if refused is None:
            raise invalid_checkpoint(path, f"unpickling failed: {reason}") from None
        raise PickledObjectError(
            f"{path} is not a plain state dict: {reason}, and rebuilding pickled objects could run code, which "
            "is refused. If it is a whole pickled module, use the reward's loader that understands it (e.g. "
            "MPS's), or re-save it as a state dict (torch.save(model.state_dict()) or .safetensors)."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as e:
        # A truncated zip ("failed finding central directory"), an empty file, a legacy header cut short ...
        raise invalid_checkpoint(path, e) from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path} has no {key!r} entry; found {found}.")
        obj = obj[key]
    elif isinstance(obj, Mapping):
        for k in ("state_dict", "model"):
            if k in obj and isinstance(obj[k], Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__}).")
    return dict(obj)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Drop `prefix` from keys that have it (e.g. ``module.`` from DDP checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def drop_position_ids(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove the legacy persistent `position_ids` buffers of transformers < 4.31 state dicts."""
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def _split_resblock(prefix_in: str, prefix_out: str, sd: Mapping[str, torch.Tensor], out: StateDict) -> None:
    i = 0
    while f"{prefix_in}.{i}.ln_1.weight" in sd:
        src, dst = f"{prefix_in}.{i}", f"{prefix_out}.{i}"
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            out[f"{dst}.{b}.weight"] = sd[f"{src}.{a}.weight"]
            out[f"{dst}.{b}.bias"] = sd[f"{src}.{a}.bias"]
        for name, w in zip("qkv", sd[f"{src}.attn.in_proj_weight"].chunk(3, dim=0)):
            out[f"{dst}.self_attn.{name}_proj.weight"] = w
        for name, b in zip("qkv", sd[f"{src}.attn.in_proj_bias"].chunk(3, dim=0)):
            out[f"{dst}.self_attn.{name}_proj.bias"] = b
        i += 1


def openclip_to_hf_clip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert an open_clip `CLIP` state dict (OpenAI naming) to transformers' `CLIPModel` keys.

    The fused `in_proj` attention weights split into q/k/v; `visual.proj` and `text_projection` are
    stored as (in, out) matrices in open_clip and transposed into Linear weights.

    Raises:
        ValueError: the dict is not an open_clip CLIP with a transformer vision tower.
    """
    sd = strip_prefix(sd, "module.")
    required = ["visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection", "ln_final.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(
            f"not an open_clip CLIP state dict: missing {missing} (found keys like {list(sd)[:5]}). "
            "HPS checkpoints keep the weights under 'state_dict'."
        )
    out: StateDict = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
    }
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"].reshape(())
    _split_resblock("visual.transformer.resblocks", "vision_model.encoder.layers", sd, out)
    _split_resblock("transformer.resblocks", "text_model.encoder.layers", sd, out)
    return out


def hf_clip_to_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of `openclip_to_hf_clip` (used to write official-format test checkpoints)."""
    out: StateDict = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for src_root, dst_root in (("vision_model.encoder.layers", "visual.transformer.resblocks"),
                               ("text_model.encoder.layers", "transformer.resblocks")):
        i = 0
        while f"{src_root}.{i}.layer_norm1.weight" in sd:
            s, d = f"{src_root}.{i}", f"{dst_root}.{i}"
            for b, a in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                out[f"{d}.{b}.weight"] = sd[f"{s}.{a}.weight"]
                out[f"{d}.{b}.bias"] = sd[f"{s}.{a}.bias"]
            out[f"{d}.attn.in_proj_weight"] = torch.cat([sd[f"{s}.self_attn.{n}_proj.weight"] for n in "qkv"])
            out[f"{d}.attn.in_proj_bias"] = torch.cat([sd[f"{s}.self_attn.{n}_proj.bias"] for n in "qkv"])
            i += 1
    return out


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Strictly load `sd` into `module`, with an error that lists missing, unexpected and mis-shaped keys.

    Non-persistent buffers are not expected in `sd`. Tensors are cast to the module's dtypes.

    Raises:
        ValueError: the checkpoint belongs to another model or another size of this one.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:

        def show(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        raise ValueError(
            f"{what} does not match {type(module).__name__}: " + "; ".join(parts)
            + ". Is it a checkpoint of another model, or of another size (check backbone=)?"
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
