"""Two CPU processes (gloo) under torchrun: the reward-gradient trainer's gradients are reduced by DDP
itself (no hand averaging), with several denoiser calls per backward (DRaFT-K with K = 2, AlignProp's
random K) and gradient accumulation, on a flow model (tiny SD3)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "reward_draft_sd3.yaml"

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from alignment.configs import load_config
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
out = sys.argv[1]
cfg = load_config(RewardFinetuneConfig, sys.argv[2], sys.argv[3:] + [f"train.output_dir={out}"])
tr = RewardFinetuner(cfg)
wrapper = type(tr.unet).__name__
tr.train()
rank = tr.accelerator.process_index
lora = torch.cat([p.detach().flatten() for p in tr.params])
json.dump({"world": tr.accelerator.num_processes, "lora": lora.tolist(), "prompts": tr._pick_prompts(0, 0),
           "wrapper": wrapper}, open(f"{out}/rank{rank}.json", "w"))
"""


@pytest.mark.parametrize("method", ["draft", "alignprop"])
def test_two_processes_reduce_gradients_through_ddp(tmp_path, method):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    overrides = [f"method.name={method}", "method.k=2", "method.truncation_range=[1, 3]", "train.max_steps=2",
                 "train.gradient_accumulation_steps=2", "train.validate_every=0", "train.save_every=0",
                 "train.report_to=none", "sampling.guidance_scale=1.0", "data.val_prompts=[a cat]",
                 "data.val_images_per_prompt=1", "reward.terms={aesthetic-tiny: 1.0}", "eval_reward=null"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp_path), str(TINY), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["wrapper"] == "DistributedDataParallel"  # the calls with gradients go through DDP
    assert r0["prompts"] != r1["prompts"]  # each process samples its own prompts: only the reduction aligns them
    torch.testing.assert_close(torch.tensor(r0["lora"]), torch.tensor(r1["lora"]), rtol=0, atol=1e-7)
