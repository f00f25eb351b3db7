"""Token ids of the real prompt files against an independent OpenAI-CLIP BPE reference that applies ftfy.

The reference below is written from the published algorithm (OpenAI CLIP's `SimpleTokenizer`, which
open_clip and hpsv2 ship): ftfy, html unescape twice, whitespace collapse, lowercase, the CLIP word regex,
byte-level symbols, greedy lowest-rank BPE merges. It shares no code with `reward_plugins.tokenization`.
"""

import csv
import gzip
import html

import ftfy
import pytest
import regex

from reward_plugins.tokenization import CLIP_CONTEXT, clip_token_ids, clip_tokenizer_from_bpe, openai_clean

WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class ReferenceBPE:
    """OpenAI CLIP's tokenizer, minimal: vocab order = bytes, bytes+</w>, merges, sot, eot."""

    def __init__(self, bpe_path):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            merges = [tuple(m.split()) for m in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
        # Printable bytes map to themselves, the others to 256, 257, ... in byte order; vocab order is the same.
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
        symbols = [self.byte_char[b] for b in printable + others]
        vocab = symbols + [c + "</w>" for c in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.rank = {m: i for i, m in enumerate(merges)}

    def bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, pair = min(pairs)
            if best == float("inf"):
                break
            a, b = parts[pair], parts[pair + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of (a, b), left to right
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def __call__(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = " ".join(text.split()).lower()
        ids = []
        for word in WORD.findall(text):
            chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids += [self.ids[t] for t in self.bpe(chars)]
        ids = [self.ids["<|startoftext|>"], *ids][: CLIP_CONTEXT - 1] + [self.ids["<|endoftext|>"]]
        return ids + [self.ids["<|endoftext|>"]] * (CLIP_CONTEXT - len(ids))


@pytest.fixture
def real_prompts(shared_data):
    data = shared_data
    with open(data / "prompts" / "parti_prompts.tsv", encoding="utf-8", newline="") as f:
        prompts = [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]
    for name in ("ddpo_simple_animals.txt", "ddpo_activities.txt"):
        prompts += [line.strip() for line in (data / "prompts" / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def test_reference_bpe_matches_the_published_example(shared_data):
    ref = ReferenceBPE(shared_data / "clip_bpe_simple_vocab_16e6.txt.gz")
    assert ref("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_real_prompts_tokenize_like_the_ftfy_reference(shared_data, real_prompts):
    ref = ReferenceBPE(shared_data / "clip_bpe_simple_vocab_16e6.txt.gz")
    tok = clip_tokenizer_from_bpe(shared_data / "clip_bpe_simple_vocab_16e6.txt.gz")
    assert len(real_prompts) > 1600

    fixed = [p for p in real_prompts if ftfy.fix_text(p) != p]
    assert fixed, "ftfy changes none of the real prompts: the check below would not bite"
    assert any("’" in p for p in fixed)

    ours = clip_token_ids(tok, [openai_clean(p) for p in real_prompts]).tolist()
    expected = [ref(p) for p in real_prompts]
    mismatches = [p for p, a, b in zip(real_prompts, ours, expected) if a != b]
    assert not mismatches, f"{len(mismatches)} prompts tokenize differently, e.g. {mismatches[:3]}"

    # Without ftfy the fixed prompts would tokenize differently: the cleaning is what makes them agree.
    unfixed = clip_token_ids(tok, [" ".join(html.unescape(html.unescape(p)).split()) for p in fixed]).tolist()
    assert all(u != ref(p) for u, p in zip(unfixed, fixed))
