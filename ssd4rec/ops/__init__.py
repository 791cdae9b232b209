"""Kernels: the chunked SSD scan (Mamba2), the packed-sequence causal conv1d and the
selective scan (Mamba-1, for the Mamba4Rec baseline).

Each dispatches to the CUDA/Triton implementation (mamba_ssm, causal_conv1d) on GPU when it
is installed and falls back to an exact pure-PyTorch version otherwise.
"""

from ssd4rec.ops.conv1d import causal_conv1d
from ssd4rec.ops.selective_scan import selective_scan
from ssd4rec.ops.ssd_scan import ssd_scan

__all__ = ["ssd_scan", "causal_conv1d", "selective_scan"]
