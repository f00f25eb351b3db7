"""Per-dimension targeting: DRaFT-K trained on ONE dimension of the soft oracle (``toyworld:<dim>``).

The question these rows answer: does training on one dimension raise that dimension on held-out prompts
while the others hold? A row passes (`targeting_verdict`) when the targeted dimension's held-out exact
accuracy rises by the project's bar (`TARGET_GAIN`, +10 points) and no other dimension (of colour,
shape, position) falls by more than `TOLERANCE`. The tolerance is 5 points: the standard error of one
dimension's 144-image accuracy near 0.6 is ~0.04, so a smaller tolerance would be judged on noise.

The recipe is the `draft` entry's (DRaFT-K, K = 10, lr 1e-3, 200 steps, batch 8), written out here so that
retuning `gradient.draft` does not change what these rows measure.
"""

from __future__ import annotations

from reward_plugins.registry import parse_name

from .registry import TARGET_GAIN, Context, method, reward_finetune

TOLERANCE = 0.05  # the largest fall of a non-targeted dimension's held-out exact accuracy a row may show
ATTRIBUTES = ("color", "shape", "position")
TARGETED = ("shape", "color")  # the benchmark's targeting rows: the slowest dimension (shape) and colour


def targeted_dimension(reward: str) -> str | None:
    """``"toyworld:shape"`` -> ``"shape"``; None when `reward` does not select one toy-world attribute."""
    name, dim = parse_name(reward)
    return dim if name in ("toyworld", "toyworld-soft") and dim in ATTRIBUTES else None


def targeting_verdict(row: dict) -> dict | None:
    """The targeting check of one benchmark row (a `Row` as a dict); None for rows trained on no single dimension.

    Returns:
        ``{"dimension", "gain", "others": {dim: change}, "largest_fall", "passed"}``: `gain` is the targeted
        dimension's held-out exact change, `largest_fall` the most negative change among the other two
        (0 when neither falls), `passed` = gain >= `TARGET_GAIN` and largest_fall <= `TOLERANCE`.
    """
    dim = targeted_dimension(row["reward"])
    if dim is None:
        return None
    before, after = row["exact_before"], row["exact_after"]
    others = {d: after[d] - before[d] for d in ATTRIBUTES if d != dim}
    fall = max(0.0, -min(others.values()))
    gain = after[dim] - before[dim]
    return {"dimension": dim, "gain": gain, "others": others, "largest_fall": fall,
            "passed": gain >= TARGET_GAIN - 1e-9 and fall <= TOLERANCE + 1e-9}


def format_targeting(rows: list[dict]) -> str:
    """A markdown table of the targeting rows among `rows` ("" when there are none)."""
    lines = []
    for r in rows:
        v = targeting_verdict(r)
        if v is None:
            continue
        eb, ea = r["exact_before"], r["exact_after"]
        others = ", ".join(f"{d} {eb[d]:.2f} -> {ea[d]:.2f} ({c * 100:+.1f})" for d, c in v["others"].items())
        lines.append(f"| {r['method']} | {v['dimension']} | {eb[v['dimension']]:.2f} -> {ea[v['dimension']]:.2f} "
                     f"({v['gain'] * 100:+.1f}) | {others} | {v['largest_fall'] * 100:.1f} | "
                     f"{'yes' if v['passed'] else 'NO'} |")
    if not lines:
        return ""
    head = [f"| targeting row | trained on | targeted (held-out exact, points) | others | largest fall, points "
            f"(tolerance {TOLERANCE * 100:.0f}) | +{TARGET_GAIN * 100:.0f} targeted, others within tolerance |",
            "|" + "---|" * 6]
    return "\n".join(head + lines)


def _draft_on(dim: str):
    def run(ctx: Context) -> dict:
        return reward_finetune(ctx, "draft", f"toyworld:{dim}", steps=200, lr=1e-3, k=10, work_name=f"draft-{dim}")

    run.__doc__ = f"DRaFT-K (K = 10, lr 1e-3, 200 steps) on the soft oracle's {dim} dimension only (targeting)"
    return run


for _dim in TARGETED:
    method(f"draft-{_dim}", f"toyworld:{_dim}")(_draft_on(_dim))
