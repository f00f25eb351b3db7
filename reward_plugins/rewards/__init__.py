"""One module per reward; importing this package registers them all."""

from . import aesthetic, clipscore, deqa, hpsv2, imagereward, lescore, mllm_judge, mps, pickscore, remote, toyworld  # noqa: F401
