"""Reward fine-tuning (alignment/trainers/reward_finetune.py) end to end on the tiny SD pipeline with
tiny differentiable rewards: every method raises the reward, only LoRA weights move, resume is exact,
the exported LoRA loads into a fresh pipeline, and misconfigurations fail at construction."""

import glob
import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import Brightness

from alignment.configs import load_config
from alignment.trainers.common import read_jsonl
from alignment.trainers.reward_finetune import GRADIENT_METHODS, RewardFinetuneConfig, RewardFinetuner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "reward_draft.yaml"

# Fast settings shared by the tests: 4 sampling steps, 32 px, no guidance, one normalised reward.
FAST = [
    "reward.terms={aesthetic-tiny: 1.0}", "reward.normalize=true", "eval_reward.terms={hpsv2-tiny: 1.0}",
    "sampling.guidance_scale=1.0", "train.lr=1e-2", "train.validate_every=0", "train.save_every=0",
    "train.report_to=none", "data.val_images_per_prompt=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(out, method="draft", *overrides) -> RewardFinetuneConfig:
    return load_config(RewardFinetuneConfig, TINY, [*FAST, f"method.name={method}", f"train.output_dir={out}", *overrides])


_RUNS: dict = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train each method once per module (15 steps) and keep the trainer, its metrics and the
    parameters from before training."""

    def get(method):
        if method not in _RUNS:
            out = tmp_path_factory.mktemp(method)
            extra = ["train.report_to=tensorboard"] if method == "draft" else []
            trainer = RewardFinetuner(make_config(out, method, "train.max_steps=15", *extra))
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            summary = trainer.train()
            _RUNS[method] = (trainer, before, summary, read_jsonl(out / "metrics.jsonl"))
        return _RUNS[method]

    return get


@pytest.mark.parametrize("method", ["rwr", "draft", "draft-lv", "alignprop", "refl"])
def test_each_method_raises_the_training_reward_and_logs_the_eval_reward(trained, method):
    _, _, summary, rows = trained(method)
    val = [r for r in rows if "val/reward/mean" in r]
    assert [r["step"] for r in val] == [0, 15]
    # The training reward on fixed validation prompts and seeds rises.
    start, end = val[0]["val/reward/mean"], val[-1]["val/reward/mean"]
    assert end > start + 0.05, (method, start, end)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 16))
    pre = "x0/" if method == "refl" else ""  # ReFL's training rewards score the one-step x̂0
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert math.isfinite(r[f"{pre}rewards/aesthetic-tiny/mean"])
        # The held-out evaluation reward is scored on the same samples at every step...
        assert math.isfinite(r[f"{pre}rewards/eval/hpsv2-tiny/mean"])
    # ...and on the validation prompts.
    assert all(math.isfinite(r["val/rewards/eval/hpsv2-tiny/mean"]) for r in val)
    assert summary["step"] == 15 and Path(summary["lora"]).is_file()


def test_only_lora_parameters_change(trained):
    trainer, before, _, _ = trained("draft")
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n].detach()) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n].detach()) for n in before if "lora_" not in n)
    assert all(not p.requires_grad for p in trainer.pipe.vae.parameters())
    assert all(not p.requires_grad and p.grad is None for p in trainer.reward.parameters())


def test_tensorboard_has_the_reward_tags(trained):
    trainer, _, _, _ = trained("draft")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(trainer.output_dir / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    acc = EventAccumulator(files[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rewards/aesthetic-tiny/mean", "rewards/eval/hpsv2-tiny/mean", "val/reward/mean", "loss"} <= tags
    assert len(acc.Scalars("rewards/aesthetic-tiny/mean")) == 15


def test_exported_lora_loads_into_a_fresh_pipeline(trained):
    from alignment.pipelines import PipelineAdapter
    from alignment.tiny import tiny_sd_pipeline

    trainer, _, summary, _ = trained("draft")
    fresh = tiny_sd_pipeline(seed=0)
    base = tiny_sd_pipeline(seed=0)
    fresh.load_lora_weights(str(Path(summary["lora"]).parent))
    ad = PipelineAdapter(fresh)
    cond = ad.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        tuned = trainer.model(x, t, encoder_hidden_states=cond.embeds).sample
        loaded = fresh.unet(x, t, encoder_hidden_states=cond.embeds).sample
        original = base.unet(x, t, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(loaded, tuned, rtol=1e-4, atol=1e-5)
    assert (loaded - original).abs().max() > 1e-4


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    common = ["train.max_steps=4", "train.save_every=2", "train.gradient_accumulation_steps=2", "data.val_prompts=[a cat]",
              "data.val_images_per_prompt=1"]
    full = RewardFinetuner(make_config(tmp_path / "full", "draft", *common))
    full.train()

    class Interrupt(Exception):
        pass

    first = RewardFinetuner(make_config(tmp_path / "split", "draft", *common))
    original = first._micro_step

    def micro_step(step, micro):
        if step == 3:  # after the checkpoint at step 2 was written, in the middle of step 3
            raise Interrupt
        return original(step, micro)

    monkeypatch.setattr(first, "_micro_step", micro_step)
    with pytest.raises(Interrupt):
        first.train()
    second = RewardFinetuner(make_config(tmp_path / "split", "draft", *common))
    second.train(resume=True)

    a = dict(full.model.named_parameters())
    b = dict(second.model.named_parameters())
    for n in a:
        if "lora_" in n:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)
    rows_a = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    rows_b = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for k in ("loss", "reward/mean", "val/reward/mean"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], abs=1e-5), (k, ra["step"])


def test_unknown_method_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'drafft' \(method.name\). Did you mean 'draft'\?"):
        RewardFinetuner(make_config(tmp_path, "drafft"))


def test_rwr_refuses_a_batch_of_one(tmp_path):
    cfg = make_config(tmp_path, "rwr")
    cfg.train.batch_size = 1
    with pytest.raises(ValueError, match=r"method rwr needs train.batch_size >= 2"):
        RewardFinetuner(cfg)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_refuse_a_non_differentiable_reward(tmp_path, method):
    with pytest.raises(ValueError, match=rf"method '{method}' backpropagates through the reward, but \['brightness'\] "
                                         r"is not differentiable.*Use method=rwr"):
        RewardFinetuner(make_config(tmp_path, method), reward=Brightness())


def test_rwr_trains_on_a_non_differentiable_reward_with_prior_and_anchor(tmp_path):
    cfg = make_config(tmp_path, "rwr", "train.max_steps=2", "method.rwr_weighting=exp", "method.prior_weight=0.5",
                      "method.prior_source=base", "method.anchor_weight=1.0", "data.val_prompts=[a cat]")
    trainer = RewardFinetuner(cfg, reward=Brightness())
    trainer.train()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert "rewards/brightness/mean" in rows[0]
    # LoRA starts at the base model (B = 0), so the anchor is 0 before the first update and > 0 after.
    assert rows[0]["anchor_l2"] == 0.0 and rows[1]["anchor_l2"] > 0.0


def test_sdxl_draft_with_anchor_and_composite_reward(tmp_path):
    cfg = make_config(tmp_path, "draft", "model.tiny=sdxl", "train.max_steps=2", "method.anchor_weight=1.0",
                      "reward.terms={aesthetic-tiny: 1.0, pickscore-tiny: 0.5}", "sampling.guidance_scale=3.0",
                      "data.val_prompts=[a cat]", "data.val_images_per_prompt=1")
    trainer = RewardFinetuner(cfg)
    trainer.train()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert {"rewards/aesthetic-tiny/mean", "rewards/pickscore-tiny/mean", "anchor_l2"} <= set(rows[-1])
    # Per-term normalisation set each term's shift/scale from the first batch.
    assert all(t.scale != 1.0 and t.shift != 0.0 for t in trainer.reward.terms)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_full_finetuning_without_lora(tmp_path):
    cfg = make_config(tmp_path, "draft", "lora.enabled=false", "train.max_steps=1", "train.lr=1e-4",
                      "method.anchor_weight=1.0", "data.val_prompts=[a cat]", "data.val_images_per_prompt=1")
    trainer = RewardFinetuner(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) > len(before) // 2
    assert (tmp_path / "unet" / "config.json").is_file()


def test_cli_errors_and_run(tmp_path, capsys):
    from alignment.cli import main

    with pytest.raises(SystemExit):
        main(["train-reward", "--method", "dpo", "--config", str(TINY)])
    assert "invalid choice: 'dpo'" in capsys.readouterr().err
    assert main(["train-reward", "--config", str(TINY), "method.name=rfl"]) == 1
    assert "unknown method 'rfl' (method.name). Did you mean 'refl'?" in capsys.readouterr().err
    rc = main(["train-reward", "--method", "refl", "--config", str(TINY), "--output-dir", str(tmp_path), *FAST,
               "train.max_steps=1", "data.val_prompts=[a cat]", "data.val_images_per_prompt=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert '"method": "refl"' in out and (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "curves.png").is_file()  # training curves drawn at the end


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/**/*reward*.yaml")))
def test_shipped_reward_configs_are_valid(path):
    from alignment.trainers.reward_finetune import check_method

    cfg = load_config(RewardFinetuneConfig, ROOT / path)
    check_method(cfg.method, cfg.sampling)
    assert cfg.reward.terms and (cfg.model.tiny or cfg.model.pipeline)


def test_example_script_runs(tmp_path, monkeypatch):
    import runpy

    monkeypatch.setattr("sys.argv", ["train_reward.py", "--method", "draft-lv", "--config", str(TINY), "--output-dir",
                                     str(tmp_path), *FAST, "train.max_steps=1", "data.val_prompts=[a cat]",
                                     "data.val_images_per_prompt=1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "examples" / "train_reward.py"), run_name="__main__")
    assert e.value.code == 0 and (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_memory_benchmark_tiny(capsys):
    from examples.benchmarks.reward_finetune_memory import main

    assert main(["--tiny", "--forms", "k1,k1-nockpt,k5-nockpt", "--steps", "1", "--warmup", "0", "--num-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "command: python" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("k1", "k1-nockpt", "k5-nockpt")}
    graph = {k: float(v[5]) for k, v in rows.items()}
    # Without checkpointing the graph grows with K; checkpointing keeps it below K = 1's.
    assert graph["k5-nockpt"] > 2.5 * graph["k1-nockpt"] > 2.5 * graph["k1"]


DDP_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from alignment.configs import load_config
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
out = sys.argv[1]
cfg = load_config(RewardFinetuneConfig, sys.argv[2], sys.argv[3:] + [f"train.output_dir={out}"])
tr = RewardFinetuner(cfg)
tr.train()
rank = tr.accelerator.process_index
lora = torch.cat([p.detach().flatten() for p in tr.params])
json.dump({"world": tr.accelerator.num_processes, "lora": lora.tolist(), "prompts": tr._pick_prompts(0, 0)},
          open(f"{out}/rank{rank}.json", "w"))
"""


def test_two_processes_keep_identical_lora_weights(tmp_path):
    """Gradients are reduced by DDP (every UNet call with gradients goes through the prepared module):
    two CPU processes sampling different prompts must end with the same LoRA weights."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script),
           str(tmp_path), str(TINY), *FAST, "train.max_steps=2", "data.val_prompts=[a cat]", "data.val_images_per_prompt=1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["prompts"] != r1["prompts"]  # each process samples its own prompts
    torch.testing.assert_close(torch.tensor(r0["lora"]), torch.tensor(r1["lora"]), rtol=0, atol=1e-7)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
