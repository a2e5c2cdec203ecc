"""Pretrain a Mixture-of-Transformers model, or the dense Llama of the same active size, from scratch with `Trainer`.

    python examples/mot_pretrain.py --architecture mot --output_dir out/mot --max_steps 600 --learning_rate 3e-3 \\
        --warmup_steps 50 --per_device_train_batch_size 16
    python examples/mot_pretrain.py --architecture dense --output_dir out/dense ...   # the baseline, same flags
    python examples/mot_pretrain.py --from_dense out/dense --output_dir out/upcycled ...   # upcycle a saved Llama
    accelerate launch examples/mot_pretrain.py ...      # any accelerate / DDP / multi-GPU setup

The data is the interleaved text/image corpus of `peft_ext.models.mot.corpus` (offline: the news articles gensim
ships as UTF-8 bytes, and scikit-learn's 8×8 digits as 16-level image tokens; `pip install "peft-ext[tour]"`).
MoT unties every non-embedding parameter by modality (`--untie_attention/--untie_ffn/--untie_norms`), so a
token costs the same FLOPs as in the dense model of the same shape. After training, the script reports the
validation loss of each modality ("val loss text X image Y"), logs it as `eval_loss_<modality>` and saves the
model; load it with `import peft_ext` then `AutoModelForCausalLM.from_pretrained(output_dir)`. The token ids
are the corpus's (bytes 0-255, special tokens, image levels), so there is no tokenizer to save.

Every `TrainingArguments` flag works (`--max_steps`, `--learning_rate`, `--eval_strategy steps`, `--use_cpu`, ...);
its default learning rate (5e-5) is meant for fine-tuning: from scratch, use ~3e-3 at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

from peft_ext import MoTConfig, MoTForCausalLM
from peft_ext.models.mot.configuration_mot import NORM_PLACEMENTS
from peft_ext.models.mot.corpus import (
    MODALITY_NAMES,
    VOCAB_SIZE,
    InterleavedCorpus,
    build_interleaved_corpus,
    count_parameters,
    modality_of_tokens,
    model_shape,
)

ARCHITECTURES = ("mot", "dense")


@dataclass
class ScriptArguments:
    architecture: str = field(default="mot", metadata={"help": "mot, or dense (the Llama of the same active size)."})
    from_dense: str | None = field(default=None, metadata={
        "help": "Folder (or Hub id) of a saved LlamaForCausalLM to upcycle into MoT (MoT.from_dense); its shape "
                "replaces --hidden_size/--num_layers/--num_attention_heads."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "Attention heads; default hidden_size // 64 (at least 1)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training block (at least 80: an image is 66)."})
    text_bytes: int = field(default=96, metadata={"help": "Bytes of text between two images in the corpus."})
    untie_attention: bool = field(default=True, metadata={"help": "MoT: per-modality Q/K/V/O projections."})
    untie_ffn: bool = field(default=True, metadata={"help": "MoT: per-modality feed-forward networks."})
    untie_norms: bool = field(default=True, metadata={"help": "MoT: per-modality RMSNorms."})
    norm_placement: str = field(default="pre", metadata={"help": "MoT: pre (Llama) or post_branch (Chameleon)."})

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"`architecture` must be 'mot' or 'dense', got {self.architecture!r}.")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"`norm_placement` must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}.")
        for name in ("hidden_size", "num_layers", "text_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.seq_len < 80:
            raise ValueError(f"`seq_len` must be at least 80 (an image takes 66 tokens), got {self.seq_len}.")
        if self.num_attention_heads is None:
            self.num_attention_heads = max(1, self.hidden_size // 64)
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` must be a positive divisor of `hidden_size` ({self.hidden_size}), got "
                f"{self.num_attention_heads}."
            )
        if self.architecture == "dense":
            if self.from_dense is not None:
                raise ValueError("`from_dense` upcycles a dense model into MoT: it needs `architecture` 'mot', got 'dense'.")
            untied_off = [n for n in ("untie_attention", "untie_ffn", "untie_norms") if not getattr(self, n)]
            if untied_off:
                raise ValueError(f"{', '.join(f'`{n}`' for n in untied_off)} apply to `architecture` 'mot' only.")
            if self.norm_placement != "pre":
                raise ValueError(
                    f"`norm_placement` {self.norm_placement!r} needs `architecture` 'mot'; the dense Llama is 'pre'."
                )
        if self.from_dense is not None and self.norm_placement != "pre":
            raise ValueError(
                f"`norm_placement` must be 'pre' with `from_dense` (the upcycled model starts as the dense Llama), "
                f"got {self.norm_placement!r}."
            )


def build_model(args: ScriptArguments):
    untie = {"untie_attention": args.untie_attention, "untie_ffn": args.untie_ffn, "untie_norms": args.untie_norms}
    if args.from_dense is not None:
        dense = AutoModelForCausalLM.from_pretrained(args.from_dense, dtype=torch.float32)
        if not isinstance(dense, LlamaForCausalLM):
            raise ValueError(f"`from_dense` must be a saved LlamaForCausalLM, got {type(dense).__name__}.")
        if dense.config.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"`from_dense`: the model's vocab_size ({dense.config.vocab_size}) must cover the corpus's "
                f"{VOCAB_SIZE} token ids."
            )
        return MoTForCausalLM.from_dense(dense, **InterleavedCorpus.mot_kwargs(), **untie)
    if args.architecture == "dense":
        return LlamaForCausalLM(LlamaConfig(**model_shape(args.hidden_size, args.num_layers, args.num_attention_heads, args.seq_len), **InterleavedCorpus.config_kwargs()))
    config = MoTConfig(**model_shape(args.hidden_size, args.num_layers, args.num_attention_heads, args.seq_len), **InterleavedCorpus.config_kwargs(), **InterleavedCorpus.mot_kwargs(),
                       norm_placement=args.norm_placement, **untie)
    return MoTForCausalLM(config)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@torch.no_grad()
def evaluate_per_modality(trainer: Trainer, dataset: Dataset) -> dict[str, float]:
    """Validation loss of each modality: the model's `loss_per_modality` (for the dense model, the same quantity
    from its logits), weighted by each batch's targets of that modality, summed over batches and processes.

    Runs on every process, each on its shard of the validation set (as `Trainer.evaluate` does).
    """
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    model.eval()
    k = len(MODALITY_NAMES)
    sums = torch.zeros(k, dtype=torch.float64, device=trainer.args.device)
    counts = torch.zeros_like(sums)
    for batch in trainer.get_eval_dataloader(dataset):
        input_ids, labels = batch["input_ids"], batch["labels"]
        with trainer.autocast_smart_context_manager():
            out = model(input_ids=input_ids, labels=labels)
        modality = modality_of_tokens(labels[:, 1:]).reshape(-1)
        n = torch.bincount(modality, minlength=k).to(sums)
        means = getattr(out, "loss_per_modality", None)
        if means is None:  # dense: the same per-modality mean next-token cross-entropy, from the logits
            per_token = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                                        labels[:, 1:].reshape(-1), reduction="none")
            means = per_token.new_zeros(k).index_add(0, modality, per_token) / n.clamp(min=1).to(per_token)
        sums += means.to(sums).nan_to_num() * n  # a modality absent from the batch: NaN * 0 -> 0
        counts += n
    sums = trainer.accelerator.reduce(sums, reduction="sum")
    counts = trainer.accelerator.reduce(counts, reduction="sum")
    model.train()
    return {f"eval_loss_{name}": (sums[m] / counts[m]).item() for m, name in enumerate(MODALITY_NAMES)}


def main() -> None:
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    corpus = build_interleaved_corpus(seq_len=args.seq_len, text_bytes=args.text_bytes)
    validation = corpus.validation
    # Several processes: keep whole global batches, so that no process pads its shard with repeated blocks.
    global_batch = training_args.per_device_eval_batch_size * training_args.world_size
    if training_args.world_size > 1 and len(validation) >= global_batch:
        validation = validation[: len(validation) // global_batch * global_batch]
    train_set = Dataset.from_dict({"input_ids": corpus.train.tolist()})
    validation_set = Dataset.from_dict({"input_ids": validation.tolist()})

    model = build_model(args)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=validation_set,
                      data_collator=collate)
    if trainer.is_world_process_zero():
        total, active = count_parameters(model)
        name = type(model).__name__ + (f" (upcycled from {args.from_dense})" if args.from_dense else "")
        print(f"{name}: {total:,} parameters, {active:,} active per token; "
              f"{len(train_set)} training and {len(validation_set)} validation blocks of {args.seq_len} tokens")
    trainer.train()

    metrics = evaluate_per_modality(trainer, validation_set)
    trainer.log(metrics)
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        print("val loss " + " ".join(f"{name} {metrics[f'eval_loss_{name}']:.4f}" for name in MODALITY_NAMES))
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
