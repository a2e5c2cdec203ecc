"""LongMem (Wang et al., NeurIPS 2023) as a registered transformers architecture, model_type "longmem": a frozen
backbone fills a memory bank of attention keys/values, a trained SideNet retrieves and reads it."""

from peft_ext.registry import register_auto_classes

from .configuration_longmem import LongMemConfig
from .memory_bank import MemoryBank, MemoryBankSpec
from .modeling_longmem import LongMemForCausalLM, LongMemPreTrainedModel

__all__ = ["LongMemConfig", "LongMemForCausalLM", "LongMemPreTrainedModel", "MemoryBank", "MemoryBankSpec"]

register_auto_classes("longmem", LongMemConfig, {"AutoModelForCausalLM": LongMemForCausalLM})
