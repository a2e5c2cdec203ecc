"""MixDA (Diao et al., ACL 2023) as a PEFT tuner type: `get_peft_model(model, MixDAConfig(stage="domain"))` for
stage 1, `MixDAModel.for_task(base, {"news": "out/news", ...})` for stage 2.

Departures from the paper and the released code (Amano-Aki/Mixture-of-Domain-Adapters), all deliberate:
- a domain adapter is written as the FFN plus a zero-initialized bottleneck, DA(a) = FFN(a) + Δ(a), where the
  released code's adapter replaces the FFN output in stage 1: the model is unchanged at insertion, and the
  paper's knowledge-retention term ‖DA(a) − FFN(a)‖² (always 0 in the released code) becomes ‖Δ(a)‖²;
- the gate is one linear layer on the intermediate activation (the released code: a 3-layer MLP), starts at
  zero logits, and its mixture is scaled by a per-layer scalar that starts at 0, so inserting stage 2 does not
  change the model; it reads every token ("token") or the masked mean of the sequence ("sequence") instead of
  the last position, and works at batch size 1;
- the task adapter (Pfeiffer-style, reduction 16) sits inside the wrapped down projection, after the mixture
  and before the block's dropout/residual/LayerNorm.
"""

from peft_ext.registry import register_peft_tuner

from .config import MixDAConfig
from .layer import FrozenDomainAdapter, Linear, MixDAForwardContext, MixDALayer
from .model import MixDAModel
from .trainer import MixDADomainCollator, MixDADomainTrainer, mixda_domain_loss, recording_domain_deltas

__all__ = [
    "FrozenDomainAdapter",
    "Linear",
    "MixDAConfig",
    "MixDADomainCollator",
    "MixDADomainTrainer",
    "MixDAForwardContext",
    "MixDALayer",
    "MixDAModel",
    "mixda_domain_loss",
    "recording_domain_deltas",
]

register_peft_tuner("mixda", MixDAConfig, MixDAModel, prefix=MixDAModel.prefix, card_template="mixda")
