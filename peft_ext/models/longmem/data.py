"""Data for LongMem: documents streamed in consecutive segments (for `Trainer`), and a synthetic long-range recall task.

Memory-augmented adaptation (§3 of the paper) reads each document as consecutive segments, so that by the time a
segment is read, its row's bank holds that document's past. `DocumentStreams` lays documents out on `batch_size`
parallel streams (per process, when training on several): row b of every batch is the next segment of stream b,
and `new_document[b]` says that the segment starts a document (the model then empties row b's bank before reading
it). Segments never span two documents; the last segment of a document is right-padded (attention_mask 0,
labels −100).

The recall task (`RecallTask`) is synthetic but honest about what it measures: a block of key→value facts sits
among thousands of distractor pairs, and the questions (the keys again, each to be followed by its value) come
`distance` tokens later, far outside the local window, so the answer is only reachable through the memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

PAD = 0


class DocumentStreams(IterableDataset):
    """Batches of consecutive segments of `documents` on `batch_size` parallel streams per process, for `Trainer`.

    Each item is already one process's batch (dict of `input_ids`, `attention_mask`, `labels`, `new_document`); use it
    with `per_device_train_batch_size=1` and `data_collator=collate_stream_batch`, and `max_steps` (the dataset is
    iterable). There are `num_processes * batch_size` streams; stream `s` is row `s % batch_size` of process
    `s // batch_size`. Documents are dealt to the streams in order, each to the stream that has the fewest segments so
    far, so every document is read by one process, in one row, segment after segment, and the processes' banks hold
    disjoint sets of documents. A stream that runs out of documents restarts from its first one; a stream that got
    none reads the documents of its process's first stream.

    Several processes: every process iterates the same sequence, which holds, for each step, one batch per process in
    process order. Under `accelerate` (and so `Trainer`) with a per-device batch of 1 and `split_batches=False`,
    sharding the iterable (`dispatch_batches=False`: each process keeps every `num_processes`-th item, its own) and
    dispatching it (`dispatch_batches=True`: the main process concatenates `num_processes` items and sends each
    process its rows) both hand process `p` exactly its own rows, in order. Building the other processes' batches
    costs only slicing. With `split_batches=True` the per-device batch of 1 cannot be split: do not use it.
    """

    def __init__(self, documents: Sequence[torch.LongTensor], batch_size: int, segment_length: int,
                 pad_token_id: int = PAD, num_processes: int = 1):
        if batch_size < 1 or segment_length < 1:
            raise ValueError(f"`batch_size` and `segment_length` must be >= 1, got {batch_size} and {segment_length}.")
        if num_processes < 1:
            raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
        if not documents:
            raise ValueError("`documents` is empty.")
        if len(documents) < num_processes:
            raise ValueError(f"{len(documents)} documents cannot give each of the {num_processes} processes its own "
                             "documents: give at least one document per process.")
        self.documents = [torch.as_tensor(d, dtype=torch.long).flatten() for d in documents]
        if any(len(d) == 0 for d in self.documents):
            raise ValueError("Every document needs at least one token.")
        self.batch_size, self.segment_length, self.pad_token_id = batch_size, segment_length, pad_token_id
        self.num_processes = num_processes
        num_streams = num_processes * batch_size
        self.streams: list[list[int]] = [[] for _ in range(num_streams)]
        lengths = [0] * num_streams
        # The first documents go to the processes' first streams, so that no process is left without documents.
        order = [p * batch_size for p in range(num_processes)] + [
            s for s in range(num_streams) if s % batch_size]
        for index, document in enumerate(self.documents):
            stream = min(order, key=lengths.__getitem__)
            self.streams[stream].append(index)
            lengths[stream] += -(-len(document) // segment_length)

    def process_documents(self, process_index: int) -> list[list[int]]:
        """Indices of the documents that each row of process `process_index` reads, in reading order."""
        if not 0 <= process_index < self.num_processes:
            raise ValueError(f"`process_index` must be in [0, {self.num_processes}), got {process_index}.")
        first = process_index * self.batch_size
        rows = self.streams[first:first + self.batch_size]
        return [row or rows[0] for row in rows]

    def _segments(self, documents: list[int]) -> Iterator[tuple[torch.LongTensor, bool]]:
        while True:
            for index in documents:
                document = self.documents[index]
                for start in range(0, len(document), self.segment_length):
                    yield document[start:start + self.segment_length], start == 0

    def _batch(self, segments: list[tuple[torch.LongTensor, bool]]) -> dict[str, torch.Tensor]:
        input_ids = torch.full((self.batch_size, self.segment_length), self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for b, (segment, _) in enumerate(segments):
            input_ids[b, :len(segment)] = segment
            attention_mask[b, :len(segment)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
            "new_document": torch.tensor([first for _, first in segments]),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        processes = [[self._segments(documents) for documents in self.process_documents(p)]
                     for p in range(self.num_processes)]
        while True:
            for rows in processes:
                yield self._batch([next(row) for row in rows])


def collate_stream_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`Trainer` collator for `DocumentStreams`: its items already are batches."""
    if len(items) != 1:
        raise ValueError(f"Use `per_device_train_batch_size=1` with DocumentStreams (its items are batches), got "
                         f"{len(items)} items per batch.")
    return items[0]


@dataclass(frozen=True)
class RecallTask:
    """Token layout and generators of the synthetic long-range associative recall task.

    A document is a stream of two-token pairs "key value". Near its start sit `num_facts` facts, pairs with distinct
    keys from the key range; everything else is distractor pairs, whose keys come from a disjoint distractor range
    and whose values are random. Much later come the questions: `num_questions` of the facts' keys again, each
    followed by its value (the label). This is multi-query associative recall (as in the Zoology benchmark) with the
    facts far away and thousands of distractor pairs in between; values are uniform, so chance is 1/num_values.

    ids: 0 pad, then `num_distractors` distractor keys, `num_keys` keys, `num_values` values.
    """

    num_distractors: int = 128
    num_keys: int = 128
    num_values: int = 32
    num_facts: int = 8
    num_questions: int = 4

    def __post_init__(self):
        if not 1 <= self.num_questions <= self.num_facts <= self.num_keys:
            raise ValueError(f"Need 1 <= num_questions <= num_facts <= num_keys, got {self.num_questions}, "
                             f"{self.num_facts}, {self.num_keys}.")

    @property
    def distractor_start(self) -> int:
        return 1

    @property
    def key_start(self) -> int:
        return self.distractor_start + self.num_distractors

    @property
    def value_start(self) -> int:
        return self.key_start + self.num_keys

    @property
    def vocab_size(self) -> int:
        return self.value_start + self.num_values

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    @property
    def question_length(self) -> int:
        return 2 * self.num_questions

    @staticmethod
    def pairs(keys: torch.LongTensor, values: torch.LongTensor) -> torch.LongTensor:
        """Interleave (batch, n) keys and values into (batch, 2n) "key value" pairs."""
        return torch.stack([keys, values], dim=2).flatten(1)

    def facts(self, generator: torch.Generator, batch: int) -> tuple[torch.LongTensor, torch.LongTensor]:
        """(batch, num_facts) distinct keys and their values."""
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(dim=1)[:, :self.num_facts]
        values = torch.randint(self.num_values, (batch, self.num_facts), generator=generator)
        return keys + self.key_start, values + self.value_start

    def distractors(self, generator: torch.Generator, batch: int, num_pairs: int) -> torch.LongTensor:
        keys = torch.randint(self.distractor_start, self.key_start, (batch, num_pairs), generator=generator)
        values = torch.randint(self.value_start, self.vocab_size, (batch, num_pairs), generator=generator)
        return self.pairs(keys, values)

    def questions(self, generator: torch.Generator, keys: torch.LongTensor, values: torch.LongTensor
                  ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """`num_questions` of the facts in random order as pairs, and labels on their values."""
        asked = torch.rand(keys.shape[0], self.num_facts, generator=generator).argsort(dim=1)[:, :self.num_questions]
        ids = self.pairs(keys.gather(1, asked), values.gather(1, asked))
        labels = torch.full_like(ids, -100)
        labels[:, 1::2] = ids[:, 1::2]
        return ids, labels

    def in_context_batch(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The facts, then the questions, in one short window (in-context recall)."""
        keys, values = self.facts(generator, batch)
        questions, labels = self.questions(generator, keys, values)
        facts = self.pairs(keys, values)
        return torch.cat([facts, questions], 1), torch.cat([torch.full_like(facts, -100), labels], 1)

    def long_range_batch(self, generator: torch.Generator, batch: int, distance: int, fact_region: int = 64
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, questions, labels). The context has `fact_region + distance` tokens (rounded up to pairs): the
        facts at a random pair offset of its first `fact_region` tokens, distractor pairs everywhere else. The
        questions follow the context, so every fact is between `distance` and `distance + fact_region` tokens before
        the questions: outside any local window shorter than that, reachable only through the memory.
        """
        size = 2 * self.num_facts
        if fact_region < size:
            raise ValueError(f"`fact_region` ({fact_region}) cannot hold {self.num_facts} two-token facts.")
        context = self.distractors(generator, batch, -(-(fact_region + distance) // 2))
        keys, values = self.facts(generator, batch)
        offsets = 2 * torch.randint((fact_region - size) // 2 + 1, (batch, 1), generator=generator)
        rows = torch.arange(batch)[:, None]
        context[rows, offsets + torch.arange(size)] = self.pairs(keys, values)
        questions, labels = self.questions(generator, keys, values)
        return context, questions, labels


def answer_accuracy(logits: torch.Tensor, labels: torch.LongTensor) -> float:
    """Share of labelled positions whose next-token argmax is the label (labels aligned with input_ids)."""
    targets = labels[:, 1:]
    asked = targets != -100
    return (logits[:, :-1].argmax(dim=-1)[asked] == targets[asked]).float().mean().item()
