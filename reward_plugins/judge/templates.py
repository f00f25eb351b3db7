"""The eight LePref annotation template types, as data.

LePref (RL2065/LePref, `annoutils.py`) asks a multimodal LLM to do eight tasks. Three read a text-to-image
prompt (`prompt_*`), two caption one image (`captioning_*`), and three rate a prompt's images on one
dimension each, on a 0-100 scale, all of a prompt's images in one request (`annotation_*`). Every answer is
a JSON object whose keys are fixed by the task (see `ANSWER_KEYS`).

The wording below is ours: same tasks, scales and answer formats as LePref, different text. To reproduce
the official annotation exactly, load the official wording from a copy of LePref's file with
``load_templates("path/to/annoutils.py", faithful=True)`` (read with `ast`, never executed; see
`reward_plugins.judge.official`).

Example:
    >>> t = load_templates()["annotation_aesthetic"]
    >>> t.kind, t.dimension, t.answer_key
    ('annotation', 'aesthetic', 'aesthetic')
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_TYPES: tuple[str, ...] = (
    "prompt_processing",
    "prompt_NSFW_filtering",
    "prompt_classification",
    "captioning_coco_image",
    "captioning_aes_image",
    "annotation_alignment",
    "annotation_aesthetic",
    "annotation_fidelity",
)
DIMENSIONS: tuple[str, ...] = ("alignment", "aesthetic", "fidelity")
# The five prompt categories of LePref's classification task (exact names: they are the answer values).
CATEGORIES: tuple[str, ...] = ("Abstract & Artistic", "Animals & Plants", "Characters", "Objects & Food", "Scenes")
# The JSON keys each task answers with (facts of the format; the parser reads these).
ANSWER_KEYS: dict[str, tuple[str, ...]] = {
    "prompt_processing": ("image_content", "magic_words", "artistic_style", "visual_properties"),
    "prompt_NSFW_filtering": ("NSFW Detected",),
    "prompt_classification": ("category",),
    "captioning_coco_image": ("prompt",),
    "captioning_aes_image": ("image_content", "artistic_style", "visual_properties"),
    # annotation_*: {"image_1": {<key>: score}, "image_2": {...}, ...}
}
# The rating bands of the 0-100 scale, shared by the three annotation types.
SCALE_BANDS: tuple[tuple[int, int], ...] = ((90, 100), (70, 89), (50, 69), (30, 49), (0, 29))
SCORE_RANGE: tuple[float, float] = (0.0, 100.0)
# Our templates mark where the number of images goes with this placeholder; `Template.system_text` fills it.
NUM_PLACEHOLDER = "{num_images}"


def template_kind(template_type: str) -> str:
    """'prompt' (text only), 'image' (one image, no prompt) or 'annotation' (a prompt and its images)."""
    if template_type.startswith("prompt_"):
        return "prompt"
    if template_type.startswith("captioning_"):
        return "image"
    if template_type.startswith("annotation_"):
        return "annotation"
    raise ValueError(f"template type {template_type!r} has no known kind (prompt_*, captioning_*, annotation_*).")


def check_template_type(template_type: str) -> str:
    """Return `template_type` if it is one of the eight; otherwise raise with the closest names.

    Raises:
        ValueError: unknown type (with a did-you-mean hint).
    """
    if template_type in TEMPLATE_TYPES:
        return template_type
    close = difflib.get_close_matches(str(template_type), TEMPLATE_TYPES, n=2, cutoff=0.4)
    # Case and separator slips ('annotation-Aesthetic') deserve a hint even when difflib misses them.
    folded = {t.lower().replace("_", ""): t for t in TEMPLATE_TYPES}
    key = str(template_type).lower().replace("_", "").replace("-", "").replace(" ", "")
    if key in folded and folded[key] not in close:
        close.insert(0, folded[key])
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown template type {template_type!r}.{hint} Known types: {', '.join(TEMPLATE_TYPES)}.")


@dataclass(frozen=True)
class Template:
    """One template type's system message and answer format.

    Attributes:
        name: one of `TEMPLATE_TYPES`.
        system: the system message; may hold a placeholder for the number of images (`placeholder`).
        answer_key: for annotation types, the per-image key the answer format asks for.
        placeholder: the text standing for the number of images ('' when there is none).
        fill_placeholder: whether `system_text` replaces the placeholder with the image count.
        image_separator: the text before each image; '{k}' is its 1-based index.
        input_format: the text that gives an annotation request its prompt; '{prompt}' is replaced.
        source: 'builtin' or the path of the official file it was read from.
        notes: what differs from the official file's behaviour (corrections applied).
    """

    name: str
    system: str
    answer_key: str | None = None
    placeholder: str = NUM_PLACEHOLDER
    fill_placeholder: bool = True
    image_separator: str = "\nImage {k}:\n"
    input_format: str = "Input: {prompt}\n"
    source: str = "builtin"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kind(self) -> str:
        return template_kind(self.name)

    @property
    def dimension(self) -> str | None:
        """'alignment', 'aesthetic' or 'fidelity' for the annotation types, else None."""
        return self.name.removeprefix("annotation_") if self.kind == "annotation" else None

    def system_text(self, num_images: int = 0) -> str:
        """The system message for a request with `num_images` images."""
        if self.placeholder and self.fill_placeholder:
            return self.system.replace(self.placeholder, str(num_images))
        return self.system


class TemplateSet(Mapping[str, Template]):
    """The eight templates by type name; unknown names raise with a did-you-mean hint."""

    def __init__(self, templates: Mapping[str, Template], source: str, faithful: bool | None, quirks=None) -> None:
        missing = [t for t in TEMPLATE_TYPES if t not in templates]
        if missing:
            raise ValueError(f"template set from {source} lacks {missing}; every one of {list(TEMPLATE_TYPES)} is needed.")
        self._t = {k: templates[k] for k in TEMPLATE_TYPES}
        self.source = source
        self.faithful = faithful
        self.quirks = quirks  # an official file's `OfficialQuirks` (None for ours)

    def __getitem__(self, name: str) -> Template:
        return self._t[check_template_type(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return f"TemplateSet(source={self.source!r}, faithful={self.faithful})"


def _scale(bands: tuple[str, ...]) -> str:
    return "\n".join(f"  {lo}-{hi}: {text}" for (hi, lo), text in zip(((100, 90), (89, 70), (69, 50), (49, 30), (29, 0)), bands))


def _rating(dim: str, what: str, bands: tuple[str, ...]) -> str:
    return (
        f"You judge images made by a text-to-image model. {what}\n"
        "Judge every image on its own: the images do not depend on each other, and one image's quality "
        "must not change another's score.\n\n"
        f"Give each image a {dim} score, an integer from 0 to 100:\n{_scale(bands)}\n\n"
        f"There are {NUM_PLACEHOLDER} images; score all of them, numbered in the order they were given. "
        "Answer with one JSON object and nothing else, no explanation:\n"
        f'{{"image_1": {{"{dim}": <score>}}, "image_2": {{"{dim}": <score>}}, ...}}'
    )


_BUILTIN: dict[str, str] = {
    "prompt_processing": (
        "You take apart prompts written for a text-to-image model. Split the prompt you are given into four "
        "separate parts, using only words that are in the prompt; add nothing and guess nothing.\n"
        "- image_content: what the picture shows (objects, characters, setting and how they relate), kept as "
        "complete phrases in the prompt's own words, not reduced to keywords.\n"
        "- magic_words: words people add to push image quality, such as site names (ArtStation, Pixiv), artist "
        "names, or boosters like '4K' and 'highly detailed'.\n"
        "- artistic_style: words naming a visual art style (for example watercolor or cyberpunk) that are not "
        "magic words.\n"
        "- visual_properties: words about lighting, camera angle, depth of field, texture, mood and other "
        "look-of-the-scene properties that are not magic words.\n"
        "Answer with one JSON object and nothing else:\n"
        '{"image_content": "<text>", "magic_words": ["..."], "artistic_style": ["..."], '
        '"visual_properties": ["..."]}'
    ),
    "prompt_NSFW_filtering": (
        "You screen prompts written for a text-to-image model. Decide whether the prompt asks for content "
        "that is not safe for work, counting what it implies as well as what it says outright: read the whole "
        "prompt in context, and when a reasonable reading is unsafe, flag it.\n"
        'Answer with exactly {"NSFW Detected": true} or {"NSFW Detected": false} and nothing else.'
    ),
    "prompt_classification": (
        "You sort prompts written for a text-to-image model by their main subject (ignore minor details). "
        "Pick exactly one category:\n"
        "- Abstract & Artistic: non-figurative graphics, patterns, textures, stylised or cartoon imagery.\n"
        "- Animals & Plants: animals and plants, real or mythical (dragons, imaginary flowers).\n"
        "- Characters: people, real or fictional, and humanlike beings (elves, aliens, mechas).\n"
        "- Objects & Food: made things (furniture, tools, devices, vehicles) and food or drink.\n"
        "- Scenes: places, indoors (rooms, offices, factories) or outdoors (landscapes, streets, parks).\n"
        'Answer with one JSON object and nothing else: {"category": "<one of the five names above>"}'
    ),
    "captioning_coco_image": (
        "You write captions. Describe the main content of the image you are given, accurately, and leave out "
        "anything that is not part of it.\n"
        'Answer with one JSON object and nothing else: {"prompt": "<caption>"}'
    ),
    "captioning_aes_image": (
        "You describe images. Say briefly what the image shows, then describe its artistic style and its "
        "notable visual properties (palette, lighting, composition, texture).\n"
        "Answer with one JSON object and nothing else:\n"
        '{"image_content": "<text>", "artistic_style": "<text>", "visual_properties": "<text>"}'
    ),
    "annotation_alignment": _rating(
        "alignment",
        "Rate how faithfully each image shows what the prompt (given as 'Input') describes: its objects, "
        "attributes, relations and intent.",
        ("every detail and the intent of the prompt are shown", "most of the prompt is shown; small details are "
         "wrong or missing", "the general idea is there but key elements are missing or wrong",
         "little of the prompt is shown; many important details are missing or wrong",
         "the image has nothing to do with the prompt"),
    ),
    "annotation_aesthetic": _rating(
        "aesthetic",
        "Rate each image's visual and artistic quality: sharpness, lighting and exposure, colour harmony and "
        "composition (a clear focal point, a deliberate layout). The prompt is given as 'Input' for context.",
        ("striking: sharp, well lit, rich harmonious colours, masterful composition",
         "good: sharp and well exposed with pleasing colours; small things could be better",
         "fair: in focus and adequately lit but plain, with little artistic effect",
         "poor: visible blur, bad lighting, washed-out colours or an awkward layout",
         "bad: very blurry, badly lit or noisy, chaotic, the subject hard to make out"),
    ),
    "annotation_fidelity": _rating(
        "fidelity",
        "Rate how correct the shapes, anatomy and characteristic features of what each image shows are, for "
        "what the prompt (given as 'Input') names: a person has five fingers per hand, a unicorn one horn, "
        "Spider-Man two legs; extra, missing or malformed parts lower the score.",
        ("no errors: shapes and features are right and look natural",
         "small errors in a detail; coherent overall", "clear errors in shape or features, still roughly coherent",
         "major errors that spoil the image", "severe errors: the objects are unrealistic or make no sense"),
    ),
}


def builtin_templates() -> TemplateSet:
    """Our wording of the eight templates (image count filled in, each dimension asks for its own key)."""
    out = {}
    for name, text in _BUILTIN.items():
        kind = template_kind(name)
        out[name] = Template(
            name=name, system=text, answer_key=name.removeprefix("annotation_") if kind == "annotation" else None,
            placeholder=NUM_PLACEHOLDER if kind == "annotation" else "",
            image_separator="\nImage {k}:\n" if kind == "annotation" else "\nImage:\n",
        )
    return TemplateSet(out, "builtin", None)


def load_templates(templates: str | Path | TemplateSet | None = None, *, faithful: bool | None = None) -> TemplateSet:
    """The templates to use: ours (None), a `TemplateSet`, or the official ones read from a LePref `annoutils.py`.

    Args:
        templates: None for our wording, or the path of a copy of LePref's `annoutils.py`.
        faithful: with an official file, required: True reproduces the file's behaviour exactly (its image
            count placeholder stays unfilled, the aesthetic and fidelity formats ask for an "alignment" key);
            False corrects both. Not used with our templates.

    Raises:
        ValueError: `faithful` missing for an official file, or given for ours.
    """
    if isinstance(templates, TemplateSet):
        return templates
    if templates is None:
        if faithful:
            raise ValueError("faithful=True applies to official templates; pass templates='path/to/annoutils.py'.")
        return builtin_templates()
    if faithful is None:
        raise ValueError(
            f"templates={str(templates)!r} is an official LePref file: choose faithful=True (reproduce its "
            "behaviour exactly, quirks included) or faithful=False (fill in the image count and ask each dimension "
            "for its own key); on the command line --faithful or --corrected. See reward_plugins.judge.official."
        )
    from .official import official_templates

    return official_templates(templates, faithful=bool(faithful))
