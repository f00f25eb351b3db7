"""The ours-vs-plain-transformers scoring benchmark runs (tiny PickScore) and the paths agree."""

import re

import pytest

from examples.benchmarks import plain_transformers

pytestmark = pytest.mark.usefixtures("one_thread")


def rows_of(out: str) -> dict[str, list[str]]:
    return {line[:24].strip(): line[24:].split() for line in out.splitlines() if line.startswith(("plain", "ours"))}


def test_plain_transformers_benchmark_prints_every_path(capsys):
    plain_transformers.main(["--batch", "4", "--prompts", "2", "--size", "64", "--repeats", "1"])
    rows = rows_of(capsys.readouterr().out)
    assert set(rows) == {"plain transformers", "ours (cold cache)", "ours (warm cache)"}
    # columns: s/batch, img/s, vs plain, max |diff|, cpu s, cpu vs plain
    assert all(len(r) == 6 and float(r[1]) > 0 and float(r[4]) > 0 for r in rows.values())
    # Same weights and images: ours differs from the PIL processor path only by PIL's uint8 rounding.
    assert all(float(r[3]) < 0.5 for r in rows.values())


def test_gpu_command_runs_on_cpu_as_a_dry_run(capsys):
    """The GPU session's command (bf16, compiled tower, % of peak) with --dry-run: every path once, on CPU."""
    plain_transformers.main(["--dtype", "bf16", "--batch", "4", "--size", "64", "--compile", "--ablate", "--dry-run"])
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert set(rows) == {"plain transformers", "ours (cold cache)", "ours (warm cache)", "ours (warm, hf tower)",
                         "ours (compiled, warm)"}
    assert all(float(r[3]) < 0.5 for r in rows.values())  # bf16: still within PIL's rounding of the plain path
    peak = re.search(r"compiled image tower: ([\d.]+) TFLOP/s = ([\d.]+)% of the measured torch.bfloat16", out)
    assert peak and float(peak.group(1)) > 0 and float(peak.group(2)) > 0


def test_plain_transformers_benchmark_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        plain_transformers.main(["--prompts", "99"])
    with pytest.raises(SystemExit):
        plain_transformers.main(["--full", "--dry-run"])
