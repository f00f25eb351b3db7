"""Diffusion-DPO trainer on tiny pipelines and synthetic Pick-a-Pic pairs."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignment.cli import main as cli_main
from alignment.configs import load_config
from alignment.trainers.common import build_pipeline, read_jsonl, unwrap
from alignment.trainers.dpo import (
    DataSection,
    DPOConfig,
    DPOTrainer,
    check_config,
    index_pairs,
    make_synthetic_pairs,
    read_pair_source,
    train_dpo,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "dpo.yaml"
QUIET = ["train.validate_every=0", "train.save_every=0", "train.report_to=none"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_synthetic_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 16, resolution=32)


def cfg_for(pairs_path, *overrides):
    return load_config(DPOConfig, TINY, [f"data.path={pairs_path}", "data.synthetic_pairs=0", *QUIET, *overrides])


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in unwrap(trainer.model).named_parameters() if "lora" in n}


def test_implicit_accuracy_rises_and_only_lora_moves(tmp_path, pairs):
    cfg = cfg_for(pairs, "train.max_steps=60")
    pipe = build_pipeline(cfg.model, "cpu")
    # A random VAE's 0.18215 latent scale leaves the two images' latents ~0.04 apart under unit diffusion
    # noise; a trained SD VAE's latents are far more distinct. Scale 1 gives the tiny model a visible signal.
    pipe.vae.register_to_config(scaling_factor=1.0)
    trainer = DPOTrainer(cfg, output_dir=tmp_path, pipe=pipe)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" not in n}
    lora0 = lora_state(trainer)
    before = trainer.evaluate(num_batches=16)
    assert before["implicit_acc"] == 0.5 and before["reward_margin"] == 0.0  # LoRA B = 0: policy == reference
    trainer.train()
    after = trainer.evaluate(num_batches=32)
    assert after["implicit_acc"] >= 0.7, after  # 0.79-0.99 over seeds 0-2
    assert after["reward_margin"] > 0 and after["reward_w"] > after["reward_l"]
    assert any(not torch.equal(lora0[n], p) for n, p in lora_state(trainer).items())
    for n, p in pipe.unet.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    log = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert log and {"train/implicit_acc", "train/reward_margin", "train/reward_w", "train/reward_l"} <= set(log[-1])


def test_resume_equals_uninterrupted_run(tmp_path, pairs):
    # 12 pairs, batch 2 -> 6 batches an epoch; 6 steps x 2 micro-batches cross an epoch boundary.
    over = ["train.max_steps=6", "train.batch_size=2", "train.gradient_accumulation_steps=2",
            "train.lr_warmup_steps=4", "data.max_pairs=12", "dpo.vae_sample=true"]
    full = DPOTrainer(cfg_for(pairs, *over), output_dir=tmp_path / "full")
    full.train()
    part = DPOTrainer(cfg_for(pairs, *over), output_dir=tmp_path / "part")
    part.train(stop_at=3)
    assert part.global_step == 3
    resumed = DPOTrainer(cfg_for(pairs, *over), output_dir=tmp_path / "part", resume=True)
    resumed.train()
    assert resumed.global_step == 6
    a, b = lora_state(full), lora_state(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    # ...and differs from the un-resumed half run, so the comparison is not vacuous.
    assert any(not torch.allclose(lora_state(part)[n], b[n]) for n in b)


def test_exported_lora_changes_a_fresh_pipeline(tmp_path, pairs):
    from alignment.tiny import tiny_sd_pipeline

    result = train_dpo(cfg_for(pairs, "train.max_steps=3"), output_dir=tmp_path)
    assert result.lora_path.is_file() and result.steps == 3
    fresh = tiny_sd_pipeline()
    kw = dict(prompt=["a cat"], num_inference_steps=3, height=32, width=32, output_type="pt")
    base = fresh(**kw, generator=torch.Generator().manual_seed(0)).images
    fresh.load_lora_weights(str(result.output_dir))
    tuned = fresh(**kw, generator=torch.Generator().manual_seed(0)).images
    assert (tuned - base).abs().max() > 1e-4


def test_sdxl_v_prediction_and_full_finetune(tmp_path, pairs):
    from alignment.tiny import tiny_sdxl_pipeline

    res = train_dpo(cfg_for(pairs, "model.tiny=sdxl", "model.prediction_type=v_prediction", "train.max_steps=2"),
                    output_dir=tmp_path / "xl")
    fresh = tiny_sdxl_pipeline()
    fresh.load_lora_weights(str(res.output_dir))  # SDXL LoRA format loads
    assert all(torch.isfinite(torch.tensor(v)) for k, v in res.last_metrics.items())

    trainer = DPOTrainer(cfg_for(pairs, "lora.enabled=false", "train.max_steps=2", "train.lr=1e-4"), output_dir=tmp_path / "ft")
    ref_before = {n: p.clone() for n, p in trainer.ref_unet.named_parameters()}
    result = trainer.train()
    assert result.unet_path is not None and (result.unet_path / "config.json").is_file()
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_unet.named_parameters())
    assert any(not torch.equal(p, ref_before[n]) for n, p in unwrap(trainer.model).named_parameters())


def test_cli_logs_validation_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train-dpo", "--config", str(TINY), "--output-dir", str(out), "train.max_steps=2",
                   "train.validate_every=2", "train.log_every=1", "data.synthetic_pairs=8"])
    assert rc == 0 and "LoRA after 2 steps" in capsys.readouterr().out
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/reward_mean" in r] == [0, 2]
    assert (out / "validation" / "step-0000002" / "000.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    rc = cli_main(["train-dpo", "--config", str(TINY), "--output-dir", str(out)])
    assert rc == 1 and "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_accelerate_launch_runs_tiny_config(tmp_path):
    out = tmp_path / "launch"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "examples" / "train_dpo.py"), "--config", str(TINY), "--output-dir", str(out),
           "train.max_steps=2", "train.validate_every=0", "data.synthetic_pairs=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "curves.png").is_file()
    assert (out / "checkpoints" / "checkpoint-0000002" / "trainer_state.json").is_file()


def test_ties_are_skipped_or_rejected(tmp_path):
    path = make_synthetic_pairs(tmp_path / "ties.parquet", 9, tie_every=3)
    source = read_pair_source(DataSection(path=str(path)))
    index = index_pairs(source, DataSection())
    assert index.ties == 3 and len(index.rows) == 6
    labels = source.labels
    for row, win, _ in index.rows:  # the winner column follows label_0
        assert win == ("jpg_0" if labels[row] == 1.0 else "jpg_1")
    with pytest.raises(ValueError, match="row 2 is a tie"):
        index_pairs(source, DataSection(ties="error"))


def test_datasets_source(tmp_path, pairs):
    import datasets

    ds = datasets.Dataset.from_parquet(str(pairs), cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(cfg_for(pairs, "train.max_steps=1"), output_dir=tmp_path / "run", dataset=ds)
    assert len(trainer.index.rows) == 16
    assert trainer.train().steps == 1


# -- bad input: clear errors, nothing written -------------------------------------------------------


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def _png(size):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _expect_error(tmp_path, pairs_path, match, *overrides):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        DPOTrainer(cfg_for(pairs_path, *overrides), output_dir=out)
    assert not out.exists()


def test_missing_columns(tmp_path):
    bad = _write(tmp_path / "bad.parquet", caption=["a"], jpg_0=[_png((32, 32))], label_0=[1.0])
    _expect_error(tmp_path, bad, r"lacks the Pick-a-Pic column\(s\) \['jpg_1'\]")


def test_unreadable_image_bytes(tmp_path):
    bad = _write(tmp_path / "bad.parquet", caption=["a", "b"], jpg_0=[_png((32, 32))] * 2,
                 jpg_1=[_png((32, 32)), b"not an image"], label_0=[1.0, 0.0])
    _expect_error(tmp_path, bad, r"row 1 column 'jpg_1': unreadable image bytes")


def test_mixed_resolutions(tmp_path):
    bad = _write(tmp_path / "bad.parquet", caption=["a", "b"], jpg_0=[_png((32, 32)), _png((48, 40))],
                 jpg_1=[_png((32, 32))] * 2, label_0=[1.0, 0.0])
    _expect_error(tmp_path, bad, r"mixed image resolutions: .* is 32x32 but .*row 1 column 'jpg_0'.* is 48x40.*data.resize=true")
    same = _write(tmp_path / "same.parquet", caption=["a"], jpg_0=[_png((48, 48))], jpg_1=[_png((48, 48))], label_0=[1.0])
    _expect_error(tmp_path, same, r"are 48x48 but training runs at 32x32 .*data.resize=true or model.resolution=48")
    # With resize the same data is usable.
    out = DPOTrainer(cfg_for(bad, "data.resize=true", "train.batch_size=2", "train.max_steps=1"), output_dir=tmp_path / "ok")
    batch = next(out._batches(out._dataset(out.source, out.index), 0))
    assert batch["pixel_w"].shape == (2, 3, 32, 32)


def test_sdxl_micro_conditioning_per_image(tmp_path, monkeypatch):
    """With data.micro_conditioning=image, SDXL time ids carry each image's own original size and crop."""
    data = _write(tmp_path / "p.parquet", caption=["a"], jpg_0=[_png((48, 40))], jpg_1=[_png((32, 64))], label_0=[0.0])
    trainer = DPOTrainer(cfg_for(data, "data.resize=true", "model.tiny=sdxl", "train.batch_size=1", "train.max_steps=1",
                                 "data.micro_conditioning=image"), output_dir=tmp_path / "run")
    batch = next(trainer._batches(trainer._dataset(trainer.source, trainer.index), 0))
    # label 0 -> image 1 wins: winner 32x64 (w x h) resized to 32x64, crop top 16; loser 48x40 -> 38x32, left 3
    assert batch["micro_w"].tolist() == [[64.0, 32.0, 16.0, 0.0]]
    assert batch["micro_l"].tolist() == [[40.0, 48.0, 0.0, 3.0]]
    seen = {}
    unet_forward = trainer.adapter.unet

    def spy(latents, t, cond, unet=None):
        seen["time_ids"] = cond.time_ids.clone()
        return unet_forward(latents, t, cond, unet=unet)

    monkeypatch.setattr(trainer.adapter, "unet", spy)
    trainer.pair_losses(batch, torch.Generator().manual_seed(0))
    assert seen["time_ids"].tolist() == [[64.0, 32.0, 16.0, 0.0, 32.0, 32.0], [40.0, 48.0, 0.0, 3.0, 32.0, 32.0]]


def test_bad_labels_and_unknown_key(tmp_path, pairs):
    bad = _write(tmp_path / "bad.parquet", caption=["a"], jpg_0=[_png((32, 32))], jpg_1=[_png((32, 32))], label_0=[2.0])
    _expect_error(tmp_path, bad, r"row 0: label_0 must be a number in \[0, 1\]")
    with pytest.raises(ValueError, match="unknown key 'bta' in .*dpo. Did you mean 'beta'"):
        cfg_for(pairs, "dpo.bta=10")
    with pytest.raises(ValueError, match="dpo.loss_type must be one of"):
        DPOTrainer(cfg_for(pairs, "dpo.loss_type=kto"), output_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DPOTrainer(cfg_for(tmp_path / "missing.parquet"), output_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_online_mode_mines_then_trains(tmp_path):
    pairs_mod = pytest.importorskip("alignment.pairs", reason="alignment.pairs (pair mining) is not written yet")
    if not hasattr(pairs_mod, "mine_pairs"):
        pytest.skip("alignment.pairs.mine_pairs is not there yet")
    cfg = load_config(DPOConfig, TINY, [*QUIET, "online.enabled=true", "online.prompts=[a cat, a dog]",
                                        "online.reward=pickscore-tiny", "online.images_per_prompt=2",
                                        "online.steps_per_round=1", "online.mine_kwargs={num_inference_steps: 2}",
                                        "train.max_steps=2", "train.batch_size=1"])
    result = train_dpo(cfg, output_dir=tmp_path)
    assert result.steps == 2
    rounds = sorted(p.name for p in (tmp_path / "online").iterdir())
    assert rounds == ["round-0000", "round-0001"]
    assert result.lora_path.is_file()


def test_checkpointing_and_bf16_keep_the_step(tmp_path, pairs):
    batch = None
    grads = []
    for ckpt in (False, True):
        tr = DPOTrainer(cfg_for(pairs, f"train.gradient_checkpointing={str(ckpt).lower()}", "train.max_steps=1"),
                        output_dir=tmp_path / str(ckpt))
        with torch.no_grad():  # move LoRA off its zero init so gradients reach A as well as B
            for p in tr.params:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        batch = batch or next(tr._batches(tr._dataset(tr.source, tr.index), 0))
        loss, _ = tr.pair_losses(batch, torch.Generator().manual_seed(7))
        loss.backward()
        grads.append([p.grad.clone() for p in tr.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    res = train_dpo(cfg_for(pairs, "train.mixed_precision=bf16", "train.max_steps=2"), output_dir=tmp_path / "bf16")
    assert res.steps == 2 and all(math.isfinite(v) for v in res.last_metrics.values())


def test_real_recipes_parse():
    for name in ("sd15_lora_dpo.yaml", "sdxl_lora_dpo.yaml"):
        cfg = load_config(DPOConfig, ROOT / "configs" / name)
        check_config(cfg)
        assert cfg.dpo.beta == 5000 and cfg.lora.rank == 8 and cfg.lora.enabled and cfg.train.lr == 1e-5


def test_benchmark_tiny_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples" / "benchmarks"))
    try:
        import dpo_throughput
    finally:
        sys.path.pop(0)
    assert dpo_throughput.main(["--tiny", "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "ours / naive: throughput x" in out and "command: python" in out
    diff = float(out.split("last-step loss difference ours vs naive: ")[1].split()[0])
    assert diff < 1e-5


def test_timestep_range_draws_only_there_and_is_checked(tmp_path, pairs):
    trainer = DPOTrainer(cfg_for(pairs, "dpo.timestep_range=[0.3, 1.0]"), output_dir=tmp_path / "r")
    t = trainer._timesteps(4096, torch.Generator().manual_seed(0))
    n = trainer.adapter.num_train_timesteps
    assert int(t.min()) >= round(0.3 * n) and int(t.max()) == n - 1 and int(t.min()) < round(0.31 * n)
    full = DPOTrainer(cfg_for(pairs), output_dir=tmp_path / "f")._timesteps(4096, torch.Generator().manual_seed(0))
    assert int(full.min()) < round(0.01 * n)  # without it: the family's distribution over all of [0, T)
    for bad in ("[0.5, 0.2]", "[0.1]", "[-0.1, 1.0]", "[0.0, 1.5]"):
        with pytest.raises(ValueError, match=r"dpo.timestep_range must be \[lo, hi\]"):
            check_config(cfg_for(pairs, f"dpo.timestep_range={bad}"))


def test_guided_dpo_trains_the_cfg_samplers_preference(tmp_path, pairs):
    """dpo.guidance_scale: w = 1 is the paper's loss; w = 7 combines the conditional and empty-caption errors of
    one batched forward as 7·mse_c − 6·mse_u, checked against two separate predictions; bad values refused."""
    from alignment.losses import diffusion_dpo_loss, per_sample_mse
    from alignment.trainers.common import disabled_adapter
    from alignment.trainers.dpo_data import collate_pairs

    trainer = DPOTrainer(cfg_for(pairs, "train.max_steps=4", "train.lr=1e-2"), output_dir=tmp_path)
    trainer.train()  # a LoRA that is not zero, so policy and reference differ
    inner = unwrap(trainer.model)
    ds = trainer._dataset(trainer.source, trainer.index)
    batch = collate_pairs([ds[i] for i in range(4)])
    calls = []
    unet = trainer.adapter.unet

    def spy(latents, t, cond, unet=None):
        calls.append((latents, t, cond.embeds))
        return type(trainer.adapter).unet(trainer.adapter, latents, t, cond, unet=unet)

    def loss(w):
        trainer.cfg.dpo.guidance_scale = w
        calls.clear()
        return trainer.pair_losses(batch, torch.Generator().manual_seed(3), model=inner, augment=False)

    paper, _ = loss(None)
    assert torch.allclose(loss(1.0)[0], paper, atol=1e-6)
    trainer.adapter.unet = spy
    try:
        guided, metrics = loss(7.0)
    finally:
        trainer.adapter.unet = unet
    latents, t, embeds = calls[0]  # the policy's forward over [caption w, l; empty w, l]
    assert latents.shape[0] == 16 and torch.equal(latents[:8], latents[8:]) and torch.equal(t[:8], t[8:])
    assert torch.equal(embeds[8:], trainer.adapter.encode_prompts([""] * 8).embeds)
    assert not torch.equal(guided, paper) and {"model_mse_uncond", "ref_mse_uncond"} <= set(metrics)
    # The same number from separate conditional and unconditional predictions (targets: the trainer's own).
    gen = torch.Generator().manual_seed(3)
    lat = trainer.adapter.encode_images(torch.cat([batch["pixel_w"], batch["pixel_l"]]), generator=gen,
                                        sample=trainer.cfg.dpo.vae_sample).float()
    noise = torch.randn(lat[:4].shape, generator=gen)
    noise = torch.cat([noise, noise])
    target = trainer.adapter.target(lat, noise, t[:8])
    assert torch.equal(trainer.adapter.add_noise(lat, noise, t[:8]), latents[:8])
    cond, empty = trainer.adapter.encode_prompts(batch["caption"] * 2), trainer.adapter.encode_prompts([""] * 8)
    err = {}
    with torch.no_grad():
        for name, model in (("model", inner), ("ref", None)):
            if model is None:
                with disabled_adapter(inner) as base:
                    c, u = (per_sample_mse(unet(latents[:8], t[:8], e, unet=base), target) for e in (cond, empty))
            else:
                c, u = (per_sample_mse(unet(latents[:8], t[:8], e, unet=model), target) for e in (cond, empty))
            err[name] = (7 * c - 6 * u).chunk(2)
    expected, _ = diffusion_dpo_loss(*err["model"], *err["ref"], beta=trainer.cfg.dpo.beta)
    assert torch.allclose(guided, expected, rtol=1e-4, atol=1e-6), (float(guided), float(expected))
    for bad in ("0.5", "true"):
        with pytest.raises(ValueError, match="dpo.guidance_scale must be a number >= 1"):
            check_config(cfg_for(pairs, f"dpo.guidance_scale={bad}"))
