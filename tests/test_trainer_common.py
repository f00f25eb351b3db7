"""Shared trainer pieces: pipeline building, peft LoRA, the disabled-adapter reference, LoRA export,
accelerate set-up and checkpoints."""

import json

import pytest
import torch

from alignment.pipelines import PipelineAdapter
from alignment.trainers.common import (
    LORA_WEIGHT_NAME,
    LoraSection,
    ModelSection,
    TrainSection,
    add_lora,
    build_pipeline,
    check_sections,
    disabled_adapter,
    export_lora,
    latest_checkpoint,
    make_accelerator,
    register_trainable_state_hooks,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet_inputs(pipe, seed=0):
    ad = PipelineAdapter(pipe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    cond = ad.encode_prompts(["a cat", "a dog"])
    return ad, x, t, cond


def _perturb(params, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_disabled_adapter_equals_base_model(family):
    pipe = build_pipeline(ModelSection(tiny=family), "cpu")
    ad, x, t, cond = _unet_inputs(pipe)
    with torch.no_grad():
        base = ad.unet(x, t, cond)
    params = add_lora(pipe.unet, LoraSection(rank=4))
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        assert torch.equal(ad.unet(x, t, cond), base)  # B = 0 at init: the adapted model starts as the base
        _perturb(params)
        adapted = ad.unet(x, t, cond)
        with disabled_adapter(pipe.unet):
            ref = ad.unet(x, t, cond)
        after = ad.unet(x, t, cond)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.equal(ref, base)
    assert torch.equal(after, adapted)  # re-enabled after the block


def test_disabled_adapter_restores_on_error():
    pipe = build_pipeline(ModelSection(tiny="sd"), "cpu")
    _perturb(add_lora(pipe.unet, LoraSection(rank=2)))
    ad, x, t, cond = _unet_inputs(pipe)
    with torch.no_grad():
        before = ad.unet(x, t, cond)
        with pytest.raises(RuntimeError, match="boom"), disabled_adapter(pipe.unet):
            raise RuntimeError("boom")
        assert torch.equal(ad.unet(x, t, cond), before)


def test_lora_step_changes_lora_only():
    pipe = build_pipeline(ModelSection(tiny="sd"), "cpu")
    params = add_lora(pipe.unet, LoraSection(rank=4))
    lora_ids = {id(p) for p in params}
    base_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if id(p) not in lora_ids}
    lora_before = [p.detach().clone() for p in params]
    ad, x, t, cond = _unet_inputs(pipe)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        loss = ad.unet(x, t, cond).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(lora_before, params))
    for n, p in pipe.unet.named_parameters():
        if id(p) not in lora_ids:
            assert torch.equal(p, base_before[n]), n
            assert p.grad is None


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_export_lora_loads_into_fresh_pipeline(tmp_path, family):
    from alignment.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    pipe = build_pipeline(ModelSection(tiny=family), "cpu")
    # alpha != rank: the exported metadata must carry the scale, or the loaded LoRA would be 2x off.
    _perturb(add_lora(pipe.unet, LoraSection(rank=4, alpha=8)))
    path = export_lora(pipe, pipe.unet, tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME and path.is_file()
    ad, x, t, cond = _unet_inputs(pipe)
    fresh = (tiny_sd_pipeline if family == "sd" else tiny_sdxl_pipeline)()
    with torch.no_grad():
        base = fresh.unet(x, t, **cond.unet_kwargs()).sample
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.unet(x, t, **cond.unet_kwargs()).sample
        trained = ad.unet(x, t, cond)
    assert not torch.allclose(loaded, base, atol=1e-4)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_export_without_adapter_teaches(tmp_path):
    pipe = build_pipeline(ModelSection(tiny="sd"), "cpu")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_lora(pipe, pipe.unet, tmp_path)
    with pytest.raises(ValueError, match="pipe_or_family"):
        add_lora(pipe.unet, LoraSection(rank=2))
        export_lora("kandinsky", pipe.unet, tmp_path)


def test_build_pipeline_prediction_type_override_and_freezing():
    pipe = build_pipeline(ModelSection(tiny="sd", prediction_type="v_prediction"), "cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert PipelineAdapter(pipe).prediction_type == "v_prediction"
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def test_check_sections_errors_name_the_key():
    ok = (ModelSection(tiny="sd"), LoraSection(), TrainSection())
    check_sections(*ok)
    with pytest.raises(ValueError, match="model.tiny must be one of"):
        check_sections(ModelSection(tiny="kandinsky"), *ok[1:])
    with pytest.raises(ValueError, match="model.pipeline is empty"):
        check_sections(ModelSection(), *ok[1:])
    with pytest.raises(ValueError, match="train.mixed_precision"):
        check_sections(*ok[:2], TrainSection(mixed_precision="fp8"))
    with pytest.raises(ValueError, match="train.batch_size must be an integer >= 1"):
        check_sections(*ok[:2], TrainSection(batch_size=0))
    with pytest.raises(ValueError, match="did not match"):
        pipe = build_pipeline(ModelSection(tiny="sd"), "cpu")
        add_lora(pipe.unet, LoraSection(target_modules=["not_a_module"]))


def test_checkpoints_resume_and_prune(tmp_path):
    acc = make_accelerator(TrainSection(gradient_accumulation_steps=2, report_to="none"), tmp_path)
    assert acc.gradient_accumulation_steps == 2
    pipe = build_pipeline(ModelSection(tiny="sd"), "cpu")
    params = add_lora(pipe.unet, LoraSection(rank=2))
    opt = torch.optim.AdamW(params, lr=1e-3)
    unet, opt = acc.prepare(pipe.unet, opt)
    register_trainable_state_hooks(acc)
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        _perturb(params)
        save_checkpoint(acc, tmp_path, step, total_limit=2)
    saved = [p.detach().clone() for p in params]
    path, step = latest_checkpoint(tmp_path)
    assert step == 3 and json.loads((path / "trainer_state.json").read_text())["step"] == 3
    # Only trainable weights are stored (KBs, not the UNet), and the oldest checkpoint was pruned.
    files = {f.name for f in path.iterdir()}
    assert "trainable_0.safetensors" in files and not any(f.startswith("model") for f in files)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-0000002", "checkpoint-0000003"]
    # A checkpoint without its state JSON (interrupted while writing) is ignored.
    (tmp_path / "checkpoints" / "checkpoint-0000009").mkdir()
    assert latest_checkpoint(tmp_path)[1] == 3
    _perturb(params, 1.0)
    acc.load_state(str(path))
    for a, b in zip(saved, params):
        assert torch.equal(a, b)
