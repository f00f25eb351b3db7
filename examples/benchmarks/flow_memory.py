"""Flow-model training cost: FLUX.1 DRaFT-1 LoRA peak memory and step time, and SD3.5-Medium-size
Diffusion-DPO pairs per second, with random weights (no download).

    python examples/benchmarks/flow_memory.py --device cuda              # FLUX.1 / SD3.5-M sizes, bf16, 512 px
    python examples/benchmarks/flow_memory.py --device cpu --tiny        # the same code on tiny configs (CI)
    torchrun --nproc_per_node 2 examples/benchmarks/flow_memory.py --fsdp            # FLUX DRaFT-1 under FSDP2
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/benchmarks/flow_memory.py --fsdp --tiny --device cpu

``--fsdp`` runs the FLUX DRaFT-1 step as the trainers do under ``train.distributed: fsdp``: accelerate's FSDP2
(`make_accelerator` + `prepare_denoiser`: one FSDP unit per FLUX block, accelerate's per-block activation
checkpointing, bf16 compute with fp32 LoRA on GPUs) with the frozen weights sharded too; the peak is the
largest over the processes.

What runs is the library's own code: `PipelineAdapter` + `alignment.sampling.denoise` (28 flow-Euler steps,
the last with gradients, checkpointed transformer) + checkpointed VAE decode + a differentiable reward,
LoRA rank 32 (`add_lora`) on the FLUX script's target modules, AdamW step; and DPO's forward/backward on
winner + loser with the adapter-disabled reference (`DPOTrainer.pair_losses`' computation, on latents).
The denoiser and VAE have the real architectures (configs written out below); the text encoders are tiny
stand-ins that emit embeddings of the real widths (they are frozen and run once per prompt: on a GPU,
CLIP-L + T5-XXL add their bf16 weights, ~9.8 GB, if kept there; not counted here). The reward is a
pixel statistic, so its cost is not counted either (a CLIP-H reward adds ~2 GB bf16 + its activations).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLOW_VAE = dict(  # the SD3 / FLUX VAE (16 latent channels, 8x)
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)
TINY_FLUX = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], in_channels=16)
TINY_SD3 = dict(SD35_MEDIUM, sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                in_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,))
TINY_VAE = dict(FLOW_VAE, latent_channels=4, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1, sample_size=32)


def _text_stub(hidden: int, projection: int | None, t5_width: int | None):
    """Tiny CLIP (and T5) whose outputs have the real widths: 1 layer, real hidden size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from alignment.tiny import _t5
    from reward_plugins.tokenization import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                         vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=tok.pad_token_id,
                         max_position_embeddings=77, **({"projection_dim": projection} if projection else {}))
    clip = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return clip, (_t5(t5_width) if t5_width else None)


def build(family: str, tiny: bool, device: str, dtype: torch.dtype):
    """A FluxPipeline / StableDiffusion3Pipeline with the real denoiser and VAE architectures, random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from alignment.tiny import tiny_t5_tokenizer
    from reward_plugins.testing import seeded
    from reward_plugins.tokenization import tiny_clip_tokenizer

    vae_cfg = TINY_VAE if tiny else FLOW_VAE
    with seeded(0), torch.device(device):
        vae = AutoencoderKL(**vae_cfg, scaling_factor=1.5035 if family == "sd3" else 0.3611,
                            shift_factor=0.0609 if family == "sd3" else 0.1159)
        if family == "flux":
            cfg = TINY_FLUX if tiny else FLUX_DEV
            transformer = FluxTransformer2DModel(**cfg)
            clip, t5 = _text_stub(cfg["pooled_projection_dim"], None, cfg["joint_attention_dim"])
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
            pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=sched, text_encoder=clip,
                                tokenizer=tiny_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer())
        else:
            cfg = TINY_SD3 if tiny else SD35_MEDIUM
            half = cfg["pooled_projection_dim"] // 2
            c1, t5 = _text_stub(half, half, cfg["joint_attention_dim"])
            c2, _ = _text_stub(cfg["joint_attention_dim"] - half, half, None)
            transformer = SD3Transformer2DModel(**cfg)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=c1,
                tokenizer=tiny_clip_tokenizer(), text_encoder_2=c2, tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=t5,
                tokenizer_3=tiny_t5_tokenizer(),
            )
    pipe.to(device=device, dtype=dtype)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")


def draft_flux(args, dtype) -> dict:
    """DRaFT-1 step time and peak memory on FLUX.1 (LoRA rank 32, checkpointing, last step with gradients)."""
    from alignment.pipelines import PipelineAdapter
    from alignment.sampling import decode, denoise
    from alignment.trainers.common import LoraSection, add_lora

    acc = _fsdp_accelerator(args) if args.fsdp else None
    device = str(acc.device) if acc is not None else args.device
    pipe = build("flux", args.tiny, device, dtype)
    ad = PipelineAdapter(pipe)
    ad.max_sequence_length = args.max_sequence_length
    lora = LoraSection(rank=args.rank, alpha=args.rank, target_modules=list(ad.lora_target_modules))
    params = add_lora(ad.denoiser, lora, seed=0)
    opt = torch.optim.AdamW(params, lr=1e-5)
    model = ad.denoiser
    if acc is None:
        ad.denoiser.enable_gradient_checkpointing()
    else:  # the trainers' FSDP path; a checkpoint around the whole sharded call cannot recompute (common.py)
        from alignment.trainers.common import prepare_denoiser, trainable_parameters

        model, opt = prepare_denoiser(acc, ad, model, opt, activation_checkpointing=True)
        params = trainable_parameters(model)
    prompts = ["a photo of a red fox in the snow"] * args.batch
    cond = ad.encode_prompts(prompts)
    times = []
    _peak_reset(args.device)
    for step in range(args.steps + 1):
        _sync(args.device)
        tic = time.perf_counter()
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32):
            out = denoise(ad, cond, None, num_steps=args.num_steps, guidance_scale=3.5, grad_steps=1,
                          resolution=args.resolution, generator=torch.Generator().manual_seed(step),
                          use_checkpoint=acc is None, unet=model)
        images = decode(ad, out.latents)
        loss = -images.float().std(dim=(1, 2, 3)).mean()  # a differentiable pixel reward (contrast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - tic)
    # sizes of the whole model (a sharded parameter's numel is its global size)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"transformer_params_B": n_params / 1e9, "lora_params_M": sum(p.numel() for p in params) / 1e6,
           "draft1_step_s": sum(times) / len(times), "draft1_peak_GB": _peak_gb(device)}
    if acc is not None:
        worst = acc.gather(torch.tensor([[res["draft1_peak_GB"], res["draft1_step_s"]]], device=acc.device)).max(0).values
        res.update(fsdp_processes=acc.num_processes, draft1_peak_GB=float(worst[0]), draft1_step_s=float(worst[1]))
    return res


def _fsdp_accelerator(args):
    """accelerate with FSDP2 as ``train.distributed: fsdp`` builds it (bf16 on GPUs, fp32 on CPU)."""
    from alignment.trainers.common import TrainSection, make_accelerator

    precision = "bf16" if torch.device(args.device).type == "cuda" else "no"
    acc = make_accelerator(TrainSection(distributed="fsdp", mixed_precision=precision, report_to="none"), args.out)
    if acc.num_processes < 2:
        raise SystemExit("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2)")
    return acc


def dpo_sd3(args, dtype) -> dict:
    """Diffusion-DPO pairs/s on SD3.5-Medium: policy forward+backward on winner and loser, reference forward."""
    from alignment.losses import diffusion_dpo_loss, per_sample_mse
    from alignment.pipelines import PipelineAdapter
    from alignment.trainers.common import LoraSection, add_lora, disabled_adapter

    pipe = build("sd3", args.tiny, args.device, dtype)
    ad = PipelineAdapter(pipe)
    ad.max_sequence_length = args.max_sequence_length
    params = add_lora(ad.denoiser, LoraSection(rank=16, alpha=16, target_modules=list(ad.lora_target_modules)), seed=0)
    ad.denoiser.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5)
    b = args.pairs
    side = args.resolution // ad.vae_scale
    cond = ad.encode_prompts(["a photo of a red fox in the snow"] * b)
    cond = cond.cat(cond)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * b, ad.latent_channels, side, side, generator=g).to(args.device)
    times = []
    _peak_reset(args.device)
    for step in range(args.steps + 1):
        _sync(args.device)
        tic = time.perf_counter()
        noise = torch.randn(latents[:b].shape, generator=g).to(args.device)
        t = ad.sample_timesteps(b, g, device=args.device)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])
        noisy, target = ad.add_noise(latents, noise, t), ad.target(latents, noise, t)
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32):
            pred = ad.predict(noisy.to(dtype), t, cond)
            with torch.no_grad(), disabled_adapter(ad.denoiser) as base:
                ref = ad.predict(noisy.to(dtype), t, cond, model=base)
        mw, ml = per_sample_mse(pred.float(), target).chunk(2)
        rw, rl = per_sample_mse(ref.float(), target).chunk(2)
        loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=5000.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        if step:
            times.append(time.perf_counter() - tic)
    step_s = sum(times) / len(times)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    return {"sd3_transformer_params_B": n_params / 1e9, "dpo_step_s": step_s, "dpo_pairs_per_s": b / step_s,
            "dpo_peak_GB": _peak_gb(args.device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs (the CPU smoke run); default: the real sizes")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 32 with --tiny)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="DRaFT images per step")
    p.add_argument("--pairs", type=int, default=2, help="DPO pairs per step")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default 28; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--only", choices=["draft", "dpo"], default=None)
    p.add_argument("--fsdp", action="store_true", help="FLUX DRaFT-1 under accelerate FSDP2 (launch with torchrun)")
    p.add_argument("--out", default="outputs/flow_memory", help="accelerate's project dir under --fsdp")
    args = p.parse_args(argv)
    if args.fsdp:
        if args.only == "dpo":
            raise SystemExit("--fsdp measures the FLUX DRaFT-1 step; drop --only dpo")
        args.only = "draft"
    if args.resolution is None:
        args.resolution = 32 if args.tiny else 512
    if args.num_steps is None:
        args.num_steps = 4 if args.tiny else 28
    if args.tiny:
        args.max_sequence_length = min(args.max_sequence_length, 16)
    if torch.device(args.device).type != "cuda" and not args.tiny:
        raise SystemExit("the real sizes need a GPU (FLUX.1 is 12 B parameters); pass --tiny on CPU")
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    results = {"device": args.device, "dtype": str(dtype).replace("torch.", ""), "resolution": args.resolution,
               "tiny": args.tiny}
    if args.only in (None, "draft"):
        results.update(draft_flux(args, dtype))
    if args.only in (None, "dpo"):
        results.update(dpo_sd3(args, dtype))
    if args.fsdp and int(os.environ.get("RANK", "0")) != 0:
        return results  # the main process prints the largest peak of all
    for k, v in results.items():
        print(f"{k:>26}: {v:.3f}" if isinstance(v, float) else f"{k:>26}: {v}")
    return results


if __name__ == "__main__":
    main()
