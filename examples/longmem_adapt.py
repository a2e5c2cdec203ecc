"""Memory-augmented adaptation of LongMem's SideNet with `Trainer`: documents streamed in consecutive segments.

    python examples/longmem_adapt.py --backbone HuggingFaceTB/SmolLM2-135M --output_dir out/longmem --max_steps 500
    python examples/longmem_adapt.py --backbone ./my-local-model --segment_length 512 \
        --per_device_train_batch_size 4 --output_dir out --max_steps 500

Each of the `--per_device_train_batch_size` batch rows reads its own documents segment after segment, so its memory
bank holds the document's past when a segment is read; the bank is emptied when a new document starts in that row.
Only the SideNet trains; the backbone stays frozen and is not saved (the checkpoint references it). Every
`TrainingArguments` flag works (`--max_steps` is required: the stream is endless). Without `--text_file`, the
documents are the 300 news articles of the Lee background corpus that gensim ships (`pip install "peft-ext[tour]"`),
so the script runs offline. At the end, the held-out documents' loss is printed with and without the memory.

Several processes (data parallel; the banks never leave their process):

    accelerate launch --multi_gpu --num_processes 8 examples/longmem_adapt.py --max_steps 500 --output_dir out  # GPUs
    accelerate launch --multi_gpu --num_processes 8 examples/longmem_adapt.py --max_steps 500 --output_dir out \
        --deepspeed examples/configs/zero2.json                                         # or zero3.json: DeepSpeed
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 examples/longmem_adapt.py \
        --max_steps 500 --output_dir out --use_cpu                                      # CPU (gloo); add --deepspeed
                                                                                        # as above for ZeRO on CPU

Each process has `--per_device_train_batch_size` streams with their own banks and a disjoint share of the
documents (`DocumentStreams(num_processes=...)`): a document's segments are all read, in order, by one row of one
process, whose bank alone holds its past. At every step, 2 processes × 2 streams read the rows that 1 process ×
4 streams reads, so they train on the same global batch. The batches are built on every process (not dispatched),
and only the SideNet's gradients are all-reduced, as for any `Trainer` model: the bank is neither a parameter nor a
buffer, so DDP does not broadcast it and ZeRO-3 does not partition it. The held-out evaluation runs on every
process (ZeRO-3 gathers the weights in every process's forward) and is printed by the first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)

from peft_ext.embedded import news_paragraphs
from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
from peft_ext.models.longmem.data import DocumentStreams, collate_stream_batch


@dataclass
class ScriptArguments:
    backbone: str = field(default="HuggingFaceTB/SmolLM2-135M", metadata={"help": "Hub id or local folder."})
    text_file: str | None = field(default=None, metadata={"help": "Plain text, one document per line."})
    segment_length: int = field(default=512, metadata={"help": "Tokens per segment (the local window)."})
    memory_size: int = field(default=65536, metadata={"help": "Bank capacity per row, in tokens."})
    chunk_size: int = field(default=4, metadata={"help": "Tokens per memory chunk."})
    topk_chunks: int = field(default=16, metadata={"help": "Chunks retrieved per token and head."})
    memory_layer: int | None = field(default=None, metadata={"help": "Backbone layer cached (default ¾ depth)."})
    eval_documents: int = field(default=8, metadata={"help": "Documents held out for the final evaluation."})

    def __post_init__(self):
        if self.segment_length < 1:
            raise ValueError(f"`segment_length` must be >= 1, got {self.segment_length}.")


def tokenized_documents(tokenizer, args: ScriptArguments) -> list[torch.Tensor]:
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        texts = news_paragraphs()
    documents = [torch.tensor(tokenizer(text)["input_ids"]) for text in texts]
    documents = [d for d in documents if len(d) > 1]
    if len(documents) <= args.eval_documents:
        raise ValueError(f"{len(documents)} documents, but {args.eval_documents} are held out: give more text.")
    return documents


@torch.no_grad()
def streamed_loss(model: LongMemForCausalLM, documents: list[torch.Tensor], segment_length: int, use_memory: bool) -> float:
    """Mean loss over the documents, each read segment after segment into a fresh one-row bank."""
    model.eval()
    device = next(model.sidenet.parameters()).device
    total, count = 0.0, 0
    for document in documents:
        model.reset_memory(batch_size=1)
        for start in range(0, len(document) - 1, segment_length):
            segment = document[start:start + segment_length][None].to(device)
            if segment.shape[1] < 2:
                continue
            loss = model(segment, labels=segment, use_memory=use_memory).loss
            total += loss.item() * (segment.shape[1] - 1)
            count += segment.shape[1] - 1
    return total / count


def stream_training_arguments(training_args: TrainingArguments) -> tuple[int, TrainingArguments]:
    """(rows per process, the arguments for `Trainer`).

    A batch has `--per_device_train_batch_size` rows, one document stream each. `DocumentStreams` yields whole
    batches, so `Trainer`'s data loader takes one item at a time; each process builds its batches itself
    (`dispatch_batches=False`, unless set otherwise: dispatching gives the same rows, see `DocumentStreams`).
    """
    if training_args.max_steps <= 0:
        raise ValueError("Set `--max_steps`: the document stream is endless.")
    accelerator_config = training_args.accelerator_config
    if accelerator_config.split_batches:
        raise ValueError("`split_batches=True` would split each process's batch of streams across the processes; "
                         "leave it False: every process reads its own `--per_device_train_batch_size` streams.")
    if accelerator_config.dispatch_batches is None:
        accelerator_config = dataclasses.replace(accelerator_config, dispatch_batches=False)
    return training_args.per_device_train_batch_size, dataclasses.replace(
        training_args, per_device_train_batch_size=1, accelerator_config=accelerator_config)


def load_whole(load, training_args: TrainingArguments, *args):
    """`load(*args)` with whole weights, even under DeepSpeed ZeRO-3.

    Under ZeRO-3, `from_pretrained` partitions a model across the processes as it loads it (`zero.Init`); the SideNet
    is initialized by copying backbone blocks, which needs their whole weights. So the model is loaded whole, and
    DeepSpeed partitions all of it when `Trainer` starts.
    """
    if not is_deepspeed_zero3_enabled():
        return load(*args)
    unset_hf_deepspeed_config()
    try:
        return load(*args)
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def build_trainer(args: ScriptArguments, training_args: TrainingArguments
                  ) -> tuple[Trainer, DocumentStreams, list[torch.Tensor]]:
    """The `Trainer` of the SideNet on the streamed training documents, its stream, and the held-out documents."""
    streams, training_args = stream_training_arguments(training_args)
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    config = LongMemConfig(memory_size=args.memory_size, chunk_size=args.chunk_size, topk_chunks=args.topk_chunks,
                           memory_layer=args.memory_layer)
    model = load_whole(LongMemForCausalLM.from_backbone, training_args, args.backbone, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if training_args.process_index == 0:
        print(f"trainable (SideNet) parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    documents = tokenized_documents(tokenizer, args)
    held_out, train = documents[:args.eval_documents], documents[args.eval_documents:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = DocumentStreams(train, batch_size=streams, segment_length=args.segment_length, pad_token_id=pad,
                             num_processes=training_args.world_size)
    training_args.dataloader_num_workers = 0  # the stream's row order must reach the model unchanged
    trainer = Trainer(model=model, args=training_args, train_dataset=stream, data_collator=collate_stream_batch,
                      processing_class=tokenizer)
    return trainer, stream, held_out


def main(argv: list[str] | None = None) -> None:
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    trainer, _, held_out = build_trainer(args, training_args)
    trainer.train()
    model = trainer.model
    with_memory = streamed_loss(model, held_out, args.segment_length, use_memory=True)
    without_memory = streamed_loss(model, held_out, args.segment_length, use_memory=False)
    if trainer.is_world_process_zero():
        print(f"held-out loss: with memory {with_memory:.6f}, without memory {without_memory:.6f}")
    trainer.save_model(trainer.args.output_dir)


if __name__ == "__main__":
    main()
