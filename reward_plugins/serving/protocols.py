"""The three request/answer protocols of the reward server, decoded into tensors and checked.

1. **pickle** (flow_grpo and the frameworks that copied its clients): a pickled dict
   ``{"images": [JPEG/PNG bytes, ...], "prompts": [...] or a NumPy str array}``, decoded by the
   restricted unpickler of `safe_pickle` (nothing in the body is ever executed). Extra keys
   (``meta_datas``, ``only_strict`` ...) are ignored. Answer: a pickled dict of plain lists.
2. **json**: ``{"images": ["<base64 PNG/JPEG>" or "data:image/png;base64,...", ...], "prompts": [...]}``.
3. **safetensors**: a tensor ``images`` (B, 3, H, W), uint8 (0..255) or float16/bfloat16/float32 in
   [0, 1], no JPEG round trip; prompts as a JSON list in the header metadata key ``prompts``.
   Answer: safetensors with float32 ``scores`` and ``per_dim.<dimension>`` tensors.

Every answer carries ``scores`` (the served selection), ``outputs`` (the same list, the key
flow_grpo's DeQA/UnifiedReward clients read), ``per_dim`` and ``dimensions``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batcher import Scores
from .limits import ServeLimits
from .safe_pickle import RefusedGlobalError, loads_plain

PICKLE_TYPE = "application/python-pickle"
JSON_TYPE = "application/json"
SAFETENSORS_TYPE = "application/x-safetensors"
PROTOCOLS = ("pickle", "json", "safetensors")

_CONTENT_TYPES = {
    PICKLE_TYPE: "pickle", "application/x-pickle": "pickle", "application/pickle": "pickle",
    JSON_TYPE: "json",
    SAFETENSORS_TYPE: "safetensors", "application/safetensors": "safetensors",
}
# Bodies sent without a meaningful type (requests' `data=bytes` sends none, curl --data-binary sends
# form-urlencoded) are recognised by their first bytes.
_SNIFFED_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

EXPECTED = (
    "POST a pickled dict {'images': [JPEG/PNG bytes], 'prompts': [str]} (flow_grpo protocol), JSON "
    "{'images': [base64 PNG/JPEG], 'prompts': [str]} with Content-Type application/json, or safetensors "
    "with an 'images' tensor (B, 3, H, W) uint8 or float in [0, 1] and metadata 'prompts' (a JSON list) "
    "with Content-Type application/x-safetensors"
)


class RequestError(Exception):
    """A client error: `status` (4xx) and a message saying what was wrong and what is expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class DecodedRequest:
    """A checked request: images (3, H, W) float32 in [0, 1], prompts (None when absent)."""

    images: list[torch.Tensor]
    prompts: list[str] | None
    protocol: str


def detect_protocol(content_type: str | None, body: bytes) -> str:
    """Which protocol a body speaks, from its Content-Type or (when that says nothing) its first bytes."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in _CONTENT_TYPES:
        return _CONTENT_TYPES[ct]
    if ct not in _SNIFFED_TYPES:
        raise RequestError(415, f"unsupported Content-Type {content_type!r}. Expected: {EXPECTED}.")
    if body[:1] == b"\x80":  # pickle protocol >= 2 starts with the PROTO opcode
        return "pickle"
    if body.lstrip()[:1] == b"{":
        return "json"
    if len(body) >= 9 and body[8:9] == b"{" and struct.unpack("<Q", body[:8])[0] <= len(body) - 8:
        return "safetensors"
    raise RequestError(
        400,
        f"cannot tell which protocol this {len(body)}-byte body speaks (Content-Type {content_type!r}, first bytes "
        f"{body[:8]!r}). Expected: {EXPECTED}.",
    )


def decode_request(body: bytes, content_type: str | None, limits: ServeLimits) -> DecodedRequest:
    """Decode and check a request body.

    Raises:
        RequestError: 400 for malformed bodies, undecodable images or bad prompts; 413 for too many or
            too large images; 415 for an unknown Content-Type.
    """
    if not body:
        raise RequestError(400, f"the request body is empty. Expected: {EXPECTED}.")
    protocol = detect_protocol(content_type, body)
    if protocol == "pickle":
        images, prompts = _decode_pickle(body, limits)
    elif protocol == "json":
        images, prompts = _decode_json(body, limits)
    else:
        images, prompts = _decode_safetensors(body, limits)
    if prompts is not None and len(prompts) != len(images):
        raise RequestError(
            400, f"got {len(prompts)} prompts for {len(images)} images; send exactly one prompt per image."
        )
    return DecodedRequest(images, prompts, protocol)


def _check_count(n: int, limits: ServeLimits) -> None:
    if n == 0:
        raise RequestError(400, "'images' is empty; send at least one image.")
    if n > limits.max_images_per_request:
        raise RequestError(
            413, f"{n} images in one request; this server takes at most {limits.max_images_per_request} per request. "
            "Split the batch into several requests."
        )


def _check_size(h: int, w: int, where: str, limits: ServeLimits) -> None:
    if h < 1 or w < 1:
        raise RequestError(400, f"{where} is empty ({h}x{w} pixels).")
    if max(h, w) > limits.max_image_side or h * w > limits.max_image_pixels:
        raise RequestError(
            413, f"{where} is {w}x{h} pixels; the limit is {limits.max_image_side} pixels a side and "
            f"{limits.max_image_pixels} pixels in all."
        )


def _decode_image_bytes(data: bytes, where: str, limits: ServeLimits) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _IMAGE_FORMATS:
                raise RequestError(400, f"{where} is a {im.format} image; send JPEG, PNG or WebP.")
            # The header gives the size before any pixel is decoded: stop decompression bombs here.
            _check_size(im.height, im.width, where, limits)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = "not an image file" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise RequestError(
            400, f"{where} ({len(data)} bytes, starting {bytes(data[:8])!r}) is not a decodable JPEG/PNG/WebP image "
            f"({why})."
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _array_image(arr: np.ndarray, where: str, limits: ServeLimits) -> torch.Tensor:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise RequestError(
            400, f"{where} is a NumPy array of dtype {arr.dtype} and shape {arr.shape}; an array image must be "
            "uint8 (H, W, 3), or send JPEG/PNG bytes."
        )
    _check_size(arr.shape[0], arr.shape[1], where, limits)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def _prompts_from(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "US":
            raise RequestError(
                400, f"'prompts' is a NumPy array of dtype {value.dtype} and shape {value.shape}; expected a 1-d "
                "array of strings or a list of str."
            )
        value = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in value.tolist()]
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RequestError(400, f"'prompts' must be a list of str, one per image; got {type(value).__name__}.")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise RequestError(400, f"prompts[{i}] must be a str; got {type(p).__name__}.")
    return list(value)


def _decode_pickle(body: bytes, limits: ServeLimits) -> tuple[list[torch.Tensor], list[str] | None]:
    try:
        data = loads_plain(body)
    except RefusedGlobalError as e:
        raise RequestError(400, f"refused pickle: {e}") from None
    except pickle.UnpicklingError as e:
        raise RequestError(400, f"malformed pickle body: {e} Expected: {EXPECTED}.") from None
    if not isinstance(data, dict) or "images" not in data:
        got = f"a dict with keys {sorted(map(str, data))}" if isinstance(data, dict) else type(data).__name__
        raise RequestError(400, f"the pickle holds {got}; expected a dict with 'images' (and 'prompts').")
    prompts = _prompts_from(data.get("prompts"))
    images = data["images"]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        images = list(images)  # a (B, H, W, 3) uint8 batch
    elif isinstance(images, np.ndarray) and images.dtype.kind == "S" and images.ndim == 1:
        images = images.tolist()
    if not isinstance(images, (list, tuple)):
        raise RequestError(400, f"'images' must be a list of JPEG/PNG bytes; got {type(images).__name__}.")
    _check_count(len(images), limits)
    out = []
    for i, im in enumerate(images):
        if isinstance(im, (bytes, bytearray)):
            out.append(_decode_image_bytes(bytes(im), f"images[{i}]", limits))
        elif isinstance(im, np.ndarray):
            out.append(_array_image(im, f"images[{i}]", limits))
        else:
            raise RequestError(400, f"images[{i}] is {type(im).__name__}; expected JPEG/PNG bytes.")
    return out, prompts


def _decode_json(body: bytes, limits: ServeLimits) -> tuple[list[torch.Tensor], list[str] | None]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(400, f"malformed JSON body: {e}. Expected: {EXPECTED}.") from None
    if not isinstance(data, dict) or "images" not in data:
        raise RequestError(400, "the JSON body must be an object with 'images' (a list of base64 PNG/JPEG strings) "
                                "and 'prompts' (a list of str).")
    prompts = _prompts_from(data.get("prompts"))
    images = data["images"]
    if not isinstance(images, list):
        raise RequestError(400, f"'images' must be a list of base64 strings; got {type(images).__name__}.")
    _check_count(len(images), limits)
    out = []
    for i, s in enumerate(images):
        if not isinstance(s, str):
            raise RequestError(400, f"images[{i}] is {type(s).__name__}; expected a base64 PNG/JPEG string.")
        if s.startswith("data:"):
            s = s.partition(",")[2]
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"images[{i}] is not valid base64 ({e}); expected a base64 PNG/JPEG string.") from None
        out.append(_decode_image_bytes(raw, f"images[{i}]", limits))
    return out, prompts


def _decode_safetensors(body: bytes, limits: ServeLimits) -> tuple[list[torch.Tensor], list[str] | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    header_len = struct.unpack("<Q", body[:8])[0] if len(body) >= 8 else -1
    if header_len < 2 or header_len > len(body) - 8:
        raise RequestError(400, f"malformed safetensors body: header length {header_len} for {len(body)} bytes.")
    try:
        header = json.loads(body[8 : 8 + header_len])
        tensors = load(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, SafetensorError, ValueError) as e:
        raise RequestError(400, f"malformed safetensors body: {e}. Expected: {EXPECTED}.") from None
    if "images" not in tensors:
        raise RequestError(400, f"the safetensors body has tensors {sorted(tensors)}; expected one named 'images'.")
    x = tensors["images"]
    if x.ndim != 4 or x.shape[1] != 3:
        raise RequestError(400, f"'images' has shape {tuple(x.shape)}; expected (B, 3, H, W) RGB, channels first.")
    _check_count(x.shape[0], limits)
    _check_size(x.shape[2], x.shape[3], "each image", limits)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.dtype in _FLOAT_DTYPES:
        x = x.float()
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise RequestError(400, "'images' contains NaN or inf values.")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise RequestError(400, f"float 'images' must lie in [0, 1]; got min {float(lo):.4g}, max {float(hi):.4g}.")
        x = x.clamp_(0, 1)
    else:
        raise RequestError(400, f"'images' has dtype {x.dtype}; expected uint8 (0..255) or float16/bfloat16/float32 in [0, 1].")
    meta = header.get("__metadata__") or {}
    prompts = None
    if "prompts" in meta:
        try:
            prompts = json.loads(meta["prompts"])
        except json.JSONDecodeError as e:
            raise RequestError(400, f"metadata 'prompts' is not a JSON list of str: {e}.") from None
    return list(x.unbind(0)), _prompts_from(prompts)


# -- answers ---------------------------------------------------------------------------------------
def answer_dict(out: Scores, dimensions: Sequence[str], reward: str) -> dict[str, Any]:
    return {
        "scores": list(out.scores),
        "outputs": list(out.scores),
        "per_dim": {k: list(out.per_dim[k]) for k in dimensions if k in out.per_dim},
        "dimensions": list(dimensions),
        "reward": reward,
    }


def encode_answer(protocol: str, out: Scores, dimensions: Sequence[str], reward: str) -> tuple[bytes, str]:
    """The answer body and its media type, in the protocol the request spoke."""
    if protocol == "safetensors":
        from safetensors.torch import save

        tensors = {"scores": torch.tensor(out.scores, dtype=torch.float32)}
        tensors.update({f"per_dim.{k}": torch.tensor(out.per_dim[k], dtype=torch.float32)
                        for k in dimensions if k in out.per_dim})
        return save(tensors, metadata={"dimensions": json.dumps(list(dimensions)), "reward": reward}), SAFETENSORS_TYPE
    body = answer_dict(out, dimensions, reward)
    if protocol == "pickle":
        # Plain lists, dicts and str only: any unpickler, restricted or not, reads it.
        return pickle.dumps(body, protocol=4), PICKLE_TYPE
    return json.dumps(body).encode(), JSON_TYPE


def decode_answer(protocol: str, body: bytes) -> dict[str, Any]:
    """Client side: an answer body -> ``{"scores": [...], "per_dim": {dim: [...]}, "dimensions": [...]}``."""
    if protocol == "safetensors":
        from safetensors.torch import load

        header = json.loads(body[8 : 8 + struct.unpack("<Q", body[:8])[0]])
        meta = header.get("__metadata__") or {}
        tensors = load(body)
        dims = json.loads(meta.get("dimensions", "[]"))
        return {
            "scores": tensors["scores"].tolist(),
            "per_dim": {d: tensors[f"per_dim.{d}"].tolist() for d in dims},
            "dimensions": dims,
            "reward": meta.get("reward"),
        }
    if protocol == "pickle":
        # Answers are decoded with the same restricted unpickler: a client trusts its server no more.
        return loads_plain(body)
    return json.loads(body)
