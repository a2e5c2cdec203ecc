"""Memory-augmented adaptation of LongMem's SideNet with `Trainer`: documents streamed in consecutive segments.

    python examples/longmem_adapt.py --backbone HuggingFaceTB/SmolLM2-135M --output_dir out/longmem --max_steps 500
    python examples/longmem_adapt.py --backbone ./my-local-model --segment_length 512 --streams 4 --output_dir out
    accelerate launch examples/longmem_adapt.py ...     # any accelerate setup (one bank per row on each process)

Each of the `--streams` batch rows reads its own documents segment after segment, so its memory bank holds the
document's past when a segment is read; the bank is emptied when a new document starts in that row. Only the SideNet
trains; the backbone stays frozen and is not saved (the checkpoint references it). Every `TrainingArguments` flag
works (`--max_steps` is required: the stream is endless); `--per_device_train_batch_size` must stay 1, the batch size
being `--streams`. Without `--text_file`, the documents are the 300 news articles of the Lee background corpus that
gensim ships (`pip install "peft-ext[tour]"`), so the script runs offline. At the end, the held-out documents' loss
is printed with and without the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

from peft_ext.embedded import news_paragraphs
from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
from peft_ext.models.longmem.data import DocumentStreams, collate_stream_batch


@dataclass
class ScriptArguments:
    backbone: str = field(default="HuggingFaceTB/SmolLM2-135M", metadata={"help": "Hub id or local folder."})
    text_file: str | None = field(default=None, metadata={"help": "Plain text, one document per line."})
    streams: int = field(default=4, metadata={"help": "Documents read in parallel (batch rows, one bank each)."})
    segment_length: int = field(default=512, metadata={"help": "Tokens per segment (the local window)."})
    memory_size: int = field(default=65536, metadata={"help": "Bank capacity per row, in tokens."})
    chunk_size: int = field(default=4, metadata={"help": "Tokens per memory chunk."})
    topk_chunks: int = field(default=16, metadata={"help": "Chunks retrieved per token and head."})
    memory_layer: int | None = field(default=None, metadata={"help": "Backbone layer cached (default ¾ depth)."})
    eval_documents: int = field(default=8, metadata={"help": "Documents held out for the final evaluation."})

    def __post_init__(self):
        if self.streams < 1 or self.segment_length < 1:
            raise ValueError(f"`streams` and `segment_length` must be >= 1, got {self.streams} and {self.segment_length}.")


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


def main() -> None:
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    if training_args.per_device_train_batch_size != 1:
        raise ValueError("Keep `--per_device_train_batch_size 1`: each item of the stream is already a batch of "
                         "`--streams` rows.")
    if training_args.max_steps <= 0:
        raise ValueError("Set `--max_steps`: the document stream is endless.")
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    config = LongMemConfig(memory_size=args.memory_size, chunk_size=args.chunk_size, topk_chunks=args.topk_chunks,
                           memory_layer=args.memory_layer)
    model = LongMemForCausalLM.from_backbone(args.backbone, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable (SideNet) parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    documents = tokenized_documents(tokenizer, args)
    held_out, train = documents[:args.eval_documents], documents[args.eval_documents:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = DocumentStreams(train, batch_size=args.streams, segment_length=args.segment_length, pad_token_id=pad)
    training_args.dataloader_num_workers = 0  # the stream's row order must reach the model unchanged
    trainer = Trainer(model=model, args=training_args, train_dataset=stream, data_collator=collate_stream_batch)
    trainer.train()
    if trainer.is_world_process_zero():
        with_memory = streamed_loss(model, held_out, args.segment_length, use_memory=True)
        without_memory = streamed_loss(model, held_out, args.segment_length, use_memory=False)
        print(f"held-out loss: with memory {with_memory:.6f}, without memory {without_memory:.6f}")
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
