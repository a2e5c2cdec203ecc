"""MixDA's two stages with `Trainer`: domain adapters on unlabeled text, then a few-shot classifier that mixes them.

    python examples/mixda_two_stage.py --output_dir out/mixda                       # all-MiniLM-L6-v2, offline
    python examples/mixda_two_stage.py --model_name_or_path roberta-large --layers 7,11 --bottleneck_size 256 \\
        --domain_steps 2000 --max_steps 500 --output_dir out/mixda
    python examples/mixda_two_stage.py --domain_adapters_dir out/mixda/domains --output_dir out/task2   # stage 2 only
    accelerate launch examples/mixda_two_stage.py ...                              # any accelerate setup
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 examples/mixda_two_stage.py --use_cpu ...

Stage 1 trains one domain adapter per domain with `MixDADomainTrainer` (0.5 · MLM on the domain + the L2 term on
general text) and saves it to `<output_dir>/domains/<name>`: each is a PEFT adapter of its own. Stage 2 loads
them frozen with `MixDAModel.for_task`, trains the gate, the task adapter and the head with `Trainer` on
`--shots_per_class` labelled sentences per class, and saves `<output_dir>/task`. Every `TrainingArguments`
flag applies to stage 2 (`--max_steps`, `--learning_rate`, ...); stage 1 uses the same ones with
`--domain_steps` steps; `--domain_adapters_dir` skips stage 1 and mixes adapters saved before (in
`<dir>/<domain>`, as stage 1 writes them). Under several processes (DDP or DeepSpeed) the gate, the task adapter
and the head are the parameters that train and synchronize; the domain adapters are frozen buffers. The data:
domains "news" (Lee corpus) and "wiki" (English Wikipedia), each using the other as general text; the task is
Pang & Lee review polarity (all from gensim's test data, `pip install "peft-ext[tour]"`). A model without an MLM
head (all-MiniLM-L6-v2) gets a new head transform, trained with the adapter in stage 1; the decoder is tied to
the word embeddings.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from peft_ext.embedded import minilm_path
from peft_ext.tuners.mixda import MixDAConfig, MixDADomainCollator, MixDADomainTrainer, MixDAModel
from peft_ext.tuners.mixda.tour import MLM_HEAD_TRANSFORM, domain_corpora, few_shot_split

DOMAINS = ("news", "wiki")


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default=str(minilm_path()), metadata={"help": "Hub id or local folder (encoder)."})
    domains: str = field(default="news,wiki", metadata={"help": f"Comma-separated, from {DOMAINS}."})
    layers: str = field(default="2,5", metadata={"help": "Comma-separated layer indices for the adapters."})
    bottleneck_size: int = field(default=64, metadata={"help": "Domain adapter bottleneck."})
    domain_steps: int = field(default=100, metadata={"help": "Stage-1 steps per domain."})
    gate_kind: str = field(default="softmax", metadata={"help": "softmax or sigmoid."})
    gate_granularity: str = field(default="sequence", metadata={"help": "token or sequence."})
    shots_per_class: int = field(default=16, metadata={"help": "Labelled training sentences per class."})
    max_length: int = field(default=64, metadata={"help": "Tokens per stage-1 example."})
    domain_adapters_dir: str | None = field(default=None, metadata={
        "help": "Saved stage-1 adapters (`<dir>/<domain>`, e.g. an earlier `<output_dir>/domains`): skip stage 1."})

    def __post_init__(self):
        self.domain_names = [d.strip() for d in self.domains.split(",") if d.strip()]
        unknown = [d for d in self.domain_names if d not in DOMAINS]
        if unknown or not self.domain_names:
            raise ValueError(f"`domains` must be a comma-separated subset of {DOMAINS}, got {self.domains!r}.")
        self.layer_indices = [int(i) for i in self.layers.split(",")]


def train_domains(args: ScriptArguments, training_args: TrainingArguments, tokenizer) -> dict[str, str]:
    corpora = domain_corpora()
    folders = {}
    for name in args.domain_names:
        general = next(d for d in DOMAINS if d != name)
        model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path)
        config = MixDAConfig(stage="domain", bottleneck_size=args.bottleneck_size, layers_to_transform=args.layer_indices,
                             modules_to_save=[MLM_HEAD_TRANSFORM])
        model = get_peft_model(model, config, adapter_name=name)
        examples = [{"text": text, "general_text": corpora[general][i % len(corpora[general])]}
                    for i, text in enumerate(corpora[name])]
        stage_args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, "stage1", name),
                                         max_steps=args.domain_steps, remove_unused_columns=False, save_strategy="no",
                                         logging_steps=1)
        trainer = MixDADomainTrainer(model=model, args=stage_args, train_dataset=examples,
                                     data_collator=MixDADomainCollator(tokenizer, max_length=args.max_length))
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        if trainer.is_world_process_zero():
            print(f"stage 1 {name}: loss {losses[0]:.6f} -> {losses[-1]:.6f}")
        model.save_pretrained(os.path.join(training_args.output_dir, "domains"))
        folders[name] = os.path.join(training_args.output_dir, "domains", name)
    return folders


def main() -> None:
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.domain_adapters_dir is None:
        folders = train_domains(args, training_args, tokenizer)
    else:
        folders = {name: os.path.join(args.domain_adapters_dir, name) for name in args.domain_names}

    set_seed(training_args.seed)  # the new head starts the same whatever stage 1 drew
    base = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=2)
    # Its loss is the batch's mean and ignores `num_items_in_batch`; `Trainer` takes a forward with **kwargs for
    # one that divides by the global count and multiplies the loss by the number of processes to make up for it,
    # which would double the gradients on 2 processes.
    base.accepts_loss_kwargs = False
    model = MixDAModel.for_task(base, folders, gate_kind=args.gate_kind, gate_granularity=args.gate_granularity)
    model.print_trainable_parameters()
    train, test = few_shot_split(training_args.seed, args.shots_per_class)

    def dataset(pairs):
        encoded = tokenizer([t for t, _ in pairs], truncation=True, max_length=48)
        return Dataset.from_dict({**encoded, "labels": [y for _, y in pairs]})

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    # The metrics before training are measured inside `train()` (eval_on_start), on the model as wrapped for
    # training: a separate `evaluate()` first would wrap it for DDP twice, which changes the training gradients.
    task_args = dataclasses.replace(training_args, eval_on_start=True)
    trainer = Trainer(model=model, args=task_args, train_dataset=dataset(train), eval_dataset=dataset(test),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    before = next(log for log in trainer.state.log_history if "eval_loss" in log)
    after = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"stage 2 eval loss: {before['eval_loss']:.6f} -> {after['eval_loss']:.6f}")
        print(f"stage 2 eval accuracy: {before['eval_accuracy']:.4f} -> {after['eval_accuracy']:.4f}")
    trainer.save_model(os.path.join(training_args.output_dir, "task"))


if __name__ == "__main__":
    main()
