"""Differentiable image preprocessing in torch, matching the official PIL/HF processors.

Resizes use PyTorch's antialiased bicubic kernel, which is Pillow's (cubic a = -0.5, support scaled
with the downsampling factor); the result is clamped to [0, 1] as PIL's uint8 output is. The remaining
difference from the PIL path is PIL's uint8 rounding (<= 0.5/255 per pixel) and its fixed-point maths;
`tests/test_preprocess_parity.py` measures it per reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Resize (B, C, H, W) to `size` = (h, w) with Pillow's antialiased bicubic kernel."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # The AA kernels have no bf16/fp16 CPU implementation everywhere; compute in fp32 and cast back.
    out = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    if clamp:
        out = out.clamp(0, 1)
    return out.to(images.dtype)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """HF `shortest_edge` rule: short side -> size, long side -> int(size * long / short) (floor)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    return resize_bicubic(images, shortest_side_size(h, w, size))


def center_crop(images: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """Centre crop; zero-pads an image that is smaller.

    Args:
        rounding: "floor" is HF processors' `top = (H - size) // 2`; "round" is torchvision's `CenterCrop`
            (`round((H - size) / 2)`, Python rounding), used by OpenAI-CLIP and BLIP pipelines. They differ
            by one pixel when the margin is 3 mod 4.
    """
    if rounding not in ("floor", "round"):
        raise ValueError(f"rounding must be 'floor' (HF) or 'round' (torchvision); got {rounding!r}.")
    h, w = images.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def letterbox(images: torch.Tensor, size: int, fill: float | tuple[float, float, float] = 0.0) -> torch.Tensor:
    """open_clip `ResizeMaxSize`: longest side -> size (rounded), then centred padding with `fill`.

    HPS v2 pads with zeros (black, before normalisation). Like open_clip (torchvision tensor resize on a
    float tensor, antialiased from torchvision 0.17), the resized values are not clamped.
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        images = resize_bicubic(images, (round(h * scale), round(w * scale)), clamp=False)
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if isinstance(fill, (int, float)):
        return F.pad(images, pads, value=float(fill))
    canvas = images.new_tensor(fill).view(1, 3, 1, 1).expand(images.shape[0], 3, size, size).clone()
    canvas[..., pads[2] : pads[2] + h, pads[0] : pads[0] + w] = images
    return canvas


def pad_to_square(images: torch.Tensor, fill: tuple[float, float, float]) -> torch.Tensor:
    """Pad the shorter side to a square with a colour, image centred at offset (max - min) // 2."""
    h, w = images.shape[-2:]
    side = max(h, w)
    canvas = images.new_tensor(fill).view(1, 3, 1, 1).expand(images.shape[0], 3, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    canvas[..., top : top + h, left : left + w] = images
    return canvas


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """The official processor of a reward, as a differentiable function of [0, 1] image tensors.

    Attributes:
        size: output side length.
        mode: "crop" (shortest side -> size, centre crop; CLIPImageProcessor, BLIP),
              "letterbox" (longest side -> size, zero pad; HPS), or
              "square" (pad to square with `pad_fill`, then resize; DeQA/mPLUG-Owl2).
        mean, std: normalisation constants.
        pad_fill: RGB fill in [0, 1] for "square" mode.
        crop_rounding: "floor" (HF processors) or "round" (torchvision CenterCrop); see `center_crop`.
    """

    size: int = 224
    mode: str = "crop"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)
    crop_rounding: str = "floor"

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "letterbox", "square"):
            raise ValueError(f"mode must be 'crop', 'letterbox' or 'square'; got {self.mode!r}.")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # bf16/fp16 inputs are resized in float32 and returned in their dtype: half-precision resampling
        # rounds every interpolation sum to 8/11 bits and is several times slower on CPU.
        dtype = images.dtype
        if dtype in (torch.float16, torch.bfloat16):
            images = images.float()
        if self.mode == "crop":
            x = center_crop(resize_shortest_side(images, self.size), self.size, self.crop_rounding)
        elif self.mode == "letterbox":
            x = letterbox(images, self.size)
        else:
            x = resize_bicubic(pad_to_square(images, self.pad_fill), (self.size, self.size))
        return normalize(x, self.mean, self.std).to(dtype)


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float32 in [0, 1] (RGB)."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image (rounded to uint8)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def load_images(paths, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Read image files as (3, H, W) tensors in [0, 1]; a clear error names an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(pil_to_tensor(im if size is None else im.resize(size[::-1], Image.BICUBIC)))
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {p}") from None
        except UnidentifiedImageError:
            raise ValueError(f"cannot read {p} as an image (not a PNG/JPEG/WebP/... file?).") from None
    return out
