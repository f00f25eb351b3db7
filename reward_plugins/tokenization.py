"""Tokenizers: CLIP's from a BPE file or a model dir, tiny offline ones for tests, and a prompt cache.

CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, shipped by open_clip and OpenAI CLIP) is enough
to rebuild the full 49,408-token tokenizer offline: 256 byte symbols, the same with `</w>`, the first
48,894 merges, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
"""

from __future__ import annotations

import gzip
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

CLIP_NUM_MERGES = 48894
CLIP_CONTEXT = 77


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_from_merges(merges: Sequence[str]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def _make_clip_tokenizer(vocab: dict[str, int], merges: list[str], max_length: int = CLIP_CONTEXT):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = max_length
    return tok


def clip_tokenizer_from_bpe(path: str | os.PathLike, num_merges: int = CLIP_NUM_MERGES):
    """The full CLIP tokenizer rebuilt from `bpe_simple_vocab_16e6.txt.gz` (or its unzipped text).

    Example:
        >>> tok = clip_tokenizer_from_bpe("bpe_simple_vocab_16e6.txt.gz")
        >>> tok("a photo of a cat").input_ids
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"BPE vocabulary not found: {str(path)!r}. It ships in open_clip as "
            "open_clip/bpe_simple_vocab_16e6.txt.gz; or pass backbone= a CLIP model dir with its tokenizer."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [m for m in lines[1 : 1 + num_merges] if m]
    return _make_clip_tokenizer(clip_vocab_from_merges(merges), merges)


def tiny_clip_tokenizer(max_length: int = CLIP_CONTEXT):
    """A real CLIP byte-level BPE tokenizer with a tiny vocabulary (519 ids, seven merges), fully offline.

    Ids: 0-511 byte symbols, a handful of merges, then `<|startoftext|>` and `<|endoftext|>` last, so that
    EOT is the largest id as in CLIP (argmax pooling finds it).
    """
    merges = ["t h", "a t", "a t</w>", "c at</w>", "o f</w>", "d o", "o g</w>"]
    return _make_clip_tokenizer(clip_vocab_from_merges(merges), merges, max_length)


def load_tokenizer(source: str | os.PathLike, **kwargs):
    """`AutoTokenizer.from_pretrained` with an error that says what to pass when it cannot be found."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load a tokenizer from {str(source)!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Pass backbone= a local model dir (with tokenizer files) or a hub id that is in your cache; "
            "with HF_HUB_OFFLINE=1 only cached ids resolve."
        ) from None


def openai_clean(text: str) -> str:
    """OpenAI CLIP / open_clip text cleaning before BPE: `ftfy.fix_text`, `html.unescape` twice, whitespace
    collapsed.

    HF's CLIP tokenizer does none of the first two, so "&amp;", curly quotes ("a corgi’s head") or mojibake
    would tokenize differently from the official HPS and CLIPScore-paper code (12 of the 1,680 PartiPrompts
    and DDPO prompts change under ftfy). ftfy is a required dependency: the cleaning is never skipped.
    """
    import html
    import re

    try:
        import ftfy
    except ImportError as e:  # a broken install: ftfy is in the project's dependencies
        raise ImportError(
            "reward_plugins needs ftfy to clean prompts as OpenAI CLIP / open_clip do (HPS, CLIPScore paper); "
            "install it with `pip install ftfy`."
        ) from e
    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text)))).strip()


TRUNCATIONS = ("keep_eot", "torchmetrics")


def check_truncation(truncation: str) -> str:
    """`truncation` if it is a known prompt truncation rule, else a ValueError naming the choices."""
    if truncation not in TRUNCATIONS:
        raise ValueError(
            f"truncation must be 'keep_eot' (cut long prompts keeping the end token; OpenAI CLIP, open_clip) or "
            f"'torchmetrics' (cut the ids at 77 without it, as torchmetrics' CLIPScore); got {truncation!r}."
        )
    return truncation


def clip_token_ids(
    tokenizer, prompts: Sequence[str], max_length: int = CLIP_CONTEXT, truncation: str = "keep_eot"
) -> torch.Tensor:
    """CLIP ids padded to exactly `max_length` with the pad token (EOT for CLIP).

    Prompts longer than `max_length` tokens are cut in one of two ways:

    - ``"keep_eot"`` (default): ``[BOS, first max_length - 2 tokens, EOT]``, as OpenAI CLIP's
      ``clip.tokenize(truncate=True)``, open_clip and transformers' ``truncation=True`` do. The pooled
      text feature is read at EOT, as in training.
    - ``"torchmetrics"``: the ids are cut at `max_length` with no EOT, as
      ``torchmetrics.multimodal.CLIPScore`` does. The pooled feature is then read at an ordinary word
      (transformers pools at the largest id when the config's EOT id is the legacy 2), so long prompts
      score differently (up to several CLIPScore points); use it only to reproduce torchmetrics' numbers.
    """
    if check_truncation(truncation) == "keep_eot":
        enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return enc["input_ids"]
    rows = [ids[:max_length] for ids in tokenizer(list(prompts), verbose=False)["input_ids"]]
    pad = tokenizer.pad_token_id
    return torch.tensor([ids + [pad] * (max_length - len(ids)) for ids in rows], dtype=torch.long)


def trim_after_eot(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """`ids` (B, L) without the trailing columns that come after every row's first EOT.

    For text towers pooled at EOT under a causal mask (CLIP), tokens after EOT never reach the pooled
    feature, so the trimmed ids give the same embedding for a fraction of the work: most prompts are
    far shorter than 77 tokens. A row without EOT (torchmetrics truncation) keeps the full length.
    """
    is_eot = ids == eot_id
    first = torch.where(is_eot.any(-1), is_eot.int().argmax(-1) + 1, ids.shape[-1])
    return ids[:, : int(first.max())]


class PromptCache:
    """An LRU cache of per-prompt text features, keyed by (prompt, device, dtype, extra).

    Text towers are frozen, so a prompt's features never change; best-of-N and pair mining score many
    images per prompt, and the text tower then runs once per unique prompt.
    """

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._store: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get_many(self, prompts: Sequence[str], encode: Callable[[list[str]], object], key_extra: Hashable = ()):
        """Features for `prompts` in order; `encode(list_of_new_prompts)` returns a tensor or a tuple of
        tensors with the prompt in dim 0, computed once for the prompts not yet cached."""
        keys = [(p, key_extra) for p in prompts]
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in self._store))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            with torch.no_grad():
                feats = encode(missing)
            for i, p in enumerate(missing):
                item = tuple(f[i] for f in feats) if isinstance(feats, tuple) else feats[i]
                self._store[(p, key_extra)] = item
                self._store.move_to_end((p, key_extra))
            while len(self._store) > self.max_size:
                self._store.popitem(last=False)
        items = [self._store[k] for k in keys]
        for k in keys:
            self._store.move_to_end(k)
        if isinstance(items[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*items))
        return torch.stack(items)
