"""The reward server's limits: batching, queueing, request and image sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServeLimits:
    """What the server accepts and how it batches.

    Attributes:
        max_batch_size: most images scored in one forward pass (requests are merged up to this).
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_queue_images: images waiting to be scored beyond which new requests get 503 + Retry-After.
        max_request_bytes: largest request body (413 beyond it).
        max_images_per_request: most images in one request (413 beyond it; clients split larger batches).
        max_image_side: largest height or width of one image, in pixels.
        max_image_pixels: largest height x width of one image (decompression bombs stop here).
        retry_after_s: the Retry-After a 503 announces.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue_images: int = 1024
    max_request_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 256
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_images", "max_request_bytes", "max_images_per_request",
                     "max_image_side", "max_image_pixels", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if not (self.max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be >= 0; got {self.max_wait_ms!r}.")
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be at least max_images_per_request "
                f"({self.max_images_per_request}), or a full-size request could never be queued."
            )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
