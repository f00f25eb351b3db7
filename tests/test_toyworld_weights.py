"""The shipped toy-world models: sha256 against the manifest, offline `from_pretrained`, sane behaviour."""

import json

import torch

import reward_plugins as rp
from alignment.toyworld import models, oracle, render, world


def test_weights_match_manifest_and_fit_the_budget():
    hashes = models.verify_weights()
    assert any(k.startswith("pipeline/unet/") and k.endswith(".safetensors") for k in hashes)
    assert any(k.startswith("clip/") and k.endswith(".safetensors") for k in hashes)
    assert sum(p.stat().st_size for p in models.weight_files()) <= 20 * 1024 * 1024
    manifest = models.read_manifest()
    for name in ("pipeline", "clip"):
        record = manifest["models"][name]["training"]
        assert record["command"].startswith(f"python examples/toyworld/train_{name}.py")
        assert record["args"]["seed"] == 0 and record["wall_s"] > 0
    assert manifest["models"]["pipeline"]["training"]["data_size"] > 0


def test_manifest_detects_a_changed_file(tmp_path):
    import shutil

    root = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS_DIR, root)
    models.verify_weights(root)
    cfg = root / "pipeline" / "unet" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    try:
        models.verify_weights(root)
    except ValueError as e:
        assert "pipeline/unet/config.json" in str(e)
    else:
        raise AssertionError("a modified file passed verification")


def test_pipeline_loads_offline_with_real_classes_and_follows_captions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = models.load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    prompts = world.train_prompts()[::6]  # 12 captions
    out = pipe(prompts, num_inference_steps=models.DEFAULT_STEPS, guidance_scale=models.DEFAULT_GUIDANCE,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (12, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    acc = rp.create_reward("toyworld-exact").score(out, prompts).per_dim
    # Far above chance (1/6 colour, 1/3 shape, 1/5 position) but not perfect by design (see MANIFEST.json).
    assert acc["color"].mean() >= 0.4 and acc["position"].mean() >= 0.4


def test_clip_loads_offline_and_ranks_true_captions_first(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import CLIPModel

    model, tok = models.load_clip()
    assert isinstance(model, CLIPModel) and len(tok) == len(models.build_tokenizer())
    reward = rp.create_reward("toyworld-clip")
    combos = world.heldout_combinations()
    images, _ = render.render(combos, torch.Generator().manual_seed(7))
    everything = world.all_combinations()
    captions = [world.caption(a) for a in everything]
    hits = 0
    for img, a in zip(images, combos):
        s = reward.score(img.unsqueeze(0).expand(len(captions), -1, -1, -1), captions).scores
        hits += everything[int(s.argmax())] == a
    assert hits >= 0.8 * len(combos)  # held-out combinations: never seen by the CLIP in training


def test_manifest_is_json_with_a_total():
    manifest = json.loads(models.MANIFEST.read_text())
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in models.weight_files())
    assert oracle.MIN_AREA > 0  # the oracle module imports alongside the weights
