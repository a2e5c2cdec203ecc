"""The NOLA tuner: finds the target modules and wraps them in NOLA layers."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import NolaConfig
from .layer import Embedding, Linear, NolaLayer

# Saved beside the coefficients (8 bytes) so that loading into a config with another seed is caught.
BASIS_SEED_KEY = "base_model.nola_basis_seed"


def _get_tuner_layer_class(base_layer: nn.Module) -> type[NolaLayer] | None:
    if isinstance(base_layer, (nn.Linear, Conv1D)):
        return Linear
    if isinstance(base_layer, nn.Embedding):
        return Embedding
    backend = resolve_quantization_backend(base_layer)
    if backend is not None and backend.layer_type == "linear":
        return Linear
    return None


class NolaModel(BaseTuner):
    """Adds NOLA adapters to a model (see [`NolaConfig`] for the method).

    Example:
        ```py
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ext.NolaConfig(r=8, num_basis_A=1024, num_basis_B=1024,
        ...                                                   target_modules=["q_proj", "v_proj"]))
        ```
    """

    prefix: str = "nola_coef_"
    tuner_layer_cls = NolaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, nola_config: NolaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, NolaLayer):
            target.update_layer(adapter_name, nola_config, module_name=current_key)
            return
        new_module = self._create_new_module(nola_config, adapter_name, target, current_key,
                                             **get_quantization_kwargs(self))
        if adapter_name not in self.active_adapter:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(nola_config: NolaConfig, adapter_name: str, target: nn.Module, module_name: str, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = _get_tuner_layer_class(base_layer)
        if layer_cls is None:
            raise TypeError(
                f"NOLA cannot adapt module {module_name!r} of type {type(base_layer).__name__}: supported types are "
                "torch.nn.Linear, torch.nn.Embedding, transformers' Conv1D and bitsandbytes Linear8bitLt/Linear4bit."
            )
        if isinstance(base_layer, Conv1D):
            kwargs["is_target_conv_1d_layer"] = True
            if not nola_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is False but the target module is `Conv1D`; setting it to True.", stacklevel=2)
                nola_config.fan_in_fan_out = True
        elif layer_cls is Linear and nola_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target module is a linear layer; setting it to False.", stacklevel=2)
            nola_config.fan_in_fan_out = False
        return layer_cls(target, adapter_name, config=nola_config, module_name=module_name, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        to_return[BASIS_SEED_KEY] = torch.tensor([config.basis_seed], dtype=torch.int64)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        saved_seed = state_dict.pop(BASIS_SEED_KEY, None)
        if saved_seed is not None and int(saved_seed.reshape(-1)[0]) != config.basis_seed:
            warnings.warn(
                f"The NOLA adapter {adapter_name!r} was trained with basis_seed={int(saved_seed.reshape(-1)[0])} but is "
                f"loaded into a config with basis_seed={config.basis_seed}: its coefficients will multiply different "
                "random bases and the adapter will not reproduce its outputs. Load it with its saved config.", stacklevel=2
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
