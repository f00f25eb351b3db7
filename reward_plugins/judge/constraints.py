"""Constrained greedy decoding of the annotation answer format, for local generation.

The format of an annotation answer is fixed except for its numbers:
``{"image_1":{"<key>":<0-100>},"image_2":{...},...}``. `ScoreFormat` follows that skeleton character by
character and tells `generate` (through `prefix_allowed_tokens_fn`) which tokens keep the text on it, so
even a weak or random model yields a parseable answer; the model still chooses every digit. Tokens are
checked by their decoded text (whitespace-free tokens only), indexed by first character, so the cost per
step is the number of tokens that start with the expected character, not the whole vocabulary.

Servers have their own guided decoding (vLLM's ``guided_json``); this is for the local backend and tests.
"""

from __future__ import annotations

from collections import defaultdict

NUM = None  # a number slot in a skeleton
_DIGITS = "0123456789"


def score_skeleton(key: str, num_images: int) -> list[str | None]:
    """The annotation answer's pieces: literal strings and number slots (None)."""
    pieces: list[str | None] = ["{"]
    for k in range(1, num_images + 1):
        pieces += [("," if k > 1 else "") + f'"image_{k}":{{"{key}":', NUM, "}"]
    pieces.append("}")
    # Merge adjacent literals so each literal piece is followed by a slot or the end.
    merged: list[str | None] = []
    for p in pieces:
        if p is not NUM and merged and merged[-1] is not NUM:
            merged[-1] += p
        else:
            merged.append(p)
    return merged


class ScoreFormat:
    """A character automaton over a skeleton; the state is (piece index, position or digits so far)."""

    def __init__(self, pieces: list[str | None]) -> None:
        self.pieces = pieces

    def start(self):
        return (0, "" if self.pieces[0] is NUM else 0)

    def done(self, state) -> bool:
        return state[0] >= len(self.pieces)

    def step(self, state, ch: str):
        i, pos = state
        if i >= len(self.pieces):
            return None
        piece = self.pieces[i]
        if piece is NUM:
            if ch in _DIGITS:
                num = pos + ch
                if (pos == "0") or int(num) > 100:
                    return None
                return (i, num)
            if not pos:
                return None
            return self.step(self._enter(i + 1), ch)
        if ch != piece[pos]:
            return None
        return self._enter(i + 1) if pos + 1 == len(piece) else (i, pos + 1)

    def _enter(self, i: int):
        if i >= len(self.pieces):
            return (i, 0)
        return (i, "" if self.pieces[i] is NUM else 0)

    def feed(self, state, text: str):
        for ch in text:
            if ch.isspace():
                continue
            state = self.step(state, ch)
            if state is None:
                return None
        return state

    def next_chars(self, state) -> str:
        i, pos = state
        if i >= len(self.pieces):
            return ""
        piece = self.pieces[i]
        if piece is NUM:
            if not pos:
                return _DIGITS
            nxt = self.pieces[i + 1] if i + 1 < len(self.pieces) else None
            return _DIGITS + (nxt[0] if isinstance(nxt, str) else "")
        return piece[pos]


class TokenIndex:
    """Token ids by the first character of their decoded text (whitespace-free, non-special tokens only)."""

    def __init__(self, tokenizer) -> None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.by_first: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for tid in range(len(tokenizer)):
            if tid in special:
                continue
            s = tokenizer.decode([tid])
            if s and not any(c.isspace() for c in s) and "\ufffd" not in s:
                self.by_first[s[0]].append((tid, s))
        eos = tokenizer.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])


def allowed_tokens(fmt: ScoreFormat, index: TokenIndex, generated_text: str) -> list[int]:
    """Token ids that keep `generated_text` on the skeleton; EOS once it is complete."""
    state = fmt.feed(fmt.start(), generated_text)
    if state is None or fmt.done(state):
        return index.eos
    out = []
    for ch in fmt.next_chars(state):
        for tid, s in index.by_first.get(ch, ()):
            if fmt.feed(state, s) is not None:
                out.append(tid)
    return out or index.eos
