"""The ``ossrl`` command: ``ossrl info``; later ``train`` and ``bench``."""

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
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0
