"""Every training method moves the toy world's oracle the right way on a small budget (issue 12's regression test).

Each test starts from the shipped toy pipeline (`models.load_pipeline()`), trains with the public trainer API
at a budget of seconds, and compares the soft oracle (`toyworld`, per dimension) on a fixed set of training
captions x fixed seeds before and after: the same captions, seeds and sampler, so the difference is the
model's, not sampling noise. A method whose loss does not learn (a gradient of ~0, like the unscaled IPO
loss of old, or a sign error) leaves the model where it was, and the assertion fails. Diffusion-DPO is judged
on held-out oracle-ranked pairs (its implicit reward must prefer the oracle's winner) and must not damage the
sampled images. Methods that do not move the oracle at this budget (RWR, DDPO; DRaFT-LV and AlignProp
within noise) are expected failures, with the measurements and the reason at each.

Thresholds were set from measurements (comments at each budget): the effect at the chosen budget with the
test's seed and with other training seeds, so that a working method passes with a margin while a method that
does not learn cannot. Run them alone with ``pytest -m efficacy``; they are part of ``make test``.
The full-size numbers (held-out exact oracle, +10 points bar) are the efficacy benchmark's,
`examples/benchmarks/efficacy.py`.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from alignment.best_of_n import best_of_n
from alignment.toyworld import models, world
from examples.benchmarks.efficacy_methods.registry import LORA_TARGETS
from reward_plugins import create_reward

pytestmark = [pytest.mark.efficacy, pytest.mark.usefixtures("one_thread")]

PROMPTS = world.train_prompts()[::6]  # 12 of the 72 training captions: trained on, and measured on
IMAGES = 4  # measurement images per caption (48 in all), fixed seeds, the same before and after
MEASURE_SEED = 777  # image j of caption i: MEASURE_SEED + i * IMAGES + j (training draws its own seeds)
DIMS = ("color", "shape", "position", "overall")
# The training seed of every test; TOYTEST_SEED=1 (2, ...) reruns the file with another one, which is how the
# noise behind each threshold was measured.
SEED = int(os.environ.get("TOYTEST_SEED", "0"))


def measure(pipe) -> dict[str, torch.Tensor]:
    """The soft oracle per dimension on PROMPTS x IMAGES fixed seeds (48 values per dimension)."""
    with torch.no_grad():
        res = best_of_n(pipe, PROMPTS, create_reward("toyworld"), IMAGES, k=1, batch_size=48, seed=MEASURE_SEED,
                        num_inference_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE,
                        progress=False)
    return {d: res.per_dim[d].flatten().float() for d in DIMS}


def gains(before: dict, after: dict) -> dict[str, float]:
    return {d: float((after[d] - before[d]).mean()) for d in DIMS}


@pytest.fixture(scope="module")
def base(one_thread):
    return models.load_pipeline()


@pytest.fixture(scope="module")
def before(base):
    return measure(base)


def sections(tmp_path, steps: int, lr: float, batch: int):
    from alignment.trainers.common import LoraSection, ModelSection, TrainSection

    return (ModelSection(pipeline=str(models.PIPELINE_DIR)), LoraSection(rank=8, target_modules=list(LORA_TARGETS)),
            TrainSection(seed=SEED, lr=lr, max_steps=steps, batch_size=batch, save_every=0, log_every=1,
                         validate_every=0, output_dir=str(tmp_path / "run"), report_to="none", max_grad_norm=1.0,
                         weight_decay=0.0))


def reward_finetune(base, tmp_path, method: str, reward: str, steps: int, lr: float, batch: int,
                    lora_targets: list[str] | None = None, **method_kw):
    """`RewardFinetuner` on a copy of the base pipeline, training on PROMPTS; returns the trained pipeline."""
    from alignment.trainers.reward_finetune import (
        DataSection,
        MethodSection,
        RewardFinetuneConfig,
        RewardFinetuner,
        RewardSection,
        SamplingSection,
    )

    model, lora, train = sections(tmp_path, steps, lr, batch)
    if lora_targets is not None:
        lora.target_modules = list(lora_targets)
    cfg = RewardFinetuneConfig(
        model=model, lora=lora, train=train, method=MethodSection(name=method, **method_kw),
        sampling=SamplingSection(num_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE,
                                 scheduler="ddim", checkpoint_unet=False, checkpoint_vae=False),
        reward=RewardSection(terms={reward: 1.0}, normalize=False),
        data=DataSection(prompts=list(PROMPTS), val_prompts=list(PROMPTS[:1])),
    )
    trainer = RewardFinetuner(cfg, pipe=copy.deepcopy(base))
    trainer.train()
    return trainer.pipe


def report(name: str, before: dict, after: dict) -> dict[str, float]:
    g = gains(before, after)
    print(f"{name}: soft oracle gain on {len(PROMPTS)} training captions x {IMAGES} seeds: "
          + ", ".join(f"{d} {float(before[d].mean()):.4f} -> {float(after[d].mean()):.4f} ({g[d]:+.4f})" for d in DIMS))
    return g



# -- reward fine-tuning on the soft oracle ------------------------------------------------------------------------
# Each method trains LoRA rank 8 for 10 steps of batch 4 at lr 1e-3 on the 12 captions (the efficacy benchmark's
# settings, fewer steps). Measured gain of the soft oracle (overall, 48 images) for DRaFT-K (K = 10), training
# seeds 0 / 1: +0.019 / +0.020 (colour +0.07 / +0.06, exact overall on the same images +0.15 / +0.10); trained on
# all 72 captions, measured on 24 x 2: +0.017 / +0.019. At 6 steps it was +0.001 / +0.015 / +0.007 (seeds 0-2):
# too few Adam steps to beat the noise of each step's direction, hence 10. lr 3e-3 (5 steps) fell: -0.04 / -0.10.
# The threshold, +0.008, is under half the smallest gain measured at this budget and above every result of the
# methods below that do not learn here.
#
# DRaFT-LV, ReFL with ImageReward's late x̂0 (steps 8-9 of 10) and AlignProp do not beat that noise at a budget of
# seconds: 10 steps, seed 0: -0.010, -0.011, +0.005; 6 steps, seeds 0-2: -0.007 / +0.013 / +0.004, -0.009 / +0.005 /
# -0.010, +0.002 / +0.016 / -0.012. The efficacy benchmark finds them weak at full size too (50 steps, held-out
# exact overall 0.188 -> 0.222, 0.236, 0.250): DRaFT-LV and late ReFL put the reward's gradient on the last one
# or two of the 10 DDIM steps, where the toy sampler's step moves the image by d x_prev / d eps = -0.012 (README,
# "Gradient methods"). ReFL is tested as its efficacy entry trains: x̂0 at a random step in [2, 5] of 10, where x̂0 is
# already legible and the step still decides the attributes (efficacy_methods/gradient.py `refl`). Each ReFL step
# costs a fraction of a DRaFT-K step, so it gets 40 steps of batch 8 (~27 CPU s): overall gain, seeds 0 / 1 / 2,
# +0.034 / +0.043 / +0.037 (colour +0.06 / +0.12 / +0.09); at 10 or 20 steps of batch 4 it was within noise
# (-0.001 / +0.010, +0.005 / +0.030), at 40 / 80 steps of batch 4 seed 2 fell (-0.019 / -0.020).
# With the fine-tuned decoder shipped on 2026-12-02 (examples/toyworld/finetune_decoder.py; the numbers above are
# the first decoder's), seeds 0 / 1 / 2 (TOYTEST_SEED): DRaFT-K +0.016 (seed 0); DRaFT-LV +0.011 / +0.006 / +0.021;
# AlignProp K ~ U{1..10} -0.005 / +0.014 / +0.030. DRaFT-LV and AlignProp now straddle the threshold, so both are
# non-strict expected failures: a pass on one seed is noise, not a fix.
_WEAK_LAST_STEPS = ("the gradient reaches only the last DDIM step(s), which barely move the toy image (efficacy "
                    "finding): +0.006 to +0.021 over seeds 0-2, around the threshold")
GRADIENT_METHODS = [
    pytest.param("draft", {"k": 10}, id="draft"),
    pytest.param("draft-lv", {"lv_n": 2}, id="draft-lv", marks=pytest.mark.xfail(strict=False, reason=_WEAK_LAST_STEPS)),
    pytest.param("alignprop", {"truncation_range": [1, 10]}, id="alignprop", marks=pytest.mark.xfail(
        strict=False, reason="K ~ U{1..10} averages 5.5 steps: -0.005 to +0.030 over seeds 0-2, around the threshold")),
    pytest.param("refl", {"refl_target": 1.0, "refl_scale": 1.0, "refl_step_range": [2, 5]}, id="refl"),
]
GRADIENT_BUDGETS = {"refl": (40, 8)}  # (steps, batch) where a method's own budget differs from (10, 4)
GRADIENT_MIN_GAIN = 0.008


@pytest.mark.parametrize("method, settings", GRADIENT_METHODS)
def test_reward_gradient_method_raises_the_soft_oracle(base, before, tmp_path, method, settings):
    steps, batch = GRADIENT_BUDGETS.get(method, (10, 4))
    pipe = reward_finetune(base, tmp_path, method, "toyworld", steps=steps, lr=1e-3, batch=batch, **settings)
    g = report(method, before, measure(pipe))
    assert g["overall"] >= GRADIENT_MIN_GAIN, (
        f"{method} did not raise the soft oracle it trains on: overall {g['overall']:+.4f} (needs >= "
        f"+{GRADIENT_MIN_GAIN})")


# RWR as its efficacy entry trains, at a budget of seconds: the offline pool (8 base images of each of the 12
# captions, scored once by the soft oracle, the best 2 kept and re-encoded by the VAE), LoRA on RWR_LORA_TARGETS,
# 30 steps of batch 8, lr 1e-3 (~33 CPU s). Measured (seed 0): overall -0.012 (colour -0.021, shape -0.027,
# position +0.011); with the attention-only LoRA -0.025. Online on its own samples (the first entry, 5 steps,
# seeds 0 / 1 / 2): +0.000 / -0.005 / -0.009. At full size the re-encoded pool no longer loses systematically but
# does not gain reliably either (held-out exact 0.111-0.326 over pools and seeds, efficacy_methods/rwr.py), so this
# is expected to fail; strict, so that a fix shows up as an unexpected pass.
@pytest.mark.xfail(strict=True, reason="RWR does not move the toy oracle reliably (efficacy finding): fitting "
                                       "reward-selected samples with the denoising loss learns too slowly here")
def test_rwr_raises_the_soft_oracle(base, before, tmp_path):
    from examples.benchmarks.efficacy_methods.rwr import RWR_LORA_TARGETS

    pipe = reward_finetune(base, tmp_path, "rwr", "toyworld", steps=30, lr=1e-3,
                           batch=8, lora_targets=RWR_LORA_TARGETS, rwr_samples="pool", rwr_pool_size=8,
                           rwr_weighting="topk", rwr_top_fraction=0.25, rwr_reencode=True)
    g = report("rwr", before, measure(pipe))
    assert g["overall"] >= GRADIENT_MIN_GAIN, f"rwr: soft oracle overall {g['overall']:+.4f}"



def ddpo(base, tmp_path, reward: str, epochs: int, lr: float, group: int = 4, prompts: int = 4, batch: int = 16,
         clip_range: float = 1e-2):
    """`PolicyGradientTrainer` (DDPO, DDIM eta = 1 rollouts, group advantages) on a copy of the base pipeline."""
    from alignment.trainers.policy_gradient import (
        PGSamplingSection,
        PolicyGradientConfig,
        PolicyGradientTrainer,
        PolicySection,
    )
    from alignment.trainers.reward_finetune import DataSection, RewardSection

    model, lora, train = sections(tmp_path, epochs, lr, batch)
    cfg = PolicyGradientConfig(
        model=model, lora=lora, train=train,
        method=PolicySection(name="ddpo", group_size=group, prompts_per_epoch=prompts, clip_range=clip_range),
        sampling=PGSamplingSection(num_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE, eta=1.0,
                                   batch_size=64, reward_batch_size=64),
        reward=RewardSection(terms={reward: 1.0}, normalize=False),
        data=DataSection(prompts=list(PROMPTS), val_prompts=list(PROMPTS[:1])),
    )
    cfg.eval_reward = None
    pipe = copy.deepcopy(base)
    PolicyGradientTrainer(cfg, pipe=pipe).train()
    return pipe


# DDPO needs only reward values; it trains on the soft oracle here (denser than the exact 0/1). 3 epochs of
# 4 captions x G = 4 (one update each), lr 1e-3, clip 1e-2: overall -0.003 / -0.007 / +0.004 (seeds 0-2);
# 4 epochs with 4 updates each (batch 4, clip 0.05, 25 CPU s): -0.005. It does not move the oracle at a budget
# of seconds, and at full size neither (efficacy benchmark `ddpo`, 3584 exact-oracle queries: held-out overall
# 0.188 -> 0.201; on soft values the gradient's signal share is at its 1/(1 + D/G) ceiling, ~0.008, and runs
# walk; README "Policy gradient"). Strict: a DDPO that learns this fast shows up as an unexpected pass.
@pytest.mark.xfail(strict=True, reason="DDPO does not move the toy world's oracle in a few epochs (nor at the "
                                       "benchmark's 3584 queries): a finding of the efficacy benchmark")
def test_ddpo_raises_the_soft_oracle(base, before, tmp_path):
    g = report("ddpo", before, measure(ddpo(base, tmp_path, "toyworld", epochs=3, lr=1e-3)))
    assert g["overall"] >= GRADIENT_MIN_GAIN, f"ddpo: soft oracle overall {g['overall']:+.4f}"


# -- Diffusion-DPO ---------------------------------------------------------------------------------------------
# Pairs ranked by the soft oracle (overall), mined once: 6 images per caption, its 3 widest-gap pairs (36 pairs)
# to train on, and 8 images / 4 pairs per caption from other seeds (48 held-out pairs) to judge on. The assertion is on the held-out
# pairs: after training, does the policy's implicit reward (its denoising error against the frozen reference)
# prefer the oracle's winner on pairs it never saw? A model that did not move scores exactly 0.5 (ties count
# half) and a margin of 0; a loss with ~0 gradient (the unscaled IPO of old) cannot pass.


def mine(base, tmp_path_factory, seed: int, n: int, pairs_per_prompt: int):
    from alignment.pairs import mine_pairs

    out = tmp_path_factory.mktemp(f"pairs-{seed}")
    mine_pairs(base, PROMPTS, create_reward("toyworld"), n, out, rule="dimension", dimension="overall", margin=0.0,
               pairs_per_prompt=pairs_per_prompt, shard_size=len(PROMPTS), seed=seed, batch_size=48,
               num_inference_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE, progress=False)
    return out


@pytest.fixture(scope="module")
def dpo_pairs(base, tmp_path_factory):
    from alignment.trainers.dpo import DataSection
    from alignment.trainers.dpo_data import PairDataset, index_pairs, read_pair_source

    train, held = mine(base, tmp_path_factory, 5, 6, 3), mine(base, tmp_path_factory, 905, 8, 4)
    data = DataSection(path=str(held))
    source = read_pair_source(data)
    return train, PairDataset(source, index_pairs(source, data), world.RESOLUTION, False)


def train_dpo_on(base, tmp_path, pairs, loss_type: str, beta: float, steps: int = 30, lr: float = 5e-4):
    """`DPOTrainer` on a copy of the base pipeline; returns (the trained pipeline, held-out pair metrics)."""
    from alignment.trainers.dpo import DataSection, DPOConfig, DPOSection, DPOTrainer

    train_pairs, held_out = pairs
    model, lora, train = sections(tmp_path, steps, lr, 8)
    cfg = DPOConfig(model=model, lora=lora, train=train, dpo=DPOSection(beta=beta, loss_type=loss_type, vae_sample=False),
                    data=DataSection(path=str(train_pairs)))
    pipe = copy.deepcopy(base)
    trainer = DPOTrainer(cfg, pipe=pipe)
    untrained = trainer.evaluate(num_batches=16, dataset=held_out)
    assert untrained["implicit_acc"] == pytest.approx(0.5) and untrained["reward_margin"] == pytest.approx(0.0)
    trainer.train()
    return pipe, trainer.evaluate(num_batches=16, dataset=held_out)


# Held-out implicit accuracy (16 batches of 8 held-out pairs, fixed noise) after 30 steps, lr 5e-4, batch 8. A
# model that does not move scores 0.5 exactly; a loss with ~0 gradient stays there and a sign error goes below.
# Measured with the fine-tuned decoder shipped on 2026-12-02, training seeds 0 / 1 / 2 (TOYTEST_SEED): sigmoid
# (β = 5000) 0.609 / 0.617 / 0.617, hinge (β = 500) 0.586 / 0.570 / 0.594, IPO (β = 500) 0.609 / 0.617 / 0.617,
# hence the threshold 0.55. With the earlier 24 + 24 pairs these were noisier (sigmoid 0.516-0.617, IPO
# 0.555-0.648 over the same seeds), and 60 steps did not help (IPO 0.492 on seed 2). With the first decoder
# (24 + 24 pairs) it was sigmoid 0.641, hinge 0.703, IPO 0.664 on seed 0. The hinge's target, logits >= 1, is
# tiny at β = 5000, so hinge and IPO train at β = 500. The soft oracle on the sampled images must not fall: at
# this budget DPO must not damage the model, checked with a tolerance of 0.025 (sigmoid at lr 2e-3, 20 steps,
# drifted: -0.04).
DPO_CASES = {"sigmoid": 5000.0, "hinge": 500.0, "ipo": 500.0}


@pytest.mark.parametrize("loss_type", list(DPO_CASES))
def test_dpo_learns_the_oracle_preference_on_held_out_pairs(base, before, dpo_pairs, tmp_path, loss_type):
    pipe, held = train_dpo_on(base, tmp_path, dpo_pairs, loss_type, DPO_CASES[loss_type])
    g = report(f"dpo-{loss_type} (held-out pairs: implicit accuracy {held['implicit_acc']:.3f}, "
               f"margin {held['reward_margin']:.3f})", before, measure(pipe))
    assert held["implicit_acc"] >= 0.55 and held["reward_margin"] > 0, (
        f"DPO ({loss_type}) did not learn the oracle's preference: held-out implicit accuracy "
        f"{held['implicit_acc']:.3f} (untrained 0.5), margin {held['reward_margin']:.3f}")
    assert g["overall"] > -0.025, f"DPO ({loss_type}) damaged the model: soft oracle overall {g['overall']:+.4f}"


# -- per-dimension targeting: the benchmark's check (the measured rows are in the README) --------------------------


def test_targeting_verdict_reads_the_targeted_dimension_and_the_largest_fall():
    from examples.benchmarks.efficacy_methods import METHODS
    from examples.benchmarks.efficacy_methods.targeting import (
        TOLERANCE,
        format_targeting,
        targeted_dimension,
        targeting_verdict,
    )

    assert METHODS["draft-shape"].reward == "toyworld:shape" and METHODS["draft-color"].reward == "toyworld:color"
    assert targeted_dimension("toyworld:shape") == "shape" and targeted_dimension("toyworld") is None
    assert targeted_dimension("toyworld:overall") is None and targeted_dimension("toyworld-clip") is None
    before = {"color": 0.42, "shape": 0.58, "position": 0.64, "overall": 0.19}
    row = {"method": "draft-shape", "reward": "toyworld:shape", "exact_before": before,
           "exact_after": {"color": 0.40, "shape": 0.70, "position": 0.66, "overall": 0.22}}
    v = targeting_verdict(row)
    assert v["dimension"] == "shape" and v["gain"] == pytest.approx(0.12) and v["largest_fall"] == pytest.approx(0.02)
    assert v["passed"]
    fell = {**row, "exact_after": {**row["exact_after"], "position": 0.64 - TOLERANCE - 0.01}}
    assert not targeting_verdict(fell)["passed"] and targeting_verdict(fell)["largest_fall"] > TOLERANCE
    weak = {**row, "exact_after": {**row["exact_after"], "shape": 0.65}}
    assert not targeting_verdict(weak)["passed"]
    assert targeting_verdict({**row, "reward": "toyworld"}) is None
    table = format_targeting([row, {**row, "method": "draft", "reward": "toyworld"}])
    assert "draft-shape" in table and "| draft |" not in table and "0.58 -> 0.70 (+12.0)" in table
