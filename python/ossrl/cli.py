"""The ``ossrl`` command: ``info``, ``train``, ``serve`` and ``plot``."""

from __future__ import annotations

import argparse
import platform


def info() -> str:
    """What was built and what is registered, one fact per line."""
    import torch

    import ossrl
    from ossrl import _C

    lines = [
        f"ossrl {ossrl.__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"CUDA kernels compiled: {'yes' if _C.with_cuda else 'no'}"
        + (f" (architectures: {_C.cuda_archs})" if _C.with_cuda else ""),
        "CUTLASS sm90 grouped GEMMs: "
        + ("built (OSSRL_MOE_GEMM=cutlass selects them; the default is mma)" if _C.with_sm90_gemm
           else "not built"),
        f"CUDA device available: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}",
        "ops (torch.ops.ossrl):",
    ]
    for name in registered_ops():
        lines.append(f"  {name}")
    return "\n".join(lines)


def registered_ops() -> list[str]:
    import torch

    schemas = torch._C._dispatch_get_registrations_for_dispatch_key("")
    names = sorted({s.split("::", 1)[1].split(".")[0] for s in schemas if s.startswith("ossrl::")})
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ossrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build and registered ops")
    tr = sub.add_parser("train", help="colocated RL (the default runs a tiny model on the CPU in minutes)")
    tr.add_argument("--config", help="a TOML file (see README); key=value arguments override it")
    tr.add_argument("--run-dir", default="runs/default", help="metrics.jsonl, checkpoints/ and plots/ go here")
    tr.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    pl = sub.add_parser("plot", help="PNG curves of a run's metrics")
    pl.add_argument("run_dir")
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions)")
    sv.add_argument("--model", default="tiny", help="tiny, a Hugging Face folder, or a run folder / checkpoint "
                                                    "of ossrl train")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-cache-tokens", type=int, default=65536, help="KV cache capacity (all requests)")
    sv.add_argument("--max-requests", type=int, default=512, help="requests in flight before 429")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "train":
        from .train.config import load_config
        from .train.loop import train
        from .train.metrics import plot

        from .train.task import build_task

        try:
            cfg = load_config(args.config, args.overrides)
            task = build_task(cfg)  # datasets, import paths, tools: checked before any model is built
        except (ValueError, OSError, TypeError) as e:
            parser.error(str(e))
        from .train.checkpoint import ResumeError

        try:
            run_dir = train(cfg, args.run_dir, resume=args.resume, task=task)
        except ResumeError as e:
            parser.exit(2, f"ossrl train --resume: {e}\n")
        print(f"metrics: {run_dir / 'metrics.jsonl'}; plots: " + ", ".join(str(p) for p in plot(run_dir)))
    elif args.command == "serve":
        from .serve import serve

        serve(args.model, args.host, args.port, max_cache_tokens=args.max_cache_tokens,
              max_requests=args.max_requests)
    elif args.command == "plot":
        from .train.metrics import plot

        for path in plot(args.run_dir):
            print(path)
    return 0
