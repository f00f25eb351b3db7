"""The ours-vs-plain-transformers scoring benchmark runs (tiny PickScore) and the paths agree."""

import pytest

from examples.benchmarks import plain_transformers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_transformers_benchmark_prints_every_path(capsys):
    plain_transformers.main(["--batch", "4", "--prompts", "2", "--size", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()
            if line.startswith(("plain transformers", "ours"))}
    assert set(rows) == {"plain transformers", "ours (cold cache)", "ours (warm cache)"}
    assert all(float(r[1]) > 0 for r in rows.values())
    # Same weights and images: ours differs from the PIL processor path only by PIL's uint8 rounding.
    assert all(float(r[3]) < 0.5 for r in rows.values())


def test_plain_transformers_benchmark_rejects_too_many_prompts():
    with pytest.raises(SystemExit):
        plain_transformers.main(["--prompts", "99"])
