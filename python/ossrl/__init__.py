"""ossrl: fused MoE and attention kernels for PyTorch, and a colocated agentic RL loop.

Importing ossrl loads the compiled extension, which registers every op under
``torch.ops.ossrl``; ``ossrl.ops`` holds the Python entry points (autograd, torch.compile).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C

__version__ = _C.__version__

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
