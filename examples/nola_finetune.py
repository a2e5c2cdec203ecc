"""Fine-tune a causal LM with NOLA (or LoRA, for comparison) using `Trainer`.

    python examples/nola_finetune.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --output_dir out/nola
    python examples/nola_finetune.py --model_name_or_path ./my-local-model --method lora --r 1 --output_dir out/lora
    accelerate launch examples/nola_finetune.py ...      # any accelerate / DeepSpeed / multi-GPU setup

Every `TrainingArguments` flag works (`--max_steps`, `--learning_rate`, `--per_device_train_batch_size`,
`--activation_checkpointing`, `--use_cpu`, ...). Without `--text_file`, the text is the 300 news articles of the
Lee background corpus that gensim ships (`pip install "peft-ext[tour]"`), so the script runs offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import peft_ext
from peft_ext.embedded import news_paragraphs


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="HuggingFaceTB/SmolLM2-135M", metadata={"help": "Hub id or local folder."})
    method: str = field(default="nola", metadata={"help": "nola or lora."})
    r: int = field(default=8, metadata={"help": "Rank of the adapter."})
    num_basis: int = field(default=1024, metadata={"help": "NOLA: bases per factor (num_basis_A = num_basis_B)."})
    alpha: float = field(default=8.0, metadata={"help": "nola_alpha / lora_alpha."})
    basis_mode: str = field(default="auto", metadata={"help": "NOLA: auto, cached or chunked."})
    target_modules: str | None = field(default=None, metadata={"help": "Comma-separated; default: peft's per-model default."})
    text_file: str | None = field(default=None, metadata={"help": "Plain text, one document per line."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of blocks held out for evaluation."})

    def __post_init__(self):
        if self.method not in ("nola", "lora"):
            raise ValueError(f"`method` must be 'nola' or 'lora', got {self.method!r}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {self.eval_fraction}.")


def adapter_config(args: ScriptArguments):
    targets = args.target_modules.split(",") if args.target_modules else None
    if args.method == "nola":
        return peft_ext.NolaConfig(r=args.r, num_basis_A=args.num_basis, num_basis_B=args.num_basis, nola_alpha=args.alpha,
                                   basis_mode=args.basis_mode, target_modules=targets, task_type="CAUSAL_LM")
    return LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, task_type="CAUSAL_LM")


def build_datasets(tokenizer, args: ScriptArguments) -> tuple[Dataset, Dataset]:
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            documents = [line.strip() for line in f if line.strip()]
    else:
        documents = news_paragraphs()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for doc in documents for token in tokenizer(doc)["input_ids"] + eos]
    blocks = [stream[i:i + args.block_size] for i in range(0, len(stream) - args.block_size + 1, args.block_size)]
    if len(blocks) < 2:
        raise ValueError(f"The text gives {len(blocks)} block(s) of {args.block_size} tokens; need at least 2.")
    n_eval = max(1, int(len(blocks) * args.eval_fraction))
    return Dataset.from_dict({"input_ids": blocks[n_eval:]}), Dataset.from_dict({"input_ids": blocks[:n_eval]})


def main() -> None:
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    # Before the adapter is built: its trainable initialization draws from the global RNG, and every process
    # (DDP, DeepSpeed) must start from the same coefficients.
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    model = get_peft_model(model, adapter_config(args))
    model.print_trainable_parameters()

    train, evaluation = build_datasets(tokenizer, args)
    # The loss before training is measured inside `train()` (eval_on_start), on the model as wrapped for training:
    # a separate `evaluate()` first would wrap it for DDP twice, which changes the training gradients, and
    # DeepSpeed ZeRO-1/2 cannot evaluate before training at all.
    training_args.eval_on_start = True
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    before = next(log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log)
    after = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"eval loss: {before:.6f} -> {after:.6f}")
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
