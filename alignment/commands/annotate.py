"""`reward-align annotate`: LePref's MLLM annotation with a VLM judge (local transformers, an OpenAI-compatible
server, or vLLM). Resumable: run the same command again to continue a killed run.

Examples:
    # prompt templates (processing, NSFW filtering, classification) over a prompt file -> annotations.jsonl
    reward-align annotate prompts --prompts-file prompts.txt --output-dir out/prompts \\
        --backend http --base-url http://127.0.0.1:8000/v1
    # the three annotation templates over mined image sets -> per-dimension scores -> Pick-a-Pic pairs
    reward-align annotate images --images outputs/best_of_n --output-dir out/pairs --backend local \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda --rule each
    # the official wording, exactly: --templates LePref/annoutils.py --faithful   (or --corrected)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

from .best_of_n import read_prompts


def _judge(args):
    from reward_plugins.judge import Judge

    opts: dict = {}
    if args.backend == "http":
        if not args.base_url:
            raise ValueError("--backend http needs --base-url (e.g. http://127.0.0.1:8000/v1).")
        opts = {"base_url": args.base_url, "model": args.model, "concurrency": args.concurrency, "timeout": args.timeout,
                "api_key": os.environ.get(args.api_key_env) if args.api_key_env else None}
    else:
        if not args.model:
            raise ValueError(f"--backend {args.backend} needs --model (a model dir or hub id).")
        opts = {"model": args.model}
        if args.backend == "local":
            opts.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size, constrained=args.constrained)
    if args.max_images is not None:
        opts["max_images"] = args.max_images
    for item in args.backend_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option takes KEY=VALUE (VALUE as JSON, else a string); got {item!r}.")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    faithful = None if args.faithful is None else args.faithful == "faithful"
    return Judge(args.backend, args.templates, faithful=faithful, max_retries=args.max_retries,
                 max_new_tokens=args.max_new_tokens, backend_options=opts)


def _print_summary(res, what: str) -> None:
    c = res.cost
    print(f"{what}: {c.summary()}; {res.new_requests} sent this run, written to {res.output_dir}/annotations.jsonl")


def run_prompts(args: argparse.Namespace) -> int:
    from ..annotation import annotate_prompts

    cfg = types.SimpleNamespace(prompts=args.prompt, prompts_file=args.prompts_file, max_prompts=args.max_prompts)
    prompts = read_prompts(cfg)
    from reward_plugins.judge.templates import check_template_type, template_kind

    for t in args.template_types:  # before loading a model: a typo should cost nothing
        if template_kind(check_template_type(t)) != "prompt":
            raise ValueError(f"--template-types: {t!r} is not a prompt template; choose among prompt_processing, "
                             "prompt_NSFW_filtering, prompt_classification (annotation types go with `annotate images`).")
    judge = _judge(args)
    res = annotate_prompts(judge, prompts, args.output_dir, args.template_types, chunk=args.chunk,
                           retry_failed=args.retry_failed, progress=args.progress)
    _print_summary(res, f"{len(prompts)} prompts")
    return 0


def run_images(args: argparse.Namespace) -> int:
    from ..annotation import annotate_image_sets, read_image_sets

    sets = read_image_sets(args.images)
    judge = _judge(args)
    res = annotate_image_sets(
        judge, sets, args.output_dir, args.dimensions, max_images_per_request=args.max_images_per_request,
        rule=args.rule, dimension=args.dimension, margin=args.margin, pairs_per_prompt=args.pairs_per_prompt,
        chunk=args.chunk, retry_failed=args.retry_failed, progress=args.progress,
    )
    _print_summary(res, f"{len(sets)} image sets")
    print(f"{res.num_pairs} pairs in {len(res.pairs_files)} file(s) under {res.output_dir}/pairs "
          "(columns caption, jpg_0, jpg_1, label_0, score_<dimension>_0/_1, as reward-align pairs writes)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge")
    g.add_argument("--backend", choices=("local", "http", "vllm"), default="http")
    g.add_argument("--model", help="local/vllm: model dir or hub id; http: the server's model name (default: its only one)")
    g.add_argument("--base-url", dest="base_url", help="http: the API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key-env", dest="api_key_env", default="OPENAI_API_KEY",
                   help="http: environment variable holding the API key (default OPENAI_API_KEY; unset = none)")
    g.add_argument("--concurrency", type=int, default=8, help="http: requests in flight")
    g.add_argument("--timeout", type=float, default=120.0, help="http: seconds per call")
    g.add_argument("--device", default="cpu", help="local: device")
    g.add_argument("--dtype", default=None, help="local: fp32, bf16, fp16")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="local: requests per generate call")
    g.add_argument("--constrained", action="store_true", help="local: constrain annotation answers to their JSON format")
    g.add_argument("--max-images", dest="max_images", type=int, help="most images one request may carry (default 8)")
    g.add_argument("--backend-option", dest="backend_option", action="append", metavar="KEY=VALUE",
                   help="more backend options, e.g. tokenizer_mode=mistral max_model_len=32648 (vllm), "
                        "max_retries=5 (http); repeatable")
    g.add_argument("--templates", help="path of LePref's annoutils.py to use its wording (read, never executed)")
    fg = g.add_mutually_exclusive_group()
    fg.add_argument("--faithful", dest="faithful", action="store_const", const="faithful",
                    help="with --templates: reproduce the official file exactly (quirks included)")
    fg.add_argument("--corrected", dest="faithful", action="store_const", const="corrected",
                    help="with --templates: fill in the image count and ask each dimension for its own key")
    g.add_argument("--max-retries", dest="max_retries", type=int, default=2)
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--output-dir", dest="output_dir", required=True)
    p.add_argument("--chunk", type=int, default=32, help="requests per write to the log")
    p.add_argument("--retry-failed", dest="retry_failed", action="store_true", help="ask recorded failures again")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def register(sub) -> None:
    p = sub.add_parser("annotate", help="LePref annotation with a VLM judge (prompts -> JSONL, images -> pairs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", metavar="MODE")
    pp = modes.add_parser("prompts", help="prompt templates over prompts -> annotations.jsonl")
    pp.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    pp.add_argument("--prompts-file", dest="prompts_file", help=".txt one a line, or .tsv/.csv with a Prompt column")
    pp.add_argument("--max-prompts", dest="max_prompts", type=int)
    pp.add_argument("--template-types", dest="template_types", nargs="+",
                    default=["prompt_processing", "prompt_NSFW_filtering", "prompt_classification"])
    _common(pp)
    ip = modes.add_parser("images", help="annotation templates over image sets -> scores -> pairs parquet")
    ip.add_argument("--images", required=True,
                    help="a JSONL manifest ({prompt, images: [paths]} a line), a best-of-n output dir or a pairs dir")
    ip.add_argument("--dimensions", nargs="+", default=["alignment", "aesthetic", "fidelity"],
                    choices=("alignment", "aesthetic", "fidelity"))
    ip.add_argument("--max-images-per-request", dest="max_images_per_request", type=int)
    ip.add_argument("--rule", choices=("dimension", "composite", "dominance", "each"), default="composite",
                    help="pair rule; 'each' writes one pairs dataset per dimension")
    ip.add_argument("--dimension", help="the dimension for --rule dimension")
    ip.add_argument("--margin", type=float, default=0.0)
    ip.add_argument("--pairs-per-prompt", dest="pairs_per_prompt", type=int, default=1)
    _common(ip)

    def run(args: argparse.Namespace) -> int:
        from reward_plugins.judge import BackendError

        if args.mode is None:
            p.print_help()
            return 2
        try:
            return run_prompts(args) if args.mode == "prompts" else run_images(args)
        except BackendError as e:  # server down, wrong model name, vllm missing: one line, no traceback
            print(f"reward-align annotate {args.mode}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1

    p.set_defaults(func=run)
