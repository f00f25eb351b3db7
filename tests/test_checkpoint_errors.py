"""Bad checkpoint files give one clear line at the CLI (file named, fix given), never a traceback, and never
advice to load with weights_only=False (issue 11, item 11)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reward_plugins.checkpoints import CheckpointError, load_state_dict
from reward_plugins.unpickle import RefusedGlobalError, load_module_state_dict


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _files(tmp_path):
    rng = torch.Generator().manual_seed(0)
    garbage = torch.randint(0, 256, (300,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "garbage.pt").write_bytes(garbage)
    (tmp_path / "garbage.pth").write_bytes(garbage[1:])
    (tmp_path / "text.pkl").write_bytes(b"garbage bytes, not a pickle at all")
    with open(tmp_path / "hostile.pth", "wb") as f:
        pickle.dump(_Hostile(), f)
    save_file({"w": torch.zeros(64)}, tmp_path / "ok.safetensors")
    full = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(full[:50])
    (tmp_path / "tiny.safetensors").write_bytes(full[:5])
    torch.save({"w": torch.zeros(64)}, tmp_path / "ok.pt")
    full = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(full[: len(full) // 2])
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "img.png")
    return tmp_path


BAD = ["garbage.pt", "garbage.pth", "text.pkl", "hostile.pth", "truncated.safetensors", "tiny.safetensors",
       "truncated.pt"]


@pytest.mark.parametrize("name", BAD)
def test_load_state_dict_names_the_file_and_never_suggests_unsafe_loading(tmp_path, name):
    path = _files(tmp_path) / name
    with pytest.raises(ValueError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.pth", "text.pkl", "truncated.pt"])
def test_restricted_unpickler_calls_garbage_not_a_valid_checkpoint(tmp_path, name):
    path = _files(tmp_path) / name
    with pytest.raises(CheckpointError, match="not a valid checkpoint") as e:
        load_module_state_dict(path)
    assert str(path) in str(e.value)


def test_hostile_pickle_is_refused_with_the_file_named(tmp_path):
    path = _files(tmp_path) / "hostile.pth"
    with pytest.raises(RefusedGlobalError) as e:
        load_module_state_dict(path)
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert isinstance(e.value, ValueError)  # a user error: the CLI reports it in one line


@pytest.mark.parametrize(
    "reward,name",
    [("mps", "hostile.pth"), ("mps", "garbage.pt"), ("mps", "garbage.pth"), ("mps", "text.pkl"),
     ("mps", "truncated.safetensors"), ("mps", "truncated.pt"), ("aesthetic-tiny", "garbage.pt"),
     ("aesthetic-tiny", "truncated.safetensors"), ("aesthetic-tiny", "tiny.safetensors")],
)
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys, reward, name):
    from alignment.cli import main

    d = _files(tmp_path)
    code = main(["score", "--reward", reward, "--checkpoint", str(d / name), "--device", "cpu", str(d / "img.png")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("reward-align score: error:") and str(d / name) in err
    assert "Traceback" not in err and "weights_only=False" not in err and "set to `False" not in err
