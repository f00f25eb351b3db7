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
