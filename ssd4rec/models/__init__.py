"""The project's RecBole models, by config name."""

from ssd4rec.models.lifelong import LifelongRec
from ssd4rec.models.mamba4rec import Mamba4Rec
from ssd4rec.models.most_pop import MostPop
from ssd4rec.models.ssd4rec import SSD4Rec
from ssd4rec.models.tim4rec import TiM4Rec

MODELS = {"SSD4Rec": SSD4Rec, "MostPop": MostPop, "Mamba4Rec": Mamba4Rec, "TiM4Rec": TiM4Rec,
          "LifelongRec": LifelongRec}

__all__ = ["SSD4Rec", "MostPop", "Mamba4Rec", "TiM4Rec", "LifelongRec", "MODELS"]
