"""The fused ops, as Python functions with autograd and torch.compile support.

Each area has one module: ``moe`` (grouped GEMM, routing, the GPT-OSS expert block),
``attention`` (packed varlen and paged attention), ``reshard`` (fused multi-tensor copy).
"""

from .moe import MOE_KERNELS, Routing, grouped_gemm, moe_experts, moe_kernels, moe_route, moe_route_given
from .attention import paged_attention, paged_kv_append, varlen_attention
from .reshard import multi_tensor_copy_

__all__ = ["Routing", "grouped_gemm", "moe_kernels", "MOE_KERNELS", "moe_route", "moe_route_given", "moe_experts",
           "multi_tensor_copy_", "varlen_attention", "paged_kv_append", "paged_attention"]
