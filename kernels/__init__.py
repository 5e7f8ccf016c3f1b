"""Triton kernels, one file per op (installed as `vitfast.kernels`)."""

import torch


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (opt-in maximum: 227 KiB on H100 / H200); the
    autotune prunes of every kernel drop tiles that need more."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
