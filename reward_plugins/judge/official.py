"""Read the official LePref templates from a user's copy of `annoutils.py`, without executing it.

The file is parsed with `ast`; the template dictionary assigned to `template_dict` (inside
`generate_system_content` in the official layout) is evaluated with `ast.literal_eval`, which accepts only
literals (strings, numbers, dicts, lists...). A file whose dictionary holds anything else (a call, a name, an
f-string) is refused; nothing in the file ever runs, not even its imports.

Quirks of the official file that change results (checked in the file itself, not assumed):
    1. The image count placeholder is never filled in: `generate_image_prompt_request` calls
       ``system_content['content'].replace('NUM', ...)`` and throws the result away, so the model reads
       "You have **NUM** images". `faithful=True` keeps the literal 'NUM'; `faithful=False` puts the count in.
    2. The aesthetic and fidelity output formats ask for an ``"alignment"`` key (copied from the alignment
       template). `faithful=True` keeps that wording and the parser reads the "alignment" key of those
       answers; `faithful=False` rewrites the format to ask for "aesthetic" / "fidelity".
The request layout (the user turn) follows the official code: prompt templates send the bare prompt,
captioning sends "\\nImage :\\n" and the image, annotation sends "## Input: <prompt>\\n" then "\\nImage k:\\n"
before each image; images go as base64 JPEG data URLs.

Example:
    >>> ts = official_templates("LePref/annoutils.py", faithful=True)  # doctest: +SKIP
    >>> ts["annotation_aesthetic"].answer_key                          # doctest: +SKIP
    'alignment'
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .templates import TEMPLATE_TYPES, Template, TemplateSet, template_kind

DICT_NAME = "template_dict"
OFFICIAL_PLACEHOLDER = "NUM"
OFFICIAL_INPUT = "## Input: {INSERT PROMPT HERE}\n"
_KEY_RE = re.compile(r'"image_1"\s*:\s*\{\s*"([^"]+)"')


@dataclass(frozen=True)
class OfficialQuirks:
    """What the parsed file does, as found in it.

    Attributes:
        placeholder_unfilled: the count replacement's result is discarded (an expression statement).
        asked_keys: the per-image key each annotation type's output format asks for.
        input_format: the annotation user-turn prefix found in the file.
    """

    placeholder_unfilled: bool
    asked_keys: dict[str, str]
    input_format: str


def _find_dict(tree: ast.AST, path: str) -> ast.Dict:
    found = [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        and any(isinstance(t, ast.Name) and t.id == DICT_NAME for t in node.targets)
    ]
    if not found:
        raise ValueError(
            f"{path}: no `{DICT_NAME} = {{...}}` assignment found; expected LePref's annoutils.py (its "
            "generate_system_content defines the template dictionary)."
        )
    return found[0]


def _discards_count_replacement(tree: ast.AST) -> bool:
    # `x.replace('NUM', ...)` as a bare statement: the official bug; assigned or returned means it is used.
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func
            args = node.value.args
            if (isinstance(f, ast.Attribute) and f.attr == "replace" and args
                    and isinstance(args[0], ast.Constant) and args[0].value == OFFICIAL_PLACEHOLDER):
                return True
    return False


def _input_format(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and "{INSERT PROMPT HERE}" in node.value
                and node.value != "{INSERT PROMPT HERE}"):
            return node.value.replace("{INSERT PROMPT HERE}", "{prompt}")
    return OFFICIAL_INPUT.replace("{INSERT PROMPT HERE}", "{prompt}")


def read_official_file(path: str | Path) -> tuple[dict[str, str], OfficialQuirks]:
    """Parse `annoutils.py` and return ({template type: system text}, quirks). Never executes the file.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not Python, no template dictionary, a non-literal value in it, or a missing template type.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"official templates file {str(p)!r} not found; pass the path of annoutils.py from a copy of "
            "https://github.com/RL2065/LePref."
        )
    source = p.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(p))
    except SyntaxError as e:
        raise ValueError(f"{p}: not valid Python ({e.msg}, line {e.lineno}); expected LePref's annoutils.py.") from e
    node = _find_dict(tree, str(p))
    try:
        table = ast.literal_eval(node)
    except ValueError as e:
        raise ValueError(
            f"{p}: `{DICT_NAME}` holds something other than plain literals ({e}); it is read without running "
            "any code, so only strings, numbers, lists and dicts are accepted."
        ) from e
    texts: dict[str, str] = {}
    for name in TEMPLATE_TYPES:
        entry = table.get(name)
        if entry is None:
            raise ValueError(f"{p}: `{DICT_NAME}` has no {name!r} entry; found {sorted(table)}.")
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str):
            raise ValueError(f"{p}: `{DICT_NAME}[{name!r}]` must be a dict with a string 'content'; got {entry!r:.80}.")
        texts[name] = content
    asked = {}
    for name in TEMPLATE_TYPES:
        if template_kind(name) == "annotation":
            m = _KEY_RE.search(texts[name])
            asked[name] = m.group(1) if m else name.removeprefix("annotation_")
    quirks = OfficialQuirks(_discards_count_replacement(tree), asked, _input_format(tree))
    return texts, quirks


def _corrected(name: str, text: str, asked: str) -> tuple[str, tuple[str, ...]]:
    dim = name.removeprefix("annotation_")
    notes = []
    if asked != dim:
        text = text.replace(f'{{"{asked}":', f'{{"{dim}":').replace(f"separate {asked} score", f"separate {dim} score")
        notes.append(f"output format asks for {dim!r} instead of the file's {asked!r}")
    return text, tuple(notes)


def official_templates(path: str | Path, *, faithful: bool) -> TemplateSet:
    """The eight official templates from `path`, reproducing the file (`faithful=True`) or corrected (False)."""
    texts, quirks = read_official_file(path)
    out = {}
    for name, text in texts.items():
        kind = template_kind(name)
        base = Template(
            name=name, system=text, placeholder=OFFICIAL_PLACEHOLDER if kind == "annotation" else "",
            image_separator="\nImage {k}:\n" if kind == "annotation" else "\nImage :\n",
            input_format=quirks.input_format, source=str(path),
        )
        if kind != "annotation":
            out[name] = base
        elif faithful:
            out[name] = replace(base, answer_key=quirks.asked_keys[name], fill_placeholder=not quirks.placeholder_unfilled)
        else:
            fixed, notes = _corrected(name, text, quirks.asked_keys[name])
            if quirks.placeholder_unfilled:
                notes = ("image count filled in (the file discards it)", *notes)
            out[name] = replace(base, system=fixed, answer_key=name.removeprefix("annotation_"), fill_placeholder=True,
                                notes=notes)
    return TemplateSet(out, str(path), faithful, quirks)
