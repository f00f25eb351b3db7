"""A resumed DPO run drops the log rows its killed predecessor wrote after the last checkpoint (issue 11,
item 15): metrics.jsonl, tensorboard and the curves drawn from them hold each step once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignment.configs import load_config
from alignment.trainers.common import checkpoint_dir, read_jsonl
from alignment.trainers.dpo import DPOConfig, DPOTrainer, make_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(pairs, report_to):
    return load_config(DPOConfig, ROOT / "configs/tiny/dpo.yaml", [
        f"data.path={pairs}", "data.synthetic_pairs=0", "train.validate_every=0", f"train.report_to={report_to}",
        "train.max_steps=6", "train.save_every=4", "train.log_every=1", "train.batch_size=2",
        "train.checkpoints_total_limit=null",
    ])


def _tensorboard_steps(out: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in (out / "logs").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_resume_after_kill_logs_each_step_once(tmp_path, report_to):
    if report_to == "tensorboard":
        pytest.importorskip("tensorboard")
    pairs = make_synthetic_pairs(tmp_path / "pairs.parquet", 8, resolution=32)
    out = tmp_path / "run"
    DPOTrainer(_cfg(pairs, report_to), output_dir=out).train()
    # A kill after step 6 was logged but before its checkpoint was written: the newest checkpoint is step 4.
    shutil.rmtree(checkpoint_dir(out, 6))
    before = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert before == [1, 2, 3, 4, 5, 6]
    DPOTrainer(_cfg(pairs, report_to), output_dir=out, resume=True).train()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert len(rows) == len({(r["step"], tuple(sorted(r))) for r in rows})  # no duplicated row of any kind
    if report_to == "tensorboard":
        assert _tensorboard_steps(out, "train/loss") == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    from reward_plugins.checkpoints import CheckpointError

    pairs = make_synthetic_pairs(tmp_path / "pairs.parquet", 8, resolution=32)
    out = tmp_path / "run"
    DPOTrainer(_cfg(pairs, "none"), output_dir=out).train(stop_at=4)
    victim = checkpoint_dir(out, 4) / "trainable_0.safetensors"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="trainable_0.safetensors is not a valid .safetensors file"):
        DPOTrainer(_cfg(pairs, "none"), output_dir=out, resume=True).train()
