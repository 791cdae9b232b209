"""Plain PyTorch modules, no RecBole: the SSD mixer and the Bi-SSD encoder."""

from ssd4rec.modules.bissd import BiSSDEncoder, BiSSDLayer
from ssd4rec.modules.mamba2 import Mamba2Mixer

__all__ = ["BiSSDEncoder", "BiSSDLayer", "Mamba2Mixer"]
