"""A LoRA trained with alpha != rank loads as trained through every diffusers loader (issue 11, item 16):
`load_lora_weights(dir)` (reads the file's metadata), `lora_state_dict` + `load_lora_into_unet` and
`unet.load_lora_adapter(file)` (which do not)."""

from __future__ import annotations

import pytest
import torch

from alignment.tiny import tiny_sd_pipeline
from alignment.trainers.common import LORA_WEIGHT_NAME, LoraSection, add_lora, export_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    emb = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([500]), emb


@torch.no_grad()
def _out(unet):
    latents, t, emb = _inputs(unet)
    return unet(latents, t, encoder_hidden_states=emb).sample


def _load_weights(pipe, out):
    pipe.load_lora_weights(out)


def _state_dict_then_into_unet(pipe, out):
    sd, alphas = type(pipe).lora_state_dict(out)
    type(pipe).load_lora_into_unet(sd, alphas, unet=pipe.unet)


def _unet_load_adapter(pipe, out):
    pipe.unet.load_lora_adapter(str(out / LORA_WEIGHT_NAME), prefix="unet")


# The attention projections only (diffusers' key map covers them) and the toy world's targets, which add
# proj_in/proj_out: written with diffusers' keys those mixed formats and the loaders read 14 of 70 modules.
TARGETS = {"attention": None, "with_proj": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]}


@pytest.fixture(scope="module", params=list(TARGETS))
def exported(request, tmp_path_factory):
    pipe = tiny_sd_pipeline(seed=0)
    base = _out(pipe.unet)
    targets = TARGETS[request.param]
    section = LoraSection(rank=2, alpha=8.0) if targets is None else LoraSection(rank=2, alpha=8.0, target_modules=targets)
    add_lora(pipe.unet, section, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # a "trained" adapter: B away from its zero init
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    trained = _out(pipe.unet)
    b_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    out = tmp_path_factory.mktemp("lora")
    export_lora(pipe, pipe.unet, out)
    # Exporting leaves the model being trained alone.
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            assert torch.equal(p, b_before[n]), n
    assert not torch.allclose(trained, base, atol=1e-3)  # the adapter matters, so the comparison is not vacuous
    return out, trained


@pytest.mark.parametrize("load", [_load_weights, _state_dict_then_into_unet, _unet_load_adapter],
                         ids=["load_lora_weights", "lora_state_dict+load_lora_into_unet", "unet.load_lora_adapter"])
def test_every_diffusers_loader_gets_the_trained_model(exported, load):
    out, trained = exported
    fresh = tiny_sd_pipeline(seed=0)
    load(fresh, out)
    n_trained = sum(1 for name, _ in fresh.unet.named_modules() if name.endswith("lora_A"))
    assert n_trained > 0
    torch.testing.assert_close(_out(fresh.unet), trained, rtol=1e-4, atol=1e-5)
