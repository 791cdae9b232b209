"""The project's RecBole models, by config name."""

from ssd4rec.models.most_pop import MostPop
from ssd4rec.models.ssd4rec import SSD4Rec

MODELS = {"SSD4Rec": SSD4Rec, "MostPop": MostPop}

__all__ = ["SSD4Rec", "MostPop", "MODELS"]
