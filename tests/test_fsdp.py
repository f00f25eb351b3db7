"""accelerate FSDP2 (``train.distributed: fsdp``) on two CPU processes (gloo), against DDP on the same data.

The reward-gradient trainer (DRaFT-2 on tiny FLUX, two denoiser calls with gradients per backward, under
gradient accumulation; AlignProp on tiny SD3; ReFL on tiny FLUX) and the Diffusion-DPO trainer (tiny SD3) run
with their LoRA sharded; the LoRA after the run equals DDP's on the same global batch, sharded checkpoints
resume to the same weights as an uninterrupted run, and the exported LoRA loads with `load_lora_weights`.

Every job of one launch runs in the same two processes (one import and process-group start per launch):
one DDP launch, one FSDP launch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import accelerate
import torch.distributed as dist
from alignment.configs import load_config
from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
from alignment.trainers.dpo import DPOConfig, DPOTrainer

# accelerate's end_training destroys the process group; the jobs of this launch share it.
accelerate.Accelerator.end_training = lambda self: [t.finish() for t in self.trackers]
jobs = json.loads(Path(sys.argv[1]).read_text())
from accelerate.state import AcceleratorState, GradientState
for job in jobs:
    # a fresh accelerate state per job (its mixed precision is fixed once set); the process group stays
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = Path(job["out"])
    if job.get("copy_from"):  # an interrupted run: the source run's files up to one checkpoint
        if int(dist.get_rank()) == 0:
            shutil.copytree(job["copy_from"], out)
            for ck in (out / "checkpoints").iterdir():
                if int(ck.name.split("-")[1]) > job["keep_step"]:
                    shutil.rmtree(ck)
            for f in ("pytorch_lora_weights.safetensors", "summary.json"):
                (out / f).unlink(missing_ok=True)
        dist.barrier()
    if job["kind"] == "flow_memory":  # the benchmark's FSDP mode, as `torchrun ... flow_memory.py --fsdp` runs it
        sys.path.insert(0, job["root"])
        from examples.benchmarks.flow_memory import main
        res = main(job["argv"] + ["--out", str(out)])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res))
        continue
    overrides = job["overrides"] + [f"train.output_dir={out}"]
    if job["kind"] == "reward":
        tr = RewardFinetuner(load_config(RewardFinetuneConfig, job["config"], overrides))
        model = tr.unet
        summary = tr.train(resume=bool(job.get("copy_from")))
        loss, lora = summary["last"].get("loss"), summary["lora"]
    else:
        tr = DPOTrainer(load_config(DPOConfig, job["config"], overrides), resume=bool(job.get("copy_from")))
        model = tr.model
        result = tr.train()
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        loss, lora = [r for r in rows if "train/loss" in r][-1]["train/loss"], str(out / "pytorch_lora_weights.safetensors")
    from torch.distributed.fsdp import FSDPModule
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    param = next(p for p in tr.params)
    rank = tr.accelerator.process_index
    row = {"world": tr.accelerator.num_processes, "wrapper": type(model).__name__, "units": units,
           "param": type(param).__name__, "loss": loss, "lora": lora}
    (out / f"rank{rank}.json").write_text(json.dumps(row))
dist.barrier()
dist.destroy_process_group()
"""

# The monitor stays on: its best/ export at a validation is one more collective under FSDP.
COMMON = ["train.report_to=none", "train.log_every=1"]
REWARD = COMMON + ["train.validate_every=0", "train.max_steps=2", "train.gradient_accumulation_steps=2", "train.save_every=1", "train.batch_size=1",
                   "sampling.num_steps=2", "method.truncation_range=[1, 2]", "method.refl_step_range=[0, 1]",
                   "data.val_prompts=[a cat, a dog]", "data.val_images_per_prompt=1",
                   "reward.terms={aesthetic-tiny: 1.0}", "reward.normalize=false", "eval_reward=null"]
DRAFT = ["method.name=draft", "method.k=2"]
DPO = COMMON + ["train.validate_every=2", "train.max_steps=2", "train.save_every=1", "train.batch_size=2", "data.synthetic_pairs=8",
                "validation.num_inference_steps=2"]


def _jobs(root: Path, fsdp: bool) -> list[dict]:
    d = ["train.distributed=fsdp"] if fsdp else []
    jobs = [
        {"kind": "reward", "config": str(TINY / "reward_draft_flux.yaml"), "out": str(root / "draft"), "overrides": REWARD + DRAFT + d},
        {"kind": "dpo", "config": str(TINY / "dpo_sd3.yaml"), "out": str(root / "dpo"), "overrides": DPO + d},
        # bf16: accelerate's FSDP2 mixed-precision policy (bf16 all-gathers, fp32 LoRA), as on GPUs
        {"kind": "reward", "config": str(TINY / "reward_draft_flux.yaml"), "out": str(root / "draft_bf16"),
         "overrides": REWARD + DRAFT + d + ["train.mixed_precision=bf16", "train.max_steps=1", "train.save_every=0"]},
    ]
    if fsdp:
        jobs += [
            {"kind": "reward", "config": str(TINY / "reward_draft_flux.yaml"), "out": str(root / "draft_resumed"),
             "overrides": REWARD + DRAFT + d, "copy_from": str(root / "draft"), "keep_step": 1},
            {"kind": "dpo", "config": str(TINY / "dpo_sd3.yaml"), "out": str(root / "dpo_resumed"),
             "overrides": DPO + d, "copy_from": str(root / "dpo"), "keep_step": 1},
            # AlignProp's K and ReFL's step are drawn alike on every process (each denoiser call is a collective)
            {"kind": "reward", "config": str(TINY / "reward_draft_sd3.yaml"), "out": str(root / "alignprop"),
             "overrides": REWARD + d + ["method.name=alignprop", "train.max_steps=1",
                                        "sampling.guidance_scale=1.0"]},
            {"kind": "reward", "config": str(TINY / "reward_draft_flux.yaml"), "out": str(root / "refl"),
             "overrides": REWARD + d + ["method.name=refl", "train.max_steps=1"]},
            {"kind": "flow_memory", "root": str(ROOT), "out": str(root / "flow_memory"),
             "argv": ["--fsdp", "--tiny", "--device", "cpu", "--steps", "1"]},
        ]
    return jobs


def _launch(root: Path, fsdp: bool) -> Path:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.py").write_text(SCRIPT)
    (root / "jobs.json").write_text(json.dumps(_jobs(root, fsdp)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(root / "run.py"), str(root / "jobs.json")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"), fsdp=False)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp"), fsdp=True)


def _rows(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1)]


def _lora(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "pytorch_lora_weights.safetensors"))


def _assert_same_lora(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
        moved = max(moved, float(a[k].abs().max()))
    assert moved > 1e-4  # the LoRA moved (B starts at zero): the comparison is not of two untouched adapters


@pytest.mark.parametrize("job", ["draft", "dpo"])
def test_fsdp_shards_the_denoiser_and_matches_ddp(ddp, fsdp, job):
    f0, f1 = _rows(fsdp / job)
    d0, _ = _rows(ddp / job)
    assert f0["world"] == 2 and f0["wrapper"].startswith("FSDP") and f0["param"] == "DTensor"
    assert f0["units"] >= 2  # the blocks are FSDP units of their own, not only the root
    assert d0["wrapper"] == "DistributedDataParallel"
    assert torch.isfinite(torch.tensor(f0["loss"])) and f0["loss"] == pytest.approx(f1["loss"])  # loss averaged over ranks
    assert f0["loss"] == pytest.approx(d0["loss"], rel=1e-4, abs=1e-6)
    _assert_same_lora(_lora(fsdp / job), _lora(ddp / job))


def test_fsdp_bf16_gradients_match_ddp_bf16(ddp, fsdp):
    # Compared at step 1 (same weights on both): Adam's first steps normalise each entry's gradient, so bf16
    # rounding in near-zero entries moves the weights apart by more than it moves the gradient.
    f, d = (_rows(run / "draft_bf16")[0] for run in (fsdp, ddp))
    assert f["wrapper"].startswith("FSDP") and f["param"] == "DTensor"
    gf, gd = (json.loads((run / "draft_bf16" / "metrics.jsonl").read_text().splitlines()[1])["grad_norm"] for run in (fsdp, ddp))
    assert gf == pytest.approx(gd, rel=0.03) and gd > 0
    assert f["loss"] == pytest.approx(d["loss"], rel=1e-3)


@pytest.mark.parametrize("job", ["draft", "dpo"])
def test_fsdp_checkpoint_resumes_to_the_uninterrupted_weights(fsdp, job):
    ck = fsdp / job / "checkpoints"
    steps = sorted(p.name for p in ck.iterdir())
    assert steps[-1].endswith("0000002")
    held = {p.name for p in (ck / steps[-1]).iterdir()}
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= held  # accelerate's sharded (DCP) model and optimizer
    _assert_same_lora(_lora(fsdp / f"{job}_resumed"), _lora(fsdp / job))


@pytest.mark.parametrize("job", ["alignprop", "refl"])
def test_fsdp_random_truncation_methods_run(fsdp, job):
    r0, r1 = _rows(fsdp / job)
    assert r0["wrapper"].startswith("FSDP") and torch.isfinite(torch.tensor(r0["loss"]))
    assert (fsdp / job / "pytorch_lora_weights.safetensors").is_file()


def test_fsdp_exported_lora_loads_into_a_fresh_pipeline(fsdp):
    from alignment.pipelines import PipelineAdapter
    from alignment.tiny import tiny_pipeline

    saved = _lora(fsdp / "draft")
    fresh, base = tiny_pipeline("flux"), tiny_pipeline("flux")
    fresh.load_lora_weights(str(fsdp / "draft"))
    assert fresh.transformer.peft_config  # diffusers added the adapter
    ad, ad_base = PipelineAdapter(fresh), PipelineAdapter(base)
    ad.max_sequence_length = ad_base.max_sequence_length = 16
    x = torch.randn(1, ad.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(600.0)
    with torch.no_grad():
        loaded = ad.predict(x, t, ad.encode_prompts(["a cat"]))
        untouched = ad_base.predict(x, t, ad_base.encode_prompts(["a cat"]))
    assert (loaded - untouched).abs().max() > 1e-5  # the loaded LoRA changes the model
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())


def test_flow_memory_benchmark_runs_under_fsdp(fsdp):
    """The FLUX DRaFT-1 memory benchmark's FSDP mode (`torchrun --nproc_per_node 2 flow_memory.py --fsdp`), in its
    tiny CPU form: both processes measured, the largest step time reported by every process alike."""
    r0, r1 = _rows(fsdp / "flow_memory")
    assert r0["fsdp_processes"] == r1["fsdp_processes"] == 2
    assert r0["draft1_step_s"] == r1["draft1_step_s"] > 0 and r0["lora_params_M"] > 0


def test_distributed_setting_is_checked():
    from alignment.trainers.common import LoraSection, ModelSection, TrainSection, check_sections

    with pytest.raises(ValueError, match="train.distributed must be one of"):
        check_sections(ModelSection(tiny="flux"), LoraSection(), TrainSection(distributed="zero3"))


@pytest.mark.parametrize("override, match", [("train.ema_decay=0.999", "ema_decay"), ("lora.enabled=false", "full fine-tuning"),
                                             ("online.enabled=true", "online")])
def test_dpo_refuses_what_fsdp_does_not_support(override, match):
    from alignment.configs import load_config
    from alignment.trainers.dpo import DPOConfig, check_sharding

    check_sharding(load_config(DPOConfig, str(TINY / "dpo_sd3.yaml")))  # the tiny recipe itself is fine
    with pytest.raises(ValueError, match=match):
        check_sharding(load_config(DPOConfig, str(TINY / "dpo_sd3.yaml"), [override]))


def test_reward_trainer_refuses_uneven_validation_under_fsdp():
    from types import SimpleNamespace

    from alignment.configs import load_config
    from alignment.trainers.reward_finetune import RewardFinetuneConfig, RewardFinetuner

    cfg = load_config(RewardFinetuneConfig, str(TINY / "reward_draft_flux.yaml"), ["data.val_images_per_prompt=1"])
    trainer = SimpleNamespace(val_prompts=["a cat", "a dog", "a cow"], accelerator=SimpleNamespace(num_processes=2))
    with pytest.raises(ValueError, match="split evenly"):
        RewardFinetuner._check_sharding(trainer, cfg)
    trainer.val_prompts = ["a cat", "a dog"]
    RewardFinetuner._check_sharding(trainer, cfg)
    cfg.train.ema_decay = 0.999
    with pytest.raises(ValueError, match="ema_decay"):
        RewardFinetuner._check_sharding(trainer, cfg)
