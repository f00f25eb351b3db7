"""Shared helpers of the judge tests: a file in the official annoutils.py layout (our own short wording)."""

from __future__ import annotations

from pathlib import Path

from reward_plugins.judge.templates import TEMPLATE_TYPES

FORMAT_TAIL = 'You have **NUM** images. Include a separate alignment score for each image:\n{{"image_1": {{"{key}": ...}}}}'


def official_layout(path: Path, *, header: str = "", entry_override: str | None = None) -> Path:
    """Write a file laid out like LePref's annoutils.py: the template dict inside generate_system_content,
    the count replacement whose result is dropped. Aesthetic and fidelity ask for "alignment", as there."""
    entries = []
    for name in TEMPLATE_TYPES:
        text = f"Test wording for {name}."
        if name.startswith("annotation_"):
            text += "\n" + FORMAT_TAIL.format(key="alignment")
        entries.append(f'    {name!r}: {{"role": "system", "content": {text!r}}},')
    if entry_override:
        entries[0] = entry_override
    body = "\n".join(entries)
    src = f'''{header}
from vllm import LLM


def generate_system_content(template_type):
    template_dict = {{
{body}
    }}
    return template_dict[template_type]


def generate_image_prompt_request(prompt, image_list, template_type):
    system_content = generate_system_content(template_type)
    input_text = "## Input: {{INSERT PROMPT HERE}}\\n".replace("{{INSERT PROMPT HERE}}", prompt)
    system_content['content'].replace('NUM', str(len(image_list)))
    return [system_content, input_text]
'''
    path.write_text(src)
    return path
