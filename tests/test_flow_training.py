"""Diffusion-DPO and reward fine-tuning on the flow-matching families (tiny SD3 and FLUX.1-dev):
DPO lowers its loss with winner and loser sharing noise and σ, every reward-gradient method and RWR
raise the reward through the flow ODE sampler, the exported LoRA loads with `load_lora_weights` into a
freshly built pipeline of the same family and reproduces the trained model, FLUX-dev CFG settings warn."""

from pathlib import Path

import pytest
import torch

from alignment.configs import load_config
from alignment.pipelines import PipelineAdapter
from alignment.tiny import tiny_pipeline
from alignment.trainers.common import build_pipeline, check_guidance_settings, read_jsonl, unwrap
from alignment.trainers.dpo import DPOConfig, DPOTrainer, make_synthetic_pairs
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
from reward_plugins.base import RewardModel

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.validate_every=0", "train.save_every=0", "train.report_to=none"]
FAMILIES = ["sd3", "flux"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_synthetic_pairs(tmp_path_factory.mktemp("flow_pairs") / "pairs.parquet", 16, resolution=32)


def dpo_config(family, pairs_path, *overrides):
    return load_config(DPOConfig, ROOT / "configs" / "tiny" / f"dpo_{family}.yaml",
                       [f"data.path={pairs_path}", "data.synthetic_pairs=0", *QUIET, *overrides])


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_dpo_learns_the_preference_and_exports_a_loadable_lora(tmp_path, pairs, family):
    cfg = dpo_config(family, pairs, "train.max_steps=20")
    pipe = build_pipeline(cfg.model, "cpu")
    pipe.vae.register_to_config(scaling_factor=1.0)  # as the SD test: a random VAE's latents are too close
    trainer = DPOTrainer(cfg, output_dir=tmp_path, pipe=pipe)
    assert trainer.adapter.is_flow and trainer.adapter.family == family
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora" not in n}
    before = trainer.evaluate(num_batches=8)
    assert before["implicit_acc"] == 0.5 and before["reward_margin"] == 0.0  # policy == reference at step 0
    trainer.train()
    after = trainer.evaluate(num_batches=8)
    assert after["loss"] < before["loss"] - 0.1 and after["implicit_acc"] >= 0.7, after
    for n, p in pipe.transformer.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    # the exported LoRA, loaded by diffusers into a freshly built pipeline, is the trained model
    from alignment.trainers.common import export_lora

    lora_dir = export_lora(pipe, trainer.model, tmp_path / "lora").parent
    fresh = tiny_pipeline(family)
    fresh.vae.register_to_config(scaling_factor=1.0)
    original = tiny_pipeline(family)
    fresh.load_lora_weights(str(lora_dir))
    ad, ad_fresh, ad_orig = PipelineAdapter(pipe), PipelineAdapter(fresh), PipelineAdapter(original)
    ad_fresh.max_sequence_length = ad_orig.max_sequence_length = trainer.adapter.max_sequence_length
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(600.0)
    with torch.no_grad():
        cond = trainer.adapter.encode_prompts(["a cat"])
        tuned = ad.predict(x, t, cond, model=unwrap(trainer.model))
        loaded = ad_fresh.predict(x, t, ad_fresh.encode_prompts(["a cat"]))
        untouched = ad_orig.predict(x, t, ad_orig.encode_prompts(["a cat"]))
    torch.testing.assert_close(loaded, tuned, rtol=1e-4, atol=1e-5)
    assert (loaded - untouched).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_winner_and_loser_share_noise_and_sigma(tmp_path, pairs, family):
    trainer = DPOTrainer(dpo_config(family, pairs, "train.max_steps=1"), output_dir=tmp_path)
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []
    original = trainer.adapter.add_noise

    def spy(latents, noise, t):
        seen.append((noise, t))
        return original(latents, noise, t)

    trainer.adapter.add_noise = spy
    batch = {"pixel_w": img, "pixel_l": img.clone(), "caption": ["a", "b"]}
    with torch.no_grad():
        loss, metrics = trainer.pair_losses(batch, torch.Generator().manual_seed(1))
    noise, t = seen[0]
    assert torch.equal(noise[:2], noise[2:]) and torch.equal(t[:2], t[2:])
    assert t.dtype.is_floating_point and (t > 0).all() and (t <= 1000).all()  # σ·1000 from the flow schedule
    # identical images with shared noise and σ: identical errors, zero margin, loss log 2
    assert metrics["reward_margin"] == 0.0 and abs(float(loss) - 0.6931) < 1e-3


class Brightness(RewardModel):
    """A differentiable reward a tiny random pipeline can move in a few steps (its aesthetic-tiny signal is
    buried in validation noise on the flow models); normalised by the trainer like any term."""

    dimensions = ("brightness",)
    default_dimension = "brightness"
    is_differentiable = True
    requires_prompts = False

    def compute(self, images, prompts):
        return {"brightness": images.mean((1, 2, 3))}


def reward_config(family, out, method, *overrides):
    fast = ["reward.normalize=true", "train.lr=1e-2", "train.validate_every=0", "train.save_every=0",
            "train.report_to=none", "data.val_images_per_prompt=2", "train.max_steps=10", "sampling.guidance_scale=1.0"]
    cfg = load_config(RewardFinetuneConfig, ROOT / "configs" / "tiny" / f"reward_draft_{family}.yaml",
                      [*fast, f"method.name={method}", f"train.output_dir={out}", *overrides])
    cfg.eval_reward = None
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["draft", "draft-lv", "alignprop", "refl"])
def test_each_method_raises_the_reward_on_flow_models(tmp_path, family, method):
    trainer = RewardFinetuner(reward_config(family, tmp_path, method), reward=Brightness())
    assert trainer.adapter.is_flow
    summary = trainer.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    val = [r["val/reward/mean"] for r in rows if "val/reward/mean" in r]
    # normalised units (std of the base model's rewards): on fixed validation prompts and seeds
    assert len(val) == 2 and val[1] > val[0] + 0.2, (family, method, val)
    assert Path(summary["lora"]).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_rwr_trains_on_the_rectified_flow_forward_process(tmp_path, family):
    trainer = RewardFinetuner(reward_config(family, tmp_path, "rwr", "train.max_steps=2", "train.batch_size=2"),
                              reward=Brightness())
    ad, seen = trainer.adapter, []
    add_noise, target = ad.add_noise, ad.target

    def spy_noise(x0, eps, t):
        seen.append(t)
        xt = add_noise(x0, eps, t)
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(xt, (1 - sigma) * x0 + sigma * eps)
        return xt

    def spy_target(x0, eps, t):
        out = target(x0, eps, t)
        torch.testing.assert_close(out, eps - x0)
        return out

    ad.add_noise, ad.target = spy_noise, spy_target
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n}
    trainer.train()
    assert seen and all(t.dtype.is_floating_point and ((t > 0) & (t <= 1000)).all() for t in seen)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora" in n)


def test_flux_dev_cfg_settings_warn_or_fail():
    ad = PipelineAdapter(tiny_pipeline("flux"))
    with pytest.warns(UserWarning, match="no classifier-free guidance; the value goes into its distilled guidance"):
        check_guidance_settings(ad, {"sampling.guidance_scale": 7.5})
    with pytest.raises(ValueError, match="guidance-distilled and samples without classifier-free guidance"):
        check_guidance_settings(ad, {"data.caption_dropout": 0.2})
    schnell = PipelineAdapter(tiny_pipeline("flux", guidance_embeds=False))
    with pytest.warns(UserWarning, match="is ignored: this flux transformer has no guidance embedding"):
        check_guidance_settings(schnell, {"validation.guidance_scale": 3.5})
    check_guidance_settings(PipelineAdapter(tiny_pipeline("sd3")), {"data.caption_dropout": 0.2})  # SD3 uses CFG


def test_a_flux_reward_recipe_with_cfg_guidance_warns(tmp_path):
    cfg = reward_config("flux", tmp_path, "draft", "sampling.guidance_scale=7.5", "train.max_steps=1")
    with pytest.warns(UserWarning, match="sampling.guidance_scale=7.5"):
        RewardFinetuner(cfg)


@pytest.mark.parametrize("name", ["sd35m_lora_dpo.yaml", "flux_dev_lora_dpo.yaml"])
def test_flow_dpo_recipes_parse(name):
    from alignment.trainers.dpo import check_config

    cfg = load_config(DPOConfig, ROOT / "configs" / name)
    check_config(cfg)
    assert cfg.model.pipeline and cfg.lora.enabled and cfg.dpo.beta > 0
    assert cfg.model.weighting_scheme == ("logit_normal" if name.startswith("sd35m") else "none")


def test_sd3_dpo_trains_with_caption_dropout_and_flux_dev_refuses_it(tmp_path, pairs):
    # SD3 uses CFG: empty captions train its unconditional branch (the empty prompt through all three encoders)
    trainer = DPOTrainer(dpo_config("sd3", pairs, "train.max_steps=2", "data.caption_dropout=0.5"), output_dir=tmp_path / "sd3")
    trainer.train()
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="data.caption_dropout=0.5: flux is guidance-distilled"):
        DPOTrainer(dpo_config("flux", pairs, "data.caption_dropout=0.5"), output_dir=tmp_path / "flux")
    with pytest.warns(UserWarning, match="validation.guidance_scale=7.5"):
        DPOTrainer(dpo_config("flux", pairs, "validation.guidance_scale=7.5"), output_dir=tmp_path / "flux2")


@pytest.mark.parametrize("family,method", [("flux", "alignprop"), ("sd3", "rwr")])
def test_flow_reward_training_resumes_exactly(tmp_path, monkeypatch, family, method):
    common = ["train.max_steps=4", "train.save_every=2", "data.val_prompts=[a cat]", "data.val_images_per_prompt=1"]
    full = RewardFinetuner(reward_config(family, tmp_path / "full", method, *common), reward=Brightness())
    full.train()

    class Interrupt(Exception):
        pass

    first = RewardFinetuner(reward_config(family, tmp_path / "split", method, *common), reward=Brightness())
    original = first._micro_step

    def micro_step(step, micro):
        if step == 3:  # after the checkpoint at step 2
            raise Interrupt
        return original(step, micro)

    monkeypatch.setattr(first, "_micro_step", micro_step)
    with pytest.raises(Interrupt):
        first.train()
    second = RewardFinetuner(reward_config(family, tmp_path / "split", method, *common), reward=Brightness())
    second.train(resume=True)
    a, b = dict(full.model.named_parameters()), dict(second.model.named_parameters())
    for n in a:
        if "lora_" in n:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)
