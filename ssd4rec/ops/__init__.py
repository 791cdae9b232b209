"""Kernels: the chunked SSD scan and the packed-sequence causal conv1d.

Each dispatches to the CUDA/Triton implementation (mamba_ssm, causal_conv1d) on GPU when it
is installed and falls back to an exact pure-PyTorch version otherwise.
"""

from ssd4rec.ops.conv1d import causal_conv1d
from ssd4rec.ops.ssd_scan import ssd_scan

__all__ = ["ssd_scan", "causal_conv1d"]
