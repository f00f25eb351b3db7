"""The CLI (`reward-align best-of-n`, `pairs`, `demo`) run in-process on the tiny configs, and the examples."""

import json
import runpy
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.commands import demo as demo_cmd

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "1", "--no-progress"]


def test_best_of_n_command(tmp_path, capsys):
    rc = main(["best-of-n", "--config", str(ROOT / "configs/tiny/best_of_n.yaml"), "--output-dir", str(tmp_path),
               "--n", "3", "--set", "guidance_scale=3", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "a photo of a cat" in out and "reward" in out
    assert (tmp_path / "index.html").is_file() and len(list((tmp_path / "sheets").glob("*.png"))) == 2
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["n"] == 3 and doc["settings"]["guidance_scale"] == 3.0 and doc["settings"]["num_inference_steps"] == 1
    assert "guidance_scale: 3" in (tmp_path / "config.yaml").read_text()


def test_pairs_command_and_resume(tmp_path, capsys):
    args = ["pairs", "--config", str(ROOT / "configs/tiny/pairs.yaml"), "--output-dir", str(tmp_path), *FAST]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "pairs from 3 prompts" in first
    from datasets import load_dataset

    ds = load_dataset(str(tmp_path))["train"]
    assert ds.num_rows > 0 and {"caption", "jpg_0", "jpg_1", "label_0"} <= set(ds.column_names)
    assert main(args) == 0
    assert "were already done" in capsys.readouterr().out
    # Same dir, other settings: a clear one-line error, exit status 1.
    assert main([*args, "--n", "4"]) == 1
    assert "incompatible settings" in capsys.readouterr().err


def test_cli_config_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pipeline: tiny-sd\nreward: pickscore-tiny\nnum_inference_step: 3\n")
    assert main(["best-of-n", "--config", str(cfg), "--prompt", "a cat"]) == 1
    assert "Did you mean 'num_inference_steps'" in capsys.readouterr().err
    assert main(["best-of-n", "--set", "pipeline=tiny-sd", "--set", "reward=pickscore-tiny", "--device", "cpu"]) == 1
    assert "no prompts" in capsys.readouterr().err
    assert main(["pairs", "--config", str(ROOT / "configs/tiny/pairs.yaml"), "--n", "1",
                 "--output-dir", str(tmp_path / "p")]) == 1
    assert "n must be an integer >= 2; got 1" in capsys.readouterr().err


def _run_demo(tmp_path, capsys):
    rc = main(["demo", "--random", "--output-dir", str(tmp_path), "--n", "2", "--prompt", "a photo of a cat", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "--reward lescore --checkpoint" in out and "--pipeline" in out
    assert (tmp_path / "index.html").is_file() and (tmp_path / "sheets" / "prompt_0000.png").is_file()
    assert (tmp_path / "scores.csv").is_file() and (tmp_path / "scores.json").is_file()
    assert "Random weights" in (tmp_path / "index.html").read_text()
    return out, json.loads((tmp_path / "scores.json").read_text())


def test_demo_with_lescore(tmp_path, capsys):
    if demo_cmd._lescore_module() is None:
        pytest.skip("reward_plugins.rewards.lescore is not in this checkout yet")
    out, doc = _run_demo(tmp_path, capsys)
    assert "tiny LeScore (random) loaded from LeScore.pt" in out
    assert doc["settings"]["reward"] == "lescore"
    assert set(doc["prompts"][0]["images"][0]) >= {"aesthetic", "fidelity", "alignment", "overall"}


def test_demo_falls_back_to_pickscore(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_cmd, "_lescore_module", lambda: None)
    out, doc = _run_demo(tmp_path, capsys)
    assert "tiny PickScore (random)" in out and doc["settings"]["reward"] == "pickscore"


def test_examples_run(tmp_path, capsys):
    bon = runpy.run_path(str(ROOT / "examples/best_of_n.py"), run_name="example")
    res = bon["main"](["--tiny", "--n", "2", "--steps", "1", "--output-dir", str(tmp_path / "bon")])
    assert res.scores.shape == (1, 2) and (tmp_path / "bon" / "index.html").is_file()
    pairs = runpy.run_path(str(ROOT / "examples/mine_pairs.py"), run_name="example")
    res = pairs["main"](["--tiny", "--n", "2", "--steps", "1", "--rule", "composite",
                         "--output-dir", str(tmp_path / "pairs")])
    assert res.manifest["complete"] and "pairs in" in capsys.readouterr().out


def test_demo_defaults_to_the_toy_world_with_oracle_verdicts(tmp_path, capsys):
    rc = main(["demo", "--output-dir", str(tmp_path), "--n", "2", "--prompt", "a red circle on the left",
               "--steps", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "toy world" in out and "oracle overall accuracy" in out and "RANDOM WEIGHTS" not in out
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert {"toyworld-clip", "oracle color", "oracle overall"} <= set(doc["prompts"][0]["images"][0])
    assert (tmp_path / "sheets" / "prompt_0000.png").is_file()


def test_demo_train_shows_before_and_after_on_held_out_prompts(tmp_path, capsys):
    # A tiny budget (1 step of DRaFT-K, 2 sampler steps, 2 images): the plumbing and the report, not the gain
    # (the gain at the default 50 steps is in the README).
    rc = main(["demo", "--train", "draft", "--train-steps", "1", "--output-dir", str(tmp_path), "--n", "2",
               "--prompt", "a red circle on the left", "--prompt", "a blue square at the top", "--steps", "2",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "DRaFT-K" in out and "before:" in out and "after:" in out and "gain, points:" in out
    doc = json.loads((tmp_path / "before_after.json").read_text())
    assert doc["method"] == "draft" and doc["train_steps"] == 1 and doc["seed"] >= 1_000_000  # held-out seeds
    assert set(doc["before"]) == set(doc["after"]) == {"color", "shape", "position", "overall"}
    assert [r["prompt"] for r in doc["prompts"]] == ["a red circle on the left", "a blue square at the top"]
    assert all(0.0 <= v <= 1.0 for v in doc["before"].values())
    assert abs(doc["gain"]["overall"] - (doc["after"]["overall"] - doc["before"]["overall"])) < 1e-9
    assert len(list((tmp_path / "sheets").glob("prompt_*.png"))) == 2 and (tmp_path / "index.html").is_file()
    from PIL import Image

    with Image.open(tmp_path / "sheets" / "prompt_0000.png") as sheet:  # two rows (before, after) of 2 images
        assert sheet.size[1] > 2 * 128
    assert (tmp_path / "train" / "pytorch_lora_weights.safetensors").is_file() or doc["lora"]


@pytest.mark.parametrize("argv, expected", [
    (["--train", "dpo"], "--train 'dpo' is not a training demo; use one of draft"),
    (["--train", "draft", "--random"], "--train runs on the toy world only"),
    (["--train", "draft", "--train-steps", "0"], "--train-steps must be >= 1; got 0"),
])
def test_demo_train_errors(tmp_path, capsys, argv, expected):
    assert main(["demo", "--output-dir", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
