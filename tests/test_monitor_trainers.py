"""The reward-hacking monitor inside every trainer (reward fine-tuning, policy gradient, DPO) on tiny random
pipelines: signals logged at each validation, `best/` written with the step it came from, `on_alarm: stop`
ending the run at the validation where a rule fired (final checkpoint and export still written), the
summary and curves naming the alarms, and resume reloading the monitor trimmed to the checkpoint.

The held-out evaluation reward is scripted (a value per step that the test controls), so where the
divergence rule must fire is known in advance."""

import json
import shutil

import pytest

from alignment.configs import load_config
from alignment.monitor import MonitorSection
from alignment.trainers.common import latest_checkpoint, read_jsonl
from alignment.trainers.dpo import DPOConfig, DPOTrainer, make_synthetic_pairs
from alignment.trainers.policy_gradient import PolicyGradientConfig, PolicyGradientTrainer
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
from reward_plugins.base import RewardModel

pytestmark = pytest.mark.usefixtures("one_thread")

# Training reward rises every validation; the held-out one peaks at step 4 and falls 30 % by step 6.
TRAIN = {0: 1.0, 2: 1.1, 4: 1.2, 6: 1.3, 8: 1.4}
HELD_OUT = {0: 1.0, 2: 1.1, 4: 1.2, 6: 0.9, 8: 0.8}
QUIET_MONITOR = ["monitor.statistics=[]", "monitor.diversity_floor=0"]  # only the divergence rule


class Scripted(RewardModel):
    """Differentiable (a tiny image term) but dominated by a value per trainer step that the test sets."""

    is_differentiable = True
    requires_prompts = False

    def __init__(self, series: dict):
        super().__init__()
        self.series = series
        self.clock = lambda: 0

    def compute(self, images, prompts):
        s = self.clock()
        value = self.series[max(k for k in self.series if k <= s)]
        return {"score": images.mean((1, 2, 3)) * 1e-3 + value}


def _reward_trainer(out, *overrides):
    cfg = load_config(RewardFinetuneConfig, "configs/tiny/reward_draft.yaml", [
        "sampling.guidance_scale=1.0", "train.lr=1e-2", "train.validate_every=2", "train.save_every=4",
        "train.report_to=none", "train.max_steps=8", "data.val_images_per_prompt=2", "method.name=draft",
        f"train.output_dir={out}", *overrides])
    train, held = Scripted(TRAIN), Scripted(HELD_OUT)
    trainer = RewardFinetuner(cfg, reward=train, eval_reward=held)
    train.clock = held.clock = lambda: trainer.step
    return trainer


def test_reward_finetune_logs_signals_keeps_best_and_stops_at_the_alarm(tmp_path):
    trainer = _reward_trainer(tmp_path, "monitor.on_alarm=stop", *QUIET_MONITOR)
    summary = trainer.train()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "monitor/alarms" in r]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]  # stopped at the validation where the rule fired
    for r in rows:
        assert {"monitor/stat/saturation", "monitor/stat/dark_fraction", "monitor/diversity/pixel",
                "monitor/drift/pixel"} <= set(r)
    assert rows[0]["monitor/drift/pixel"] == 0.0 and rows[-1]["monitor/drift/pixel"] > 0
    assert rows[-1]["monitor/relative/val/rewards/eval/mean"] == pytest.approx(-0.1, abs=1e-2)
    assert [r["monitor/alarms"] for r in rows] == [0, 0, 0, 1]
    assert summary["step"] == 6
    mon = summary["monitor"]
    assert [(a["rule"], a["step"], a["key"]) for a in mon["alarms"]] == [("divergence", 6, "val/rewards/eval/mean")]
    assert mon["stopped"] and mon["best"]["step"] == 4 and mon["best"]["key"] == "val/rewards/eval/mean"
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 4
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()  # the final export still written
    assert latest_checkpoint(tmp_path)[1] == 6  # and a checkpoint at the stopping step
    assert json.loads((tmp_path / "summary.json").read_text())["monitor"]["alarms"][0]["step"] == 6
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "monitor_report.png").is_file()


def test_reward_finetune_warn_goes_on_and_resume_trims_the_monitor(tmp_path):
    full = _reward_trainer(tmp_path / "full", *QUIET_MONITOR).train()
    assert full["step"] == 8 and not full["monitor"]["stopped"]
    assert [a["step"] for a in full["monitor"]["alarms"]] == [6, 8]
    # An interrupted run: it validated at step 6 but its checkpoint 6 never landed.
    part = tmp_path / "part"
    _reward_trainer(part, "train.max_steps=6", *QUIET_MONITOR).train()
    shutil.rmtree(latest_checkpoint(part)[0])
    assert latest_checkpoint(part)[1] == 4
    resumed = _reward_trainer(part, *QUIET_MONITOR).train(resume=True)
    history = json.loads((part / "monitor.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 2, 4, 6, 8]  # step 6 seen once, drift against the same base
    assert [a["step"] for a in resumed["monitor"]["alarms"]] == [6, 8]
    assert resumed["monitor"]["best"] == full["monitor"]["best"]
    assert json.loads((part / "best" / "best.json").read_text())["step"] == 4
    want = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "monitor/drift/pixel" in r]
    got = [r for r in read_jsonl(part / "metrics.jsonl") if "monitor/drift/pixel" in r]
    assert [r["step"] for r in got] == [0, 2, 4, 6, 8]
    for a, b in zip(want, got):
        assert b["monitor/drift/pixel"] == pytest.approx(a["monitor/drift/pixel"], rel=1e-4, abs=1e-6)


def test_monitor_off_logs_nothing_and_writes_no_best(tmp_path):
    trainer = _reward_trainer(tmp_path, "monitor.enabled=false", "train.max_steps=2")
    summary = trainer.train()
    assert not any(k.startswith("monitor/") for r in read_jsonl(tmp_path / "metrics.jsonl") for k in r)
    assert summary["monitor"] == {} and not (tmp_path / "best").exists()


def test_bad_monitor_section_is_refused_at_load():
    with pytest.raises(ValueError, match="monitor.on_alarm"):
        _reward_trainer("unused", "monitor.on_alarm=halt")
    with pytest.raises(ValueError, match="monitor.divergence_patience must be an integer >= 1"):
        load_config(RewardFinetuneConfig, None, ["monitor.divergence_patience=0"])
    assert isinstance(load_config(PolicyGradientConfig, None, ["monitor.on_alarm=stop"]).monitor, MonitorSection)


PG_FAST = [
    "train.report_to=none", "train.max_steps=8", "train.validate_every=2", "train.save_every=4",
    "train.batch_size=4", "train.gradient_accumulation_steps=1", "method.group_size=2",
    "method.prompts_per_epoch=2", "method.inner_epochs=1", "method.contact_sheet_every=0",
    "method.train_steps=all", "sampling.num_steps=2", "sampling.batch_size=4", "train.lr=1e-2",
    "data.val_prompts=[a cat, a cat, a horse, a horse]",
]


def test_policy_gradient_stops_at_the_alarm_keeps_best_and_resumes(tmp_path):
    def make(out, *extra):
        cfg = load_config(PolicyGradientConfig, "configs/tiny/rl_ddpo.yaml", [*PG_FAST, *QUIET_MONITOR, *extra])
        cfg.eval_reward = None
        train, held = Scripted(TRAIN), Scripted(HELD_OUT)
        trainer = PolicyGradientTrainer(cfg, reward=train, eval_reward=held, output_dir=str(out))
        train.clock = held.clock = lambda: trainer.epoch
        return trainer

    summary = make(tmp_path / "stop", "monitor.on_alarm=stop").train()
    assert summary["epochs"] == 6
    rows = [r for r in read_jsonl(tmp_path / "stop" / "metrics.jsonl") if "monitor/alarms" in r]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert "monitor/diversity/pixel" in rows[0] and "monitor/stat/colour_entropy" in rows[0]
    assert [(a["rule"], a["step"]) for a in summary["monitor"]["alarms"]] == [("divergence", 6)]
    assert json.loads((tmp_path / "stop" / "best" / "best.json").read_text())["step"] == 4
    assert (tmp_path / "stop" / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "stop")[1] == 6
    # Resume past the stop under warn: the monitor continues from the checkpoint's history.
    resumed = make(tmp_path / "stop", "monitor.on_alarm=warn").train(resume=True)
    assert resumed["epochs"] == 8
    history = json.loads((tmp_path / "stop" / "monitor.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 2, 4, 6, 8]
    assert [a["step"] for a in resumed["monitor"]["alarms"]] == [6, 8]


def test_dpo_logs_signals_keeps_best_and_stops_on_an_image_statistic(tmp_path):
    pairs = make_synthetic_pairs(tmp_path / "pairs.parquet", 8, resolution=32)
    cfg = load_config(DPOConfig, "configs/tiny/dpo.yaml", [
        f"data.path={pairs}", "data.synthetic_pairs=0", "train.report_to=none", "train.max_steps=8",
        "train.validate_every=2", "train.save_every=0", "train.log_every=2", "train.lr=5e-2",
        "validation.save_images=false", "validation.prompts=[a smooth gradient, a smooth gradient]",
        "monitor.on_alarm=stop", "monitor.divergence=false", "monitor.diversity_floor=0",
        "monitor.statistics=[colour_entropy]", "monitor.stat_abs_band=0", "monitor.stat_rel_band=1e-6",
    ])
    result = DPOTrainer(cfg, output_dir=tmp_path / "run").train()
    out = tmp_path / "run"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "monitor/alarms" in r]
    assert [r["step"] for r in rows] == [0, 2]  # the LoRA moved the images: entropy left the (tiny) band
    assert "monitor/diversity/pixel" in rows[0] and "val/reward_mean" in rows[0]
    assert result.steps == 2 and result.lora_path is not None and result.lora_path.is_file()
    assert [(a["rule"], a["key"]) for a in result.monitor["alarms"]] == [("image_statistic", "monitor/stat/colour_entropy")]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["key"] == "val/reward_mean" and best["step"] in (0, 2)
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert latest_checkpoint(out)[1] == 2
    assert json.loads((out / "summary.json").read_text())["monitor"]["stopped"]
