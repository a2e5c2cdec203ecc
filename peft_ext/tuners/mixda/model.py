"""The MixDA tuner: wraps the FFN down projections, shares the attention mask with them, and builds stage 2."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TaskType
from peft.utils.save_and_load import load_peft_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MixDAConfig
from .layer import _MERGE_REFUSAL, Linear, MixDAForwardContext, MixDALayer

# The FFN down projection (input: intermediate activation, output: hidden size) of each architecture family.
MIXDA_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "xlm-roberta": ["output.dense"],
    "gpt2": ["mlp.c_proj"],
    "llama": ["mlp.down_proj"],
    "mistral": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
}
# In BERT-style encoders `output.dense` also matches the attention block's output projection.
MIXDA_EXCLUDE_MODULES: dict[str, list[str]] = {
    "bert": ["attention.output.dense"],
    "roberta": ["attention.output.dense"],
    "xlm-roberta": ["attention.output.dense"],
}

_TASK_TYPE_BY_CLASS_SUFFIX = {
    "ForSequenceClassification": TaskType.SEQ_CLS,
    "ForTokenClassification": TaskType.TOKEN_CLS,
    "ForCausalLM": TaskType.CAUSAL_LM,
    "LMHeadModel": TaskType.CAUSAL_LM,
    "ForQuestionAnswering": TaskType.QUESTION_ANS,
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class MixDAModel(BaseTuner):
    """Adds MixDA adapters to a model (see [`MixDAConfig`] for the method).

    Stage 1, one domain adapter per domain (train with `MixDADomainTrainer` or `mixda_domain_loss`):

        ```py
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> mlm = get_peft_model(encoder_mlm, peft_ext.MixDAConfig(stage="domain", layers_to_transform=[2, 5]),
        ...                      adapter_name="news")
        >>> mlm.save_pretrained("out")          # out/news: this domain adapter only; also push_to_hub
        ```

    Stage 2, any set of saved domain adapters (frozen) + gate + task adapter + head:

        ```py
        >>> clf = peft_ext.MixDAModel.for_task(classifier_base, {"news": "out/news", "wiki": "org/wiki-adapter"})
        >>> # train with transformers.Trainer; then clf.save_pretrained("task") saves one self-contained adapter
        >>> PeftModel.from_pretrained(classifier_base, "task")
        ```
    """

    prefix: str = "mixda_"
    tuner_layer_cls = MixDALayer
    target_module_mapping = MIXDA_TARGET_MODULES

    # ---- injection --------------------------------------------------------------------------------------------

    def _forward_context(self) -> MixDAForwardContext:
        """The context shared by this model's MixDA layers; created with the hook that fills it, once."""
        context = self.__dict__.get("_mixda_context")
        if context is None:
            context = MixDAForwardContext()

            def capture_attention_mask(module, args, kwargs):
                # Overwritten on every forward (None when absent), so a mask never outlives its batch.
                context.attention_mask = kwargs.get("attention_mask")

            self.__dict__["_mixda_context"] = context
            self.__dict__["_mixda_hook"] = self.model.register_forward_pre_hook(capture_attention_mask,
                                                                                with_kwargs=True)
        return context

    def _prepare_adapter_config(self, peft_config: MixDAConfig, model_config: dict) -> MixDAConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            if model_type not in MIXDA_TARGET_MODULES:
                raise ValueError(
                    f"MixDA has no default FFN down projection for model_type {model_type!r}: set `target_modules` "
                    f"(known defaults: {sorted(MIXDA_TARGET_MODULES)})."
                )
            peft_config.target_modules = set(MIXDA_TARGET_MODULES[model_type])
            if peft_config.exclude_modules is None and model_type in MIXDA_EXCLUDE_MODULES:
                peft_config.exclude_modules = set(MIXDA_EXCLUDE_MODULES[model_type])
        return peft_config

    def _create_and_replace(self, config: MixDAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, MixDALayer):
            target.update_layer(adapter_name, config)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(
                f"MixDA attaches to an FFN down projection, but {current_key!r} is a {type(base_layer).__name__}: "
                "target an nn.Linear or transformers' Conv1D."
            )
        new_module = Linear(target, adapter_name, config, self._forward_context())
        if adapter_name not in self.active_adapter:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._check_layers_exist(adapter_name)

    def _check_layers_exist(self, adapter_name: str) -> None:
        """peft silently skips a `layers_to_transform` index that the model does not have: name it instead."""
        wanted = self.peft_config[adapter_name].layers_to_transform
        if wanted is None:
            return
        adapted = set()
        for name, module in self.model.named_modules():
            if isinstance(module, MixDALayer) and adapter_name in module.mixda_stage:
                match = _LAYER_INDEX.search(name)
                if match:
                    adapted.add(int(match.group(1)))
        missing = sorted(set(wanted) - adapted)
        if missing:
            raise ValueError(
                f"`layers_to_transform` has layer(s) {missing} where MixDA found no target module; the adapted "
                f"layers are {sorted(adapted)}. Check the indices against the model's number of layers."
            )

    # ---- merging is impossible --------------------------------------------------------------------------------

    def _check_merge_allowed(self):
        raise NotImplementedError(_MERGE_REFUSAL)

    def unload(self) -> nn.Module:
        model = super().unload()
        hook = self.__dict__.pop("_mixda_hook", None)
        if hook is not None:
            hook.remove()
        self.__dict__.pop("_mixda_context", None)
        return model

    # ---- stage 2 ----------------------------------------------------------------------------------------------

    @classmethod
    def for_task(
        cls,
        model: nn.Module,
        domain_adapters: Mapping[str, str | os.PathLike],
        *,
        adapter_name: str = "default",
        gate_kind: str = "softmax",
        gate_granularity: str = "token",
        task_reduction_factor: int = 16,
        modules_to_save: list[str] | None = None,
        task_type: str | None = None,
        **load_kwargs,
    ) -> PeftModel:
        """Stage 2: a `PeftModel` of `model` with the saved domain adapters (frozen), a gate and a task adapter.

        Args:
            model: the base model of the task (e.g. `AutoModelForSequenceClassification`, whose new head trains
                and is saved with the adapter).
            domain_adapters: domain name → folder or Hub repo id of a stage-1 adapter (saved with
                `save_pretrained` / `push_to_hub`), in gate order. The adapter may sit at the root or, as
                peft saves an adapter not named "default", in a subfolder named after the domain. Any subset of the saved domains may be used;
                all must be trained on the same FFN layers of a base with this model's sizes.
            task_type: peft task type; inferred from the model class when None (e.g. "SEQ_CLS").
            load_kwargs: passed to the Hub download (e.g. `revision`, `token`).

        The returned model's adapter file holds the gate, the task adapter, the head and a copy of the K domain
        adapters, so `PeftModel.from_pretrained(base, folder)` restores it without the stage-1 folders.
        """
        sources = {name: str(source) for name, source in domain_adapters.items()}
        domain_configs, domain_load_kwargs = {}, {}
        for name, source in sources.items():
            domain_configs[name], domain_load_kwargs[name] = _load_domain_config(name, source, load_kwargs)
        for name, domain_config in domain_configs.items():
            if not isinstance(domain_config, MixDAConfig) or domain_config.stage != "domain":
                raise ValueError(f"{sources[name]!r} (domain {name!r}) is not a MixDA domain adapter (stage='domain'), "
                                 f"it holds a {type(domain_config).__name__}.")
        first = next(iter(domain_configs.values()), None)
        if task_type is None:
            class_name = type(model).__name__
            task_type = next((t for suffix, t in _TASK_TYPE_BY_CLASS_SUFFIX.items() if class_name.endswith(suffix)),
                             None)
        config = MixDAConfig(
            stage="task",
            domain_adapters={name: c.bottleneck_size for name, c in domain_configs.items()},
            domain_adapter_sources=sources,
            target_modules=first.target_modules if first else None,
            exclude_modules=first.exclude_modules if first else None,
            layers_to_transform=first.layers_to_transform if first else None,
            layers_pattern=first.layers_pattern if first else None,
            gate_kind=gate_kind,
            gate_granularity=gate_granularity,
            task_reduction_factor=task_reduction_factor,
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        for name, source in sources.items():
            weights = load_peft_weights(source, **domain_load_kwargs[name])
            _copy_domain_weights(peft_model, adapter_name, name, source, weights)
        return peft_model


def _load_domain_config(name: str, source: str, load_kwargs: dict) -> tuple[PeftConfig, dict]:
    """The config of the domain adapter at `source` (root, else the subfolder `name`) and the download kwargs
    that reach it."""
    try:
        return PeftConfig.from_pretrained(source, **load_kwargs), dict(load_kwargs)
    except (OSError, ValueError) as root_error:
        in_subfolder = {**load_kwargs, "subfolder": "/".join(filter(None, [load_kwargs.get("subfolder"), name]))}
        try:
            return PeftConfig.from_pretrained(source, **in_subfolder), in_subfolder
        except (OSError, ValueError):
            raise ValueError(f"No adapter_config.json for the domain adapter {name!r} in {source!r}, neither at its "
                             f"root nor in its subfolder {name!r}.") from root_error


def _copy_domain_weights(peft_model: PeftModel, task_adapter: str, domain: str, source: str,
                         weights: dict[str, torch.Tensor]) -> None:
    """Copy a saved domain adapter into the frozen buffers of a task adapter, layer by layer, checking shapes."""
    layers = [(n, m) for n, m in peft_model.named_modules()
              if isinstance(m, MixDALayer) and task_adapter in m.mixda_domains]
    used = set()
    for module_name, layer in layers:
        parts = {}
        for part in ("mixda_down", "mixda_up"):
            keys = {f"{module_name}.{part}.{p}": p for p in ("weight", "bias")}
            missing = [k for k in keys if k not in weights]
            if missing:
                raise ValueError(
                    f"The domain adapter {domain!r} ({source}) has no weights for {module_name!r}: every domain "
                    "adapter of a task must be trained on the same FFN layers of the same architecture."
                )
            parts[part] = {p: weights[k] for k, p in keys.items()}
            used.update(keys)
        target = layer.mixda_domains[task_adapter][domain]
        saved = (parts["mixda_down"]["weight"].shape[1], parts["mixda_down"]["weight"].shape[0],
                 parts["mixda_up"]["weight"].shape[0])
        expected = (target.down_weight.shape[1], target.down_weight.shape[0], target.up_weight.shape[0])
        if saved != expected:
            raise ValueError(
                f"The domain adapter {domain!r} ({source}) maps {saved[0]} → {saved[1]} → {saved[2]} at "
                f"{module_name!r}, but this model's FFN there maps {expected[0]} → {expected[2]} (bottleneck "
                f"{expected[1]}): it was trained on a base model with other hidden or intermediate sizes."
            )
        target.load_from(parts["mixda_down"], parts["mixda_up"])
    unused = sorted(k for k in weights if ".mixda_" in k and k not in used)
    if unused:
        raise ValueError(f"The domain adapter {domain!r} ({source}) has weights for layers this task model does not "
                         f"adapt, e.g. {unused[0]!r}: train all domain adapters on the same layers.")
