"""Mixture-of-Transformers (Liang et al., TMLR 2025) as a registered transformers architecture, model_type "mot":
`AutoModelForCausalLM.from_config(MoTConfig(...))`, `AutoModelForCausalLM.from_pretrained(...)`."""

from peft_ext.registry import register_auto_classes

from .configuration_mot import MoTConfig
from .modeling_mot import (
    ModalityModuleList,
    ModalityRouter,
    MoTCausalLMOutputWithPast,
    MoTForCausalLM,
    MoTModel,
    MoTPreTrainedModel,
    tower_target_modules,
)

__all__ = [
    "ModalityModuleList",
    "ModalityRouter",
    "MoTCausalLMOutputWithPast",
    "MoTConfig",
    "MoTForCausalLM",
    "MoTModel",
    "MoTPreTrainedModel",
    "tower_target_modules",
]

register_auto_classes("mot", MoTConfig, {"AutoModel": MoTModel, "AutoModelForCausalLM": MoTForCausalLM})
# With an Auto class recorded on the classes, `save_pretrained` also copies configuration_mot.py and
# modeling_mot.py beside the weights and writes `auto_map` into config.json, so a saved or pushed model loads
# with `trust_remote_code=True` where peft-ext is not installed. (Where it is, the registration above wins.)
MoTConfig.register_for_auto_class()
MoTModel.register_for_auto_class("AutoModel")
MoTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
