"""MixDA layers: a wrapper of an FFN's down projection that adds domain adapters, the gate and the task adapter.

The wrapped layer maps the FFN's intermediate activation `a` (the input of the down projection) to the hidden
size. With `FFN(a)` the frozen down projection's output, an adapter of each stage adds (see `MixDAConfig`):

    stage "domain":  y = FFN(a) + Δ(a),                          Δ(a) = W_up GELU(W_down a)
    stage "task":    y = FFN(a) + s · Σ_k g_k(a) Δ_k(a),         Δ_k frozen (buffers), g the gate
                     y' = y + W_up' ReLU(W_down' y)             (task adapter)

Δ is the paper's domain adapter written relative to the FFN it sits beside (DA(a) = FFN(a) + Δ(a)), so the
paper's knowledge-retention term ‖DA(a) − FFN(a)‖² is ‖Δ(a)‖², and the softmax mixture of the FFN and the K
domain adapters, Σ_j g_j E_j with E_0 = FFN, E_k = DA_k, is FFN + Σ_k g_k Δ_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_ext.validation import base_layer_features

from .config import MixDAConfig


@dataclass
class MixDAForwardContext:
    """What the layers of one model share during a forward pass.

    `attention_mask` is set from the model's inputs by a forward pre-hook (see `MixDAModel`), so a sequence-level
    gate can pool over the real tokens only. `recorded_deltas`, when a list, collects (Δ(a), attention mask) of
    every domain-stage adapter, for the stage-1 knowledge-retention loss.
    """

    attention_mask: torch.Tensor | None = None
    recorded_deltas: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None


class FrozenDomainAdapter(nn.Module):
    """A trained domain adapter's bottleneck Δ(a) = W_up GELU(W_down a + b_down) + b_up, held in buffers.

    Buffers, not parameters: no optimizer, `Trainer` or `requires_grad_` call can reach them, so they stay
    bit-identical through stage 2. They are saved in the task adapter's file.
    """

    def __init__(self, in_features: int, bottleneck_size: int, out_features: int):
        super().__init__()
        self.register_buffer("down_weight", torch.zeros(bottleneck_size, in_features))
        self.register_buffer("down_bias", torch.zeros(bottleneck_size))
        self.register_buffer("up_weight", torch.zeros(out_features, bottleneck_size))
        self.register_buffer("up_bias", torch.zeros(out_features))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(a, self.down_weight, self.down_bias)), self.up_weight, self.up_bias)

    @torch.no_grad()
    def load_from(self, down: dict[str, torch.Tensor], up: dict[str, torch.Tensor]) -> None:
        for buffer, source in ((self.down_weight, down["weight"]), (self.down_bias, down["bias"]),
                               (self.up_weight, up["weight"]), (self.up_bias, up["bias"])):
            buffer.copy_(source)


def masked_mean(a: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `a` (batch, seq, features) over the positions where `attention_mask` (batch, seq) is 1."""
    if attention_mask is None:
        return a.mean(dim=1)
    if attention_mask.shape != a.shape[:2]:
        raise ValueError(
            f"The attention mask has shape {tuple(attention_mask.shape)} but the FFN activation has (batch, seq) = "
            f"{tuple(a.shape[:2])}: a sequence-level MixDA gate needs one mask entry per position."
        )
    weights = attention_mask.to(a.dtype).unsqueeze(-1)
    return (a * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MixDALayer(BaseTunerLayer):
    # Trainable per adapter: a stage-1 adapter has mixda_down/mixda_up; a stage-2 adapter the rest.
    adapter_layer_names = ("mixda_down", "mixda_up", "mixda_gate", "mixda_gate_scale", "mixda_task_down",
                           "mixda_task_up")
    other_param_names = ("mixda_domains", "mixda_stage", "mixda_dropout", "gate_kind", "gate_granularity")

    def __init__(self, base_layer: nn.Module, forward_context: MixDAForwardContext, **kwargs) -> None:
        self.base_layer = base_layer
        self.mixda_down = nn.ModuleDict({})
        self.mixda_up = nn.ModuleDict({})
        self.mixda_dropout = nn.ModuleDict({})
        self.mixda_gate = nn.ModuleDict({})
        self.mixda_gate_scale = nn.ParameterDict({})
        self.mixda_task_down = nn.ModuleDict({})
        self.mixda_task_up = nn.ModuleDict({})
        self.mixda_domains = nn.ModuleDict({})
        self.mixda_stage: dict[str, str] = {}
        self.gate_kind: dict[str, str] = {}
        self.gate_granularity: dict[str, str] = {}
        self.forward_context = forward_context
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer_features(self, "MixDA")
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: MixDAConfig, inference_mode: bool = False, **kwargs) -> None:
        self.mixda_stage[adapter_name] = config.stage
        if config.stage == "domain":
            down = nn.Linear(self.in_features, config.bottleneck_size)
            up = nn.Linear(config.bottleneck_size, self.out_features)
            # W_down keeps nn.Linear's Kaiming-uniform init; W_up = 0 so the model is unchanged at insertion.
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
            self.mixda_down[adapter_name] = down
            self.mixda_up[adapter_name] = up
            self.mixda_dropout[adapter_name] = (nn.Dropout(config.domain_dropout) if config.domain_dropout > 0
                                                else nn.Identity())
        else:
            self.mixda_domains[adapter_name] = nn.ModuleDict({
                name: FrozenDomainAdapter(self.in_features, size, self.out_features)
                for name, size in config.domain_adapters.items()
            })
            num_gates = config.num_domains + (1 if config.gate_kind == "softmax" else 0)
            gate = nn.Linear(self.in_features, num_gates)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            self.mixda_gate[adapter_name] = gate
            # shape (1,), not (): DeepSpeed cannot flatten 0-dim parameters
            self.mixda_gate_scale[adapter_name] = nn.Parameter(torch.zeros(1))
            self.gate_kind[adapter_name] = config.gate_kind
            self.gate_granularity[adapter_name] = config.gate_granularity
            task_size = max(1, self.out_features // config.task_reduction_factor)
            task_down = nn.Linear(self.out_features, task_size)
            task_up = nn.Linear(task_size, self.out_features)
            nn.init.kaiming_uniform_(task_down.weight, a=math.sqrt(5))
            nn.init.zeros_(task_down.bias)
            nn.init.zeros_(task_up.weight)
            nn.init.zeros_(task_up.bias)
            self.mixda_task_down[adapter_name] = task_down
            self.mixda_task_up[adapter_name] = task_up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def gate_weights(self, adapter_name: str, a: torch.Tensor) -> torch.Tensor:
        """The weights g_k of the K domain adapters of a task adapter: shape (..., K), or (batch, 1, K) for a
        sequence-level gate. For the softmax gate, the FFN's own weight g_0 is left out (it multiplies Δ_0 = 0)."""
        gate_input = a
        if self.gate_granularity[adapter_name] == "sequence":
            if a.dim() != 3:
                raise ValueError(f"A sequence-level MixDA gate needs a (batch, seq, features) input, got {tuple(a.shape)}.")
            gate_input = masked_mean(a, self.forward_context.attention_mask).unsqueeze(1)
        gate = self.mixda_gate[adapter_name]
        logits = gate(gate_input.to(gate.weight.dtype))
        if self.gate_kind[adapter_name] == "softmax":
            return logits.softmax(dim=-1)[..., 1:]
        return logits.sigmoid()

    def _domain_delta(self, adapter_name: str, a: torch.Tensor) -> torch.Tensor:
        down, up = self.mixda_down[adapter_name], self.mixda_up[adapter_name]
        x = self._cast_input_dtype(self.mixda_dropout[adapter_name](a), down.weight.dtype)
        return up(F.gelu(down(x)))

    def _mixture(self, adapter_name: str, a: torch.Tensor) -> torch.Tensor:
        """s · Σ_k g_k(a) Δ_k(a)."""
        domains = list(self.mixda_domains[adapter_name].values())
        x = a.to(domains[0].down_weight.dtype)
        weights = self.gate_weights(adapter_name, a).to(x.dtype)
        # K is small: accumulating avoids stacking K hidden-sized outputs for a batched matmul
        mixture = weights[..., 0:1] * domains[0](x)
        for k, domain in enumerate(domains[1:], start=1):
            mixture = mixture + weights[..., k:k + 1] * domain(x)
        return self.mixda_gate_scale[adapter_name] * mixture

    def _task_adapter(self, adapter_name: str, y: torch.Tensor) -> torch.Tensor:
        down, up = self.mixda_task_down[adapter_name], self.mixda_task_up[adapter_name]
        y_in = y.to(down.weight.dtype)
        return (y_in + up(F.relu(down(y_in)))).to(y.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(_MERGE_REFUSAL)

    def unmerge(self) -> None:
        raise NotImplementedError(_MERGE_REFUSAL)


_MERGE_REFUSAL = (
    "MixDA adapters cannot be merged into the base weights: a domain adapter is a GELU bottleneck beside the FFN, "
    "its gate depends on the input and the task adapter is a ReLU bottleneck, so no weight update reproduces them. "
    "Keep the PeftModel for inference, or call `unload()` to get the base model back without the adapters."
)


class Linear(nn.Module, MixDALayer):
    """MixDA on an FFN down projection: `nn.Linear` (BERT, RoBERTa, Llama) or GPT-2's `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixDAConfig,
                 forward_context: MixDAForwardContext, **kwargs) -> None:
        super().__init__()
        MixDALayer.__init__(self, base_layer, forward_context, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, a: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(a, *args, **kwargs)
        if self.disable_adapters:
            return result
        previous_dtype = result.dtype
        for adapter_name in self.active_adapters:
            stage = self.mixda_stage.get(adapter_name)
            if stage == "domain":
                delta = self._domain_delta(adapter_name, a)
                recorded = self.forward_context.recorded_deltas
                if recorded is not None:
                    recorded.append((delta, self.forward_context.attention_mask))
                result = result + delta.to(result.dtype)
            elif stage == "task":
                result = result + self._mixture(adapter_name, a).to(result.dtype)
                result = self._task_adapter(adapter_name, result)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "mixda." + super().__repr__()
