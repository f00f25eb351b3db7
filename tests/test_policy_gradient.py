"""Policy-gradient trainer (DDPO / Flow-GRPO) on tiny random pipelines with a non-differentiable reward."""

import json
import math

import pytest
import torch
from trainer_helpers import CenterBright

from alignment.configs import load_config
from alignment.trainers.policy_gradient import PolicyGradientConfig, PolicyGradientTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/tiny/rl_ddpo.yaml"
FAST = [
    "train.report_to=none", "train.max_steps=2", "train.validate_every=0", "train.save_every=1",
    "train.batch_size=4", "train.gradient_accumulation_steps=1", "method.group_size=2",
    "method.prompts_per_epoch=2", "method.inner_epochs=1", "method.contact_sheet_every=0",
    "method.train_steps=all", "sampling.num_steps=2", "sampling.batch_size=4", "train.lr=1e-2",
]


class SometimesNaN(CenterBright):
    """Every third call's first score is NaN (a flaky remote judge)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def compute(self, images, prompts):
        out = super().compute(images, prompts)
        self.calls += 1
        out["score"] = out["score"].clone()
        out["score"][0] = float("nan")
        return out


def _cfg(*extra):
    cfg = load_config(PolicyGradientConfig, CONFIG, FAST + list(extra))
    cfg.eval_reward = None
    return cfg


def _lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ddpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpo")
    trainer = PolicyGradientTrainer(_cfg(), reward=CenterBright(), output_dir=str(out))
    summary = trainer.train()
    return trainer, summary, out


def test_ddpo_trains_and_the_first_ratio_is_exactly_one(ddpo_run):
    trainer, summary, out = ddpo_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["policy/ratio_dev_first"] == 0.0  # the first inner epoch's ratio is exactly 1
        assert r["policy/logprob_recompute_err"] < 1e-5  # recomputed log-probs equal the recorded ones
        assert math.isfinite(r["loss"]) and r["reward/nan_count"] == 0
        assert 0 <= r["reward/mean"] <= 1
    lora = _lora_state(trainer)
    assert lora and any(float(v.abs().max()) > 0 for n, v in lora.items() if "lora_B" in n)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and summary["epochs"] == 2


def test_resume_equals_an_uninterrupted_run(ddpo_run, tmp_path):
    full, _, _ = ddpo_run
    first = PolicyGradientTrainer(_cfg("train.max_steps=1"), reward=CenterBright(), output_dir=str(tmp_path))
    first.train()
    resumed = PolicyGradientTrainer(_cfg(), reward=CenterBright(), output_dir=str(tmp_path))
    assert resumed.train(resume=True)["epochs"] == 2
    a, b = _lora_state(full), _lora_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exported_lora_loads_with_load_lora_weights(ddpo_run):
    from alignment.tiny import tiny_sd_pipeline

    trainer, _, out = ddpo_run
    fresh = tiny_sd_pipeline()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = trainer.adapter.encode_prompts(["a cat"])
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=cond.embeds).sample
        fresh.load_lora_weights(str(out))
        loaded = fresh.unet(x, t, encoder_hidden_states=cond.embeds).sample
        trained = trainer.model(x, t, encoder_hidden_states=cond.embeds).sample
    assert not torch.allclose(base, loaded)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)


def test_one_update_moves_log_probs_towards_positive_advantages(tmp_path):
    """The policy-gradient direction: after an update, Σ A_i Δ log p_i over the trained transitions > 0."""
    trainer = PolicyGradientTrainer(_cfg("train.lr=3e-3", "method.clip_range=10.0"), reward=CenterBright(),
                                    output_dir=str(tmp_path))
    ro = trainer.sample_epoch(0)
    adv, _, valid = trainer.advantages(ro)
    assert adv.abs().sum() > 0

    def logps():
        out = []
        with torch.no_grad():
            for j in range(trainer.sampler.num_steps):
                cond, uncond = trainer._encode([trainer.prompts[i] for i in ro.prompt_ids.tolist()])
                predict = trainer._predictor(trainer.model, cond, uncond)
                from alignment.sampling_logprob import transition

                step = torch.full((len(adv),), j)
                out.append(transition(trainer.sampler, predict, ro.traj.latents[:, j], ro.traj.latents[:, j + 1], step).log_prob)
        return torch.stack(out, 1)

    before = logps()
    torch.testing.assert_close(before, ro.traj.log_probs, atol=0, rtol=0)
    trainer.train_on(ro, adv, valid, 0)
    delta = logps() - before
    assert float((adv[:, None] * delta).sum()) > 0


def test_nan_rewards_are_skipped_and_counted(tmp_path):
    reward = SometimesNaN()
    trainer = PolicyGradientTrainer(_cfg("train.max_steps=1", "sampling.reward_batch_size=2"), reward=reward,
                                    output_dir=str(tmp_path))
    summary = trainer.train()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/nan_count"] == 2 and summary["nan_rewards"] == 2  # 4 samples, 2 reward calls
    assert math.isfinite(row["reward/mean"]) and math.isfinite(row["loss"])
    assert all(torch.isfinite(v).all() for v in _lora_state(trainer).values())


def test_bad_inputs_are_refused_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="group_size is 1"):
        PolicyGradientTrainer(_cfg("method.group_size=1"), reward=CenterBright(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="prompt list has 2 prompt"):
        PolicyGradientTrainer(_cfg("data.prompts=[a cat, a dog]", "method.prompts_per_epoch=3"),
                              reward=CenterBright(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="use method.name=ddpo"):
        PolicyGradientTrainer(_cfg("method.name=grpo"), reward=CenterBright(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="method.train_steps must be one of"):
        PolicyGradientTrainer(_cfg("method.train_steps=some"), reward=CenterBright(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sampling.eta must be > 0"):
        PolicyGradientTrainer(_cfg("sampling.eta=0.0"), reward=CenterBright(), output_dir=str(tmp_path))


def test_group_size_one_trains_with_running_statistics(tmp_path):
    cfg = _cfg("method.group_size=1", "method.advantage=running", "method.running_min_count=2",
               "method.prompts_per_epoch=4", "train.max_steps=1")
    summary = PolicyGradientTrainer(cfg, reward=CenterBright(), output_dir=str(tmp_path)).train()
    assert summary["epochs"] == 1 and math.isfinite(summary["last"]["loss"])


def test_window_of_steps_with_ode_outside_and_kl(tmp_path):
    cfg = _cfg("sampling.num_steps=3", "method.train_steps=window", "method.window_size=1",
               "method.kl_weight=0.1", "train.max_steps=1")
    trainer = PolicyGradientTrainer(cfg, reward=CenterBright(), output_dir=str(tmp_path))
    ro = trainer.sample_epoch(1)
    # epoch 1's window is step 1: only that transition is stochastic
    assert (ro.traj.log_probs[:, [0, 2]] == 0).all() and (ro.traj.log_probs[:, 1] != 0).all()
    adv, _, valid = trainer.advantages(ro)
    stats = trainer.train_on(ro, adv, valid, 1)
    assert stats["kl"] == 0.0  # before the first update the policy is the reference
    assert stats["policy/ratio_dev_first"] == 0.0 and stats["policy/logprob_recompute_err"] < 1e-5


@pytest.mark.parametrize("family,kind", [("sd3", "sde"), ("sd3", "cps"), ("flux", "sde")])
def test_grpo_on_tiny_flow_pipelines(family, kind, tmp_path):
    from alignment.tiny import tiny_pipeline

    cfg = _cfg("method.name=grpo", f"sampling.flow_kind={kind}", "sampling.num_steps=3", "train.max_steps=1",
               "method.kl_weight=0.04", "method.global_std=true", "sampling.guidance_scale=3.0")
    trainer = PolicyGradientTrainer(cfg, reward=CenterBright(), output_dir=str(tmp_path), pipe=tiny_pipeline(family))
    assert trainer.adapter.is_flow
    # CPS's last step (σ' = 0) is deterministic and never trained
    assert trainer.has_noise.tolist() == ([True, True, False] if kind == "cps" else [True, True, True])
    summary = trainer.train()
    row = summary["last"]
    assert row["policy/ratio_dev_first"] == 0.0 and row["policy/logprob_recompute_err"] < 1e-5
    assert math.isfinite(row["loss"]) and row["kl"] >= 0
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ValueError, match="use method.name=grpo"):
        PolicyGradientTrainer(_cfg(), reward=CenterBright(), output_dir=str(tmp_path), pipe=tiny_pipeline(family))


@pytest.mark.parametrize("path", ["configs/sd15_ddpo_aesthetic.yaml", "configs/sd35m_grpo_lescore.yaml",
                                  "configs/flux_grpo_lescore.yaml"])
def test_real_recipes_load_and_validate(path, shared_data):
    from alignment.trainers.policy_gradient import check_policy
    from alignment.trainers.reward_finetune import read_prompts

    cfg = load_config(PolicyGradientConfig, path)
    prompts = read_prompts(cfg.data.prompts, cfg.data.prompts_file, "data.prompts")
    check_policy(cfg.method, cfg.sampling, len(prompts))
    assert (cfg.method.prompts_per_epoch * cfg.method.group_size) % 8 == 0  # laid out for 8 processes
    assert cfg.method.name == ("ddpo" if "sd15" in path else "grpo")


def test_ema_is_updated_checkpointed_and_resumed(tmp_path):
    full = PolicyGradientTrainer(_cfg("train.ema_decay=0.9"), reward=CenterBright(), output_dir=str(tmp_path / "a"))
    full.train()
    assert full.ema is not None and full.ema.num_updates == 2 * full.updates_per_epoch
    PolicyGradientTrainer(_cfg("train.ema_decay=0.9", "train.max_steps=1"), reward=CenterBright(),
                          output_dir=str(tmp_path / "b")).train()
    resumed = PolicyGradientTrainer(_cfg("train.ema_decay=0.9"), reward=CenterBright(), output_dir=str(tmp_path / "b"))
    resumed.train(resume=True)
    assert resumed.ema.num_updates == full.ema.num_updates
    for a, b in zip(full.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family,prediction_type", [("sdxl", None), ("sd", "v_prediction")])
def test_ddpo_on_sdxl_and_v_prediction(family, prediction_type, tmp_path):
    from alignment.tiny import tiny_pipeline

    pipe = tiny_pipeline(family, prediction_type=prediction_type)
    trainer = PolicyGradientTrainer(_cfg("train.max_steps=1"), reward=CenterBright(), output_dir=str(tmp_path), pipe=pipe)
    row = trainer.train()["last"]
    assert row["policy/ratio_dev_first"] == 0.0 and row["policy/logprob_recompute_err"] < 1e-5
    assert math.isfinite(row["loss"])
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_shared_noise_starts_a_group_from_one_noise(tmp_path):
    trainer = PolicyGradientTrainer(_cfg("method.shared_noise=true", "method.group_size=3"), reward=CenterBright(),
                                    output_dir=str(tmp_path))
    ro = trainer.sample_epoch(0)
    start, final = ro.traj.latents[:, 0], ro.traj.final
    assert ro.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2])  # one starting noise per group
    assert not torch.equal(start[0], start[3])  # another group, another noise
    assert not torch.allclose(final[0], final[1])  # the step noise still differs within the group
