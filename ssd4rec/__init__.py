"""ssd4rec: SSD4Rec (bidirectional Mamba2 SSD over packed histories) as a RecBole plugin.

Importing the package patches RecBole 1.2.1 for numpy 2 and pandas 3 (see
:mod:`ssd4rec.compat`).
"""

from ssd4rec import compat

compat.apply()

from ssd4rec.models import MostPop, SSD4Rec  # noqa: E402
from ssd4rec.modules import BiSSDEncoder  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SSD4Rec", "MostPop", "BiSSDEncoder"]
