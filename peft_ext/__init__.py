"""peft-ext: NOLA, MixDA, LongMem, MoT and LeYOLO as Hugging Face PEFT tuners and transformers models.

Importing `peft_ext` registers every method with peft (new `PeftType` members, so
`get_peft_model` and `PeftModel.from_pretrained` know them) and with transformers' Auto classes.
"""

from peft_ext.models.leyolo import LeYoloConfig, LeYoloForObjectDetection, LeYoloImageProcessor, LeYoloModel
from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
from peft_ext.models.mot import MoTConfig, MoTForCausalLM, MoTModel
from peft_ext.tuners.mixda import (
    MixDAConfig,
    MixDADomainCollator,
    MixDADomainTrainer,
    MixDAModel,
    mixda_domain_loss,
)
from peft_ext.tuners.nola import NolaConfig, NolaModel

__version__ = "0.1.0"

__all__ = [
    "LeYoloConfig",
    "LeYoloForObjectDetection",
    "LeYoloImageProcessor",
    "LeYoloModel",
    "LongMemConfig",
    "LongMemForCausalLM",
    "MixDAConfig",
    "MixDADomainCollator",
    "MixDADomainTrainer",
    "MixDAModel",
    "MoTConfig",
    "MoTForCausalLM",
    "MoTModel",
    "NolaConfig",
    "NolaModel",
    "__version__",
    "mixda_domain_loss",
]
