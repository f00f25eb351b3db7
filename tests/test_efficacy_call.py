"""efficacy_call.py: an entry function called with other arguments; bad input is a one-line error, exit 2."""

import pytest

from examples.benchmarks.efficacy_call import main, namespace


def test_the_namespace_holds_every_family_entry_function():
    ns = namespace()
    for name in ("dpo", "rwr", "flow_grpo", "flow_grpo_soft", "reward_finetune", "SOFT_TERMS", "RWR_LORA_TARGETS"):
        assert name in ns


@pytest.mark.parametrize("call, message", [
    ("dpo(ctx, ", "is not a Python expression"),
    ("dpoo(ctx)", "unknown name(s) ['dpoo']"),
])
def test_bad_calls_are_refused(call, message, tmp_path, capsys):
    assert main([call, "--tag", "t", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_vae_state_is_refused(tmp_path, capsys):
    assert main(["dpo(ctx, 'sigmoid')", "--tag", "t", "--vae-state", str(tmp_path / "no.pt"), "--out", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_sd_and_flow_dpo_entries_mine_into_separate_dirs(monkeypatch, tmp_path):
    """One --out holds the SD and flow DPO entries: their mined pairs must not share a dir (the pair miner refuses
    a dir mined with another pipeline)."""
    import alignment.pairs
    from examples.benchmarks.efficacy_methods.dpo import mined_pairs
    from examples.benchmarks.efficacy_methods.registry import Context

    seen = []
    monkeypatch.setattr(alignment.pairs, "mine_pairs", lambda pipe, prompts, reward, n, out, **kw: seen.append(out))
    for base in ("sd", "flow"):
        mined_pairs(Context(pipe=None, workdir=tmp_path, steps=10, guidance=7.0, scale=1.0, base=base))
    assert len(seen) == 2 and seen[0] != seen[1] and all(p.parent == tmp_path for p in seen)
