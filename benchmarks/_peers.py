"""Optional peers of the benchmarks (``pip install 'ossrl[bench]'``): one check, one message."""

import importlib


def transformers_available(module: str, name: str, skipping: str) -> bool:
    """True when transformers has ``module.name`` (its GPT-OSS code); otherwise says once what
    is skipped (``skipping``, e.g. "the transformers rows") and returns False."""
    try:
        import transformers
    except ImportError:
        print(f"transformers not installed: skipping {skipping} (pip install 'ossrl[bench]')")
        return False
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        print(f"transformers {transformers.__version__} has no GPT-OSS ({e}): skipping {skipping} "
              f"(pip install 'ossrl[bench]')")
        return False
    return True
