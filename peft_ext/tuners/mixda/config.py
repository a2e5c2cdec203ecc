"""Configuration of MixDA adapters (both stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import TaskType

from peft_ext.registry import add_peft_type
from peft_ext.validation import check_choice, check_dropout, check_positive_int, normalize_module_targets

MIXDA = add_peft_type("MIXDA")
STAGES = ("domain", "task")
GATE_KINDS = ("softmax", "sigmoid")
GATE_GRANULARITIES = ("token", "sequence")


@dataclass
class MixDAConfig(PeftConfig):
    """Configuration of a [`MixDAModel`]: "Mixture-of-Domain-Adapters: Decoupling and Injecting Domain Knowledge
    to Pre-trained Language Models' Memories" (Diao et al., ACL 2023, https://arxiv.org/abs/2306.05406).

    MixDA attaches to the down projection of a transformer's feed-forward network (FFN), whose input is the
    FFN's intermediate activation `a` and whose output `FFN(a)` has the hidden size. One config describes one
    adapter of one of the two stages:

    * `stage="domain"` (stage 1, one adapter per domain, trained on unlabeled domain text): a domain adapter
      `DA(a) = FFN(a) + Δ(a)` with the bottleneck `Δ(a) = W_up GELU(W_down a)` (intermediate → `bottleneck_size`
      → hidden, `W_up` zero-initialized, so the model is unchanged at insertion). Trained with the paper's
      `L = λ · L_MLM(domain) + L_2`, `L_2 = ‖DA(a) − FFN(a)‖² = ‖Δ(a)‖²` on general text (see `mixda_domain_loss`).
    * `stage="task"` (stage 2, trained on labels): the frozen domain adapters named in `domain_adapters`, a gate
      and a task adapter (Pfeiffer-style bottleneck after the FFN, hidden → hidden / `task_reduction_factor`
      → hidden, ReLU, zero-initialized up projection):

          y  = FFN(a) + s · Σ_k g_k(a) Δ_k(a)              (mixture of the FFN and the K domain adapters)
          y' = y + W_up' ReLU(W_down' y)                   (task adapter)

      With `gate_kind="softmax"` (the released code) g = softmax(W_g a + b_g) over K + 1 experts (the FFN and
      the K domain adapters: Σ_j g_j E_j with E_0 = FFN and E_k = DA_k equals the line above with s = 1);
      with `gate_kind="sigmoid"` (the paper) g_k = σ(W_g a + b_g)_k, one independent weight per adapter. The
      scalar s (per layer) starts at 0, so inserting the stage-2 model leaves the output unchanged even with
      trained domain adapters, where a uniform softmax over trained adapters would move it (the released code
      also halves the FFN output at insertion, since its adapters replace rather than add to the FFN).
      `gate_granularity="token"` computes the gate at every position; `"sequence"` computes one gate per
      sequence from the mean of `a` over the non-padding positions (the attention mask is read from the
      model's inputs), where the released code reads the last position (a pad token under right padding).

    Departures from the paper and the released code are listed in `peft_ext/tuners/mixda/__init__.py`.

    Args:
        stage (`str`): "domain" (stage 1) or "task" (stage 2).
        bottleneck_size (`int`): width of a domain adapter's bottleneck (the paper uses 256 on RoBERTa-large).
        domain_dropout (`float`): dropout on a domain adapter's input in stage 1, in [0, 1).
        target_modules (`list[str] | str`): the FFN down projections to attach to (suffix match or a regex).
            Defaults per architecture: BERT/RoBERTa `output.dense` (without `attention.output.dense`), GPT-2
            `mlp.c_proj`, Llama/Mistral/Qwen2 `mlp.down_proj`.
        exclude_modules (`list[str] | str`): modules never to adapt.
        layers_to_transform (`list[int] | int`): layer indices to adapt (the paper: 7 and 11 of RoBERTa-large).
            An index that is not a layer of the model is an error.
        layers_pattern (`list[str] | str`): name of the layer `nn.ModuleList`, used with `layers_to_transform`.
        modules_to_save (`list[str]`): other modules trained fully and saved (e.g. a new head).
        domain_adapters (`dict[str, int]`): stage 2 only: domain adapter name → its bottleneck size, in gate
            order. Filled by [`MixDAModel.for_task`]; the frozen weights are saved inside the task adapter.
        domain_adapter_sources (`dict[str, str]`): stage 2 only: where each domain adapter was loaded from
            (folder or Hub id), for the record.
        gate_kind (`str`): "softmax" (over K + 1) or "sigmoid" (K independent weights).
        gate_granularity (`str`): "token" or "sequence"; "sequence" pools over the whole sequence and so is
            only for bidirectional encoders (not `task_type="CAUSAL_LM"`).
        task_reduction_factor (`int`): the task adapter's bottleneck is hidden size // this (Pfeiffer: 16).
    """

    stage: Literal["domain", "task"] = field(default="domain", metadata={"help": "'domain' (stage 1) or 'task'."})
    bottleneck_size: int = field(default=256, metadata={"help": "Bottleneck width of a domain adapter."})
    domain_dropout: float = field(default=0.0, metadata={"help": "Dropout on the domain adapter input."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "FFN down projections."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained fully and saved."})
    domain_adapters: dict[str, int] | None = field(
        default=None, metadata={"help": "Stage 2: domain adapter name -> bottleneck size, in gate order."}
    )
    domain_adapter_sources: dict[str, str] | None = field(
        default=None, metadata={"help": "Stage 2: where each domain adapter was loaded from."}
    )
    gate_kind: Literal["softmax", "sigmoid"] = field(default="softmax", metadata={"help": "'softmax' or 'sigmoid'."})
    gate_granularity: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "'token' or 'sequence' (masked mean)."}
    )
    task_reduction_factor: int = field(default=16, metadata={"help": "Task adapter bottleneck = hidden // this."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MIXDA
        check_choice("stage", self.stage, STAGES)
        check_positive_int("bottleneck_size", self.bottleneck_size)
        check_positive_int("task_reduction_factor", self.task_reduction_factor)
        check_dropout("domain_dropout", self.domain_dropout)
        check_choice("gate_kind", self.gate_kind, GATE_KINDS)
        check_choice("gate_granularity", self.gate_granularity, GATE_GRANULARITIES)
        if self.gate_granularity == "sequence" and self.task_type == TaskType.CAUSAL_LM:
            raise ValueError(
                "`gate_granularity='sequence'` pools over the whole sequence, which would let a causal LM's "
                "early positions see later tokens: use gate_granularity='token' with task_type='CAUSAL_LM'."
            )
        if self.stage == "task":
            if not self.domain_adapters:
                raise ValueError(
                    "`domain_adapters` must name at least one domain adapter for stage='task' (K ≥ 1), "
                    f"got {self.domain_adapters!r}."
                )
            for name, size in self.domain_adapters.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(f"`domain_adapters` names must be identifiers (no dots), got {name!r}.")
                check_positive_int(f"domain_adapters[{name!r}]", size)
        elif self.domain_adapters or self.domain_adapter_sources:
            raise ValueError("`domain_adapters` and `domain_adapter_sources` are for stage='task' only; "
                             f"this config has stage={self.stage!r}.")
        normalize_module_targets(self)

    @property
    def num_domains(self) -> int:
        return len(self.domain_adapters or {})
