"""The flow-model benchmark script runs on tiny configs (its CUDA mode is the GPU benchmark), and the
best-of-n command takes tiny SD3/FLUX pipelines."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_memory_benchmark_tiny(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from examples.benchmarks.flow_memory import main
    finally:
        sys.path.remove(str(ROOT))
    res = main(["--device", "cpu", "--tiny", "--steps", "1"])
    assert res["draft1_step_s"] > 0 and res["dpo_pairs_per_s"] > 0 and res["lora_params_M"] > 0
    assert "dpo_pairs_per_s" in capsys.readouterr().out


def test_best_of_n_cli_on_tiny_flux(tmp_path, capsys):
    from alignment.cli import main

    rc = main(["best-of-n", "--config", str(ROOT / "configs" / "tiny" / "best_of_n_flux.yaml"),
               "--output-dir", str(tmp_path), "--n", "2"])
    assert rc == 0 and (tmp_path / "scores.json").is_file()
    assert "tiny-flux" in (tmp_path / "scores.json").read_text() or "FluxPipeline" in (tmp_path / "scores.json").read_text()
