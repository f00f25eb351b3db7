"""Tiny-pipeline commands print no diffusers float32-cast noise, and the pairs command says how diffusers'
Diffusion-DPO examples read its output (issue 11, item 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_best_of_n_tiny_prints_no_float32_cast_warning(tmp_path, capfd):
    code = main(["best-of-n", "--config", str(ROOT / "configs/tiny/best_of_n.yaml"), "--output-dir", str(tmp_path),
                 "--no-progress", "--steps", "1", "--n", "2"])
    captured = capfd.readouterr()
    assert code == 0
    assert "should be kept in float32" not in captured.err + captured.out


def test_pairs_command_says_how_diffusers_reads_the_pairs(tmp_path, capfd):
    code = main(["pairs", "--config", str(ROOT / "configs/tiny/pairs.yaml"), "--output-dir", str(tmp_path),
                 "--no-progress", "--steps", "1", "--n", "2", "--max-prompts", "1"])
    captured = capfd.readouterr()
    assert code == 0 and "--dataset_split_name train" in captured.out
    assert "should be kept in float32" not in captured.err
    readme = (ROOT / "README.md").read_text()
    assert "--dataset_split_name train" in readme
