"""The policy-gradient speed benchmark script: its GPU modes refuse to run on CPU with a clear message."""

import pytest

from examples.benchmarks.policy_gradient_speed import main


@pytest.mark.parametrize("mode", ["sd15", "flux"])
def test_gpu_modes_need_cuda(mode, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--mode", mode]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_probe_refuses_a_bad_window(capsys):
    from examples.benchmarks.policy_gradient_probe import main as probe

    assert probe(["snr", "--window", "4"]) == 2
    assert "--window must be START,SIZE" in capsys.readouterr().err


@pytest.mark.parametrize("block", [1, 4])
def test_probe_snr_on_the_toy_world(block, tmp_path, capsys):
    """Two groups of two rollouts: the signal share is a cosine-like ratio in [-1, 1] (it is NaN if the LoRA gets
    no gradient), and the ceiling is 1 / (1 + D / G) with D = 1 trained step x 256 latent elements / f^2 (block
    noise of f x f latent blocks)."""
    import json
    import math

    from examples.benchmarks.policy_gradient_probe import main as probe

    assert probe(["snr", "--reward", "soft", "--window", "0,1", "--group", "2", "--prompts", "2", "--epochs", "1",
                  "--noise-block", str(block), "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["result"]
    assert res["groups"] == 2 and math.isfinite(res["s_group"]) and -1 <= res["s_group"] <= 1
    assert res["noise_dims"] == 256 // block**2
    assert res["ceiling_linear_reward"] == round(1 / (1 + 256 / block**2 / 2), 4)
