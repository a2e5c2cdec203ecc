"""NOLA (Koohpayegani et al., ICLR 2024) as a PEFT tuner type: `get_peft_model(model, NolaConfig(...))`."""

from peft_ext.registry import register_peft_tuner

from .config import NolaConfig
from .layer import BasisSpec, Embedding, Linear, NolaLayer
from .model import NolaModel

__all__ = ["BasisSpec", "Embedding", "Linear", "NolaConfig", "NolaLayer", "NolaModel"]

register_peft_tuner("nola", NolaConfig, NolaModel, prefix=NolaModel.prefix, card_template="nola")
