"""Stage 1 of MixDA: the domain-adapter loss (the paper's Eq. for L = λ·L_K + L_S) and a `Trainer` that uses it.

A stage-1 step sees two batches: unlabeled text of the new domain (with MLM labels) and general text (the "old
domain", e.g. the pre-training distribution). The loss is

    L = λ · MLM(domain batch) + mean over adapted layers and real tokens of ‖DA(a) − FFN(a)‖² on the general batch

with λ = 0.5 (the released code's `knowledge_loss_factor`). DA(a) − FFN(a) is the bottleneck Δ(a) (see
`peft_ext.tuners.mixda.layer`); the released code compares two references to the same tensor there, so its
second term is always 0: this one is the paper's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling, Trainer

from .layer import MixDALayer

GENERAL_PREFIX = "general_"


@contextmanager
def recording_domain_deltas(model: torch.nn.Module):
    """Within the block, every forward through a stage-1 MixDA layer appends (Δ(a), attention mask) to the
    yielded list."""
    layers = [m for m in model.modules() if isinstance(m, MixDALayer)]
    if not layers:
        raise ValueError("The model has no MixDA layers: wrap it with get_peft_model(model, MixDAConfig(stage='domain')).")
    contexts = {id(layer.forward_context): layer.forward_context for layer in layers}
    records: list = []
    for context in contexts.values():
        context.recorded_deltas = records
    try:
        yield records
    finally:
        for context in contexts.values():
            context.recorded_deltas = None


def knowledge_retention_loss(records: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Mean over layers of the per-token mean squared Δ(a), over the real (non-padding) tokens."""
    if not records:
        raise ValueError("No stage-1 MixDA adapter ran: is a MixDA adapter with stage='domain' active?")
    losses = []
    for delta, mask in records:
        per_token = delta.float().pow(2).mean(dim=-1)
        if mask is None:
            losses.append(per_token.mean())
        else:
            weights = mask.to(per_token.dtype)
            losses.append((per_token * weights).sum() / weights.sum().clamp(min=1.0))
    return torch.stack(losses).mean()


def mixda_domain_loss(model, domain_batch: dict, general_batch: dict, knowledge_weight: float = 0.5):
    """The stage-1 loss and its two terms: (λ · MLM + L2, MLM, L2). `domain_batch` has MLM `labels`;
    `general_batch` needs `input_ids` (and `attention_mask`), any `labels` are ignored."""
    mlm_loss = model(**domain_batch).loss
    general = {k: v for k, v in general_batch.items() if k != "labels"}
    with recording_domain_deltas(model) as records:
        model(**general)
    retention = knowledge_retention_loss(records)
    return knowledge_weight * mlm_loss + retention, mlm_loss, retention


@dataclass
class MixDADomainCollator:
    """Collates (domain text, general text) pairs for `MixDADomainTrainer`: the domain side gets MLM masking, the
    general side is prefixed with `general_`. Each example is a dict with "text" and "general_text"."""

    tokenizer: object
    max_length: int = 128
    mlm_probability: float = 0.15

    def __post_init__(self):
        self._mlm = DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=self.mlm_probability)

    def __call__(self, examples: list[dict]) -> dict:
        def encode(texts):
            return self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                  return_tensors="pt")

        domain = encode([e["text"] for e in examples])
        batch = self._mlm([{k: domain[k][i] for k in domain} for i in range(len(examples))])
        general = encode([e["general_text"] for e in examples])
        batch.update({GENERAL_PREFIX + k: v for k, v in general.items()})
        return batch


class MixDADomainTrainer(Trainer):
    """A `Trainer` for stage 1: `compute_loss` is `mixda_domain_loss` on the batch's domain and `general_*` parts
    (use `MixDADomainCollator` and `remove_unused_columns=False`)."""

    def __init__(self, *args, knowledge_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if knowledge_weight < 0:
            raise ValueError(f"`knowledge_weight` must be ≥ 0, got {knowledge_weight!r}.")
        self.knowledge_weight = knowledge_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        general = {k[len(GENERAL_PREFIX):]: v for k, v in inputs.items() if k.startswith(GENERAL_PREFIX)}
        domain = {k: v for k, v in inputs.items() if not k.startswith(GENERAL_PREFIX)}
        if not general:
            raise ValueError("The batch has no `general_*` inputs: use MixDADomainCollator, and set "
                             "`remove_unused_columns=False` in the TrainingArguments.")
        loss, _, _ = mixda_domain_loss(model, domain, general, self.knowledge_weight)
        return (loss, None) if return_outputs else loss
