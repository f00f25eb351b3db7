"""The toy world: a palette of named colours, three shapes, five positions, one caption grammar.

A scene is one filled shape of one colour at one position on a plain white background; its caption is
``"a {colour} {shape} {position phrase}"``, e.g. ``"a red circle on the left"``. Every attribute of every
rendered scene is known, so rewards measured from pixels can be checked exactly.

The 6 x 3 x 5 = 90 attribute combinations are split once, deterministically: 18 combinations (one in
five, chosen so that every colour, shape and position still occurs in training) never appear in any
training caption. `train_prompts()` and `heldout_prompts()` are the two caption sets; `HELDOUT_SEEDS`
are the sampling seeds the efficacy benchmark evaluates on (training and mining use other seeds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

RESOLUTION = 32

# Saturated colours far apart in RGB (nearest other palette entry >= 0.66 away) and a white background.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.75, 0.10, 0.85),
    "cyan": (0.10, 0.80, 0.85),
}
BACKGROUND: tuple[float, float, float] = (0.96, 0.96, 0.96)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Position name -> (x, y) anchor of the shape's area centroid, as fractions of width and height (y down).
# 0.28 rather than 0.25 so that a triangle's apex (2/3 of its height above the centroid) stays inside.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
DIMENSIONS: tuple[str, ...] = ("color", "shape", "position")

# Sampling seeds reserved for evaluation (training, mining and method sampling use seeds below 1e6).
# Evaluation draws EVAL_IMAGES_PER_PROMPT images per held-out prompt; with `alignment.best_of_n`'s seeding
# image j of prompt i gets seed EVAL_SEED + i * EVAL_IMAGES_PER_PROMPT + j.
EVAL_SEED = 1_000_000
EVAL_IMAGES_PER_PROMPT = 8
# Best-of-N candidates for the held-out evaluation are drawn from their own seed block.
BEST_OF_N_SEED = 2_000_000
HELDOUT_SEEDS: tuple[int, ...] = tuple(range(EVAL_SEED, EVAL_SEED + 18 * EVAL_IMAGES_PER_PROMPT))


@dataclass(frozen=True)
class Attributes:
    """What a caption asks for (or what a scene shows): colour, shape and position names."""

    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        for dim, value, allowed in (("color", self.color, COLORS), ("shape", self.shape, SHAPES),
                                    ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {dim} {value!r}; the toy world has {list(allowed)}.")

    def get(self, dim: str) -> str:
        return getattr(self, dim)

    def replace(self, **changes: str) -> Attributes:
        return Attributes(**{**self.__dict__, **changes})


def caption(attrs: Attributes) -> str:
    """The grammar: ``"a {colour} {shape} {position phrase}"``."""
    return f"a {attrs.color} {attrs.shape} {POSITION_PHRASES[attrs.position]}"


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<color>[a-z]+)\s+(?P<shape>[a-z]+)\s+(?P<phrase>(?:on|at|in)\s+the\s+[a-z]+)\s*\.?\s*$"
)


def parse_caption(text: str) -> Attributes:
    """Inverse of `caption` (case and extra spaces ignored).

    Raises:
        TypeError: `text` is not a str.
        ValueError: `text` is not a toy-world caption; the message shows the grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str; got {type(text).__name__}.")
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None or m["color"] not in COLORS or m["shape"] not in SHAPES or m["phrase"] not in _PHRASE_TO_POSITION:
        raise ValueError(
            f"{text!r} is not a toy-world caption. Expected 'a <colour> <shape> <position>', e.g. "
            f"'a red circle on the left', with colour in {list(COLORS)}, shape in {list(SHAPES)} and position "
            f"in {list(POSITION_PHRASES.values())}."
        )
    return Attributes(m["color"], m["shape"], _PHRASE_TO_POSITION[m["phrase"]])


def all_combinations() -> list[Attributes]:
    """All 90 attribute combinations in a fixed order (colour, then shape, then position)."""
    return [Attributes(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


@lru_cache(maxsize=1)
def _heldout_set() -> frozenset[Attributes]:
    # A fixed Latin-style pattern: combination (ci, si, pi) is held out when (ci + 2*si + pi) % 5 == 0.
    # That is 18 of 90, each colour 3 times, each shape 6 times, each position 3-4 times: every single
    # attribute value and every pair of values is still seen in training, only these triples are not.
    colors, positions = list(COLORS), list(POSITIONS)
    return frozenset(
        a for a in all_combinations()
        if (colors.index(a.color) + 2 * SHAPES.index(a.shape) + positions.index(a.position)) % 5 == 0
    )


def is_heldout(attrs: Attributes) -> bool:
    """True for the 18 combinations that never appear in a training caption."""
    return attrs in _heldout_set()


def train_combinations() -> list[Attributes]:
    return [a for a in all_combinations() if not is_heldout(a)]


def heldout_combinations() -> list[Attributes]:
    return [a for a in all_combinations() if is_heldout(a)]


def train_prompts() -> list[str]:
    """The 72 captions of training combinations (what models and methods are trained on)."""
    return [caption(a) for a in train_combinations()]


def heldout_prompts() -> list[str]:
    """The 18 captions of held-out combinations (what the efficacy benchmark evaluates on)."""
    return [caption(a) for a in heldout_combinations()]


def vocabulary() -> list[str]:
    """Every word the grammar uses (the tokenizers give each one a single token)."""
    words = {"a", "an", *COLORS, *SHAPES}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
