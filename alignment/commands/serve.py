"""`reward-align serve`: serve a reward over HTTP to any trainer (flow_grpo pickle, JSON, safetensors).

Example:
    reward-align serve --reward lescore --checkpoint LeScore.pt --port 18085
    # flow_grpo-style clients POST to http://127.0.0.1:18085; ours: create_reward("remote", url=...)
"""

from __future__ import annotations

import argparse
import sys

from .score import add_reward_args, reward_from_args


def run(args: argparse.Namespace) -> int:
    from reward_plugins.serving import ServeLimits, require_serve_extra

    try:
        require_serve_extra()
    except ImportError as e:
        print(f"reward-align serve: error: {e}", file=sys.stderr)
        return 1
    from reward_plugins.serving.runner import serve

    limits = ServeLimits(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue_images=args.max_queue_images,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_images_per_request=args.max_images_per_request,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_side**2,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reward-align serve: note: listening on {args.host}, reachable beyond this machine; the server has "
              "no authentication.", file=sys.stderr)
    reward = reward_from_args(args)
    print(f"serving {args.reward} ({', '.join(reward.dimensions)}) on http://{args.host}:{args.port} "
          f"[max batch {limits.max_batch_size}, max wait {limits.max_wait_ms} ms]", file=sys.stderr)
    serve(reward, host=args.host, port=args.port, limits=limits, model=args.checkpoint or args.reward,
          log_level=args.log_level, graceful_timeout_s=args.graceful_timeout)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a reward over HTTP with dynamic batching", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reward_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=18085, help="port (default 18085, flow_grpo's reward-server port)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most images in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue-images", type=int, default=1024, help="queued images beyond which requests get 503")
    p.add_argument("--max-images-per-request", type=int, default=256)
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB")
    p.add_argument("--max-image-side", type=int, default=4096, help="largest image height or width in pixels")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
