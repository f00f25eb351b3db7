"""Policy-gradient (DDPO / Flow-GRPO) throughput: rollout images per second and training time per
trained transition and per optimizer update, measured by the trainer itself (`PolicyGradientTrainer`:
its `sample_epoch` and `train_on`) on one epoch after a warm-up epoch.

    python examples/benchmarks/policy_gradient_speed.py --mode tiny     # tiny SD (DDPO) and SD3 (GRPO), CPU
    python examples/benchmarks/policy_gradient_speed.py --mode sd15     # SD 1.5-size random weights, 512 px, CUDA
    python examples/benchmarks/policy_gradient_speed.py --mode flux     # FLUX.1-dev-size transformer, 512 px, CUDA

The reward is a pixel statistic (no model), so the numbers are the diffusion side's cost. sd15: DDPO's
recipe (50 DDIM steps, eta 1, CFG 5, LoRA rank 4, fp16, G = 8, sample batch 8, train batch 4, every step
trained). flux: Flow-GRPO's FLUX settings (6 steps, guidance embedding 3.5, no CFG pass, LoRA rank 32 on the
attention projections, bf16, gradient checkpointing, G = 8, sample batch 4, train batch 2); the text encoders are
CLIP-L and a one-layer T5 with T5-XXL's width (4096), which text encoding once per prompt makes cheap either
way. Anchor from the field: VeRL-Omni reports 0.305 images/GPU/s for Qwen-Image Flow-GRPO with LoRA on H800s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.configs import load_config  # noqa: E402
from alignment.trainers.policy_gradient import PolicyGradientConfig, PolicyGradientTrainer  # noqa: E402
from reward_plugins.base import RewardModel  # noqa: E402


class PixelReward(RewardModel):
    """Share of pixels brighter than 0.5: no model, so it costs nothing next to the diffusion model."""

    is_differentiable = False
    requires_prompts = False

    def compute(self, images, prompts):
        return {"score": (images.mean(1) > 0.5).float().mean((1, 2))}


def _flux_size_pipeline(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from alignment.tiny import tiny_t5_tokenizer
    from reward_plugins.testing import seeded
    from reward_plugins.tokenization import tiny_clip_tokenizer

    with seeded(0), torch.device(device):
        # FLUX.1-dev transformer/config.json (the class defaults are its sizes): 19 double + 38 single blocks
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(dtype)
        vae = AutoencoderKL(  # FLUX.1-dev vae/config.json
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ).to(dtype)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=2,
            pad_token_id=1)).to(dtype)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=4096, d_ff=1024, d_kv=64, num_layers=1,
                                     num_heads=64, pad_token_id=0, eos_token_id=1)).to(dtype)
        # random transformers predict large velocities; a small output layer keeps samples finite (same compute)
        transformer.proj_out.weight.data.mul_(0.01)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip,
                        tokenizer=tiny_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer())
    pipe.default_sample_size = 64  # 512 px
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _case(mode: str):
    """(label, config overrides, pipeline builder or None)."""
    common = ["train.report_to=none", "train.max_steps=2", "train.validate_every=0", "train.save_every=0",
              "method.contact_sheet_every=0", "method.inner_epochs=1", "method.train_steps=all"]
    if mode == "tiny":
        yield ("tiny-sd ddpo (4 steps, G=4)", "configs/tiny/rl_ddpo.yaml",
               common + ["method.group_size=4", "method.prompts_per_epoch=2", "train.batch_size=4",
                         "train.gradient_accumulation_steps=1", "sampling.batch_size=8"], None)
        yield ("tiny-sd3 grpo (4 steps, G=4)", "configs/tiny/rl_grpo.yaml",
               common + ["method.group_size=4", "method.prompts_per_epoch=2", "train.batch_size=4",
                         "train.gradient_accumulation_steps=1", "sampling.batch_size=8", "method.kl_weight=0.0"], None)
    elif mode == "sd15":
        from examples.benchmarks.sd15 import sd15_random_pipeline

        yield ("sd15-size ddpo (50 steps, CFG 5, fp16, G=8)", "configs/sd15_ddpo_aesthetic.yaml",
               common + ["method.group_size=8", "method.prompts_per_epoch=2", "method.advantage=group",
                         "train.batch_size=4", "train.gradient_accumulation_steps=2", "sampling.batch_size=8",
                         "model.pipeline=null", "data.prompts=[cat, dog]", "data.prompts_file=null"],
               lambda: sd15_random_pipeline("cuda", torch.float16))
    elif mode == "flux":
        yield ("flux-size grpo (6 steps, bf16, LoRA 32, G=8)", "configs/flux_grpo_lescore.yaml",
               common + ["method.group_size=8", "method.prompts_per_epoch=2", "train.batch_size=2",
                         "train.gradient_accumulation_steps=4", "sampling.batch_size=4", "model.pipeline=null",
                         "data.prompts=[cat, dog]", "data.prompts_file=null"],
               lambda: _flux_size_pipeline("cuda", torch.bfloat16))


def run_case(label, config, overrides, build) -> dict:
    cfg = load_config(PolicyGradientConfig, config, overrides)
    cfg.eval_reward = None
    out = tempfile.mkdtemp(prefix="pg_speed_")
    trainer = PolicyGradientTrainer(cfg, reward=PixelReward(), output_dir=out, pipe=build() if build else None)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rows = []
    for epoch in range(2):  # epoch 0 warms up (allocations, kernels)
        sync()
        tic = time.perf_counter()
        ro = trainer.sample_epoch(epoch)
        sync()
        rollout_s = time.perf_counter() - tic
        adv, _, valid = trainer.advantages(ro)
        tic = time.perf_counter()
        stats = trainer.train_on(ro, adv, valid, epoch)
        sync()
        train_s = time.perf_counter() - tic
        rows.append((rollout_s, train_s, ro.traj.latents.shape[0], stats))
    rollout_s, train_s, n, _ = rows[-1]
    steps = int(trainer.has_noise.sum())
    updates = trainer.updates_per_epoch
    res = {
        "case": label, "device": str(trainer.accelerator.device), "samples": n, "sampling_steps": trainer.sampler.num_steps,
        "rollout_images_per_s": round(n / rollout_s, 4), "rollout_s": round(rollout_s, 3), "train_s": round(train_s, 3),
        "train_ms_per_transition": round(1000 * train_s / (n * steps), 2), "train_s_per_update": round(train_s / updates, 3),
        "epoch_images_per_s": round(n / (rollout_s + train_s), 4),
    }
    if torch.cuda.is_available():
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("tiny", "sd15", "flux"), default="tiny")
    args = p.parse_args(argv)
    if args.mode != "tiny" and not torch.cuda.is_available():
        print(f"--mode {args.mode} needs a CUDA device; use --mode tiny on CPU.", file=sys.stderr)
        return 2
    for case in _case(args.mode):
        print(json.dumps(run_case(*case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
