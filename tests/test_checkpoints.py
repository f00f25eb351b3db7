import os

import pytest
import torch
from safetensors.torch import save_file

from reward_plugins.checkpoints import (
    drop_position_ids,
    hf_clip_to_openclip,
    load_into,
    load_state_dict,
    openclip_to_hf_clip,
    strip_prefix,
)
from reward_plugins.testing import tiny_clip


def test_safetensors_and_torch_files_load(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save(sd, tmp_path / "m.pt")
    torch.save({"state_dict": sd}, tmp_path / "nested.pt")
    for name in ("m.safetensors", "m.pt", "nested.pt"):
        out = load_state_dict(tmp_path / name)
        assert out.keys() == sd.keys() and torch.equal(out["a.weight"], sd["a.weight"])


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/reward_plugins_pwned",))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = "/tmp/reward_plugins_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickles posix.system, and rebuilding pickled objects could run code, which is refused"):
        load_state_dict(tmp_path / "evil.pt")
    assert not os.path.exists(marker)


def test_not_a_state_dict_and_missing_key(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        load_state_dict(tmp_path / "w.pt", key="state_dict")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent.pt")


def test_openclip_conversion_round_trips():
    sd = tiny_clip(seed=5).state_dict()
    back = openclip_to_hf_clip(hf_clip_to_openclip(sd))
    assert set(back) == set(drop_position_ids(sd))
    for k, v in back.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_openclip_conversion_splits_fused_qkv_and_transposes_projections():
    sd = tiny_clip(seed=5).state_dict()
    oc = hf_clip_to_openclip(sd)
    w = oc["visual.transformer.resblocks.0.attn.in_proj_weight"]
    assert w.shape == (96, 32)
    hf = openclip_to_hf_clip(oc)
    torch.testing.assert_close(hf["vision_model.encoder.layers.0.self_attn.k_proj.weight"], w[32:64])
    torch.testing.assert_close(hf["text_projection.weight"], oc["text_projection"].T)
    assert "module.visual.proj" not in openclip_to_hf_clip({f"module.{k}": v for k, v in oc.items()})


def test_legacy_position_ids_are_dropped_and_prefix_stripped():
    sd = {"text_model.embeddings.position_ids": torch.arange(77)[None], "x": torch.zeros(1)}
    assert list(drop_position_ids(sd)) == ["x"]
    assert list(strip_prefix({"module.a": 1, "b": 2}, "module.")) == ["a", "b"]


def test_load_into_lists_missing_unexpected_and_shapes():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"missing keys: bias; unexpected keys: extra"):
        load_into(model, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, what="test ckpt")
    with pytest.raises(ValueError, match=r"shape mismatches: weight: checkpoint \(4, 3\) vs model \(2, 3\)"):
        load_into(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)})
    load_into(model, {"weight": torch.ones(2, 3, dtype=torch.float16), "bias": torch.zeros(2)})
    assert model.weight.dtype == torch.float32 and model.weight.sum() == 6
