"""The LongMem memory bank: cached attention keys and values of one frozen backbone layer, one bank per stream.

LongMem (Wang et al., 2023, §2.2) caches the per-head keys and values that the backbone's memory layer computes for
past context, in chunks of `chunk_size` consecutive tokens. A chunk is represented for retrieval by the mean of its
token keys (§2.3), and each query token retrieves, per head, the `topk_chunks` chunks with the largest inner
product, i.e. `topk_chunks * chunk_size` key/value pairs. The bank is a FIFO queue of `memory_size` tokens: when it
is full the oldest chunks are evicted (and counted in `evicted_tokens`).

Departures from the official code, on purpose:

* one bank per *stream* (a batch row), so that rows never retrieve each other's documents; the official code shares
  one bank across the batch;
* tokens that do not fill a whole chunk yet wait in a per-stream pending buffer and are stored once the chunk is
  complete, so chunk boundaries follow the stream whatever the segment lengths;
* exact top-k in torch is the default (blocks of batched matrix products and an exact two-stage top-k, see
  `exact_topk`); faiss (flat, IVF, HNSW) is an option for banks of millions of tokens.

Keys are stored with the backbone's key/value heads (before grouped-query expansion); queries of the heads that share
a key/value head search the same keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save

from peft_ext.serialization import atomic_write_bytes

MEMORY_FILE = "memory_bank.safetensors"
RETRIEVAL_BACKENDS = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
# Query-by-chunk scores held at once by the torch search (4M floats: 16 MiB, about a core's share of the cache).
SCORE_BLOCK_ELEMENTS = 1 << 22
# Scores per group in `exact_topk`'s first stage (measured best at 16k-262k chunks, top-16).
TOPK_GROUP_SIZE = 16


def exact_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(scores, k, dim=-1)` (values sorted in descending order), computed in two exact stages.

    The last dimension is split into groups of `TOPK_GROUP_SIZE` scores (group j holds columns j, j + G, j + 2G, ...
    for G groups, so the group maxima are an element-wise max over contiguous rows, which vectorizes). Each of the
    k largest scores lies in one of the k groups with the largest maxima: a score outside them is beaten by those k
    maxima. So the top-k of the k·TOPK_GROUP_SIZE members of those groups (and of the < TOPK_GROUP_SIZE trailing
    columns that fill no group) is the exact top-k, at about half the cost of `torch.topk` over 16k columns.
    Equal scores may be picked in another order than `torch.topk` picks them.
    """
    width = scores.shape[-1]
    groups = width // TOPK_GROUP_SIZE
    if groups < 4 * k:  # small rows: the plain top-k is as fast
        return torch.topk(scores, k, dim=-1)
    grouped = scores[..., :groups * TOPK_GROUP_SIZE].unflatten(-1, (TOPK_GROUP_SIZE, groups))
    top_groups = grouped.amax(dim=-2).topk(k, dim=-1, sorted=False).indices
    strides = torch.arange(TOPK_GROUP_SIZE, device=scores.device) * groups
    members = (top_groups.unsqueeze(-1) + strides).flatten(-2)
    if width > groups * TOPK_GROUP_SIZE:
        trailing = torch.arange(groups * TOPK_GROUP_SIZE, width, device=scores.device)
        members = torch.cat([members, trailing.expand(*members.shape[:-1], -1)], dim=-1)
    values, picked = scores.gather(-1, members).topk(k, dim=-1)
    return values, members.gather(-1, picked)


@dataclass(frozen=True)
class MemoryBankSpec:
    """What a bank holds and where its keys come from; two banks are compatible only if their specs are equal.

    `source` names the backbone (its `_name_or_path` or architecture) and `layer` the backbone layer whose keys and
    values are cached: keys of another model or layer live in another space, and reading them would be meaningless.
    """

    source: str
    layer: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    memory_size: int

    def __post_init__(self):
        for name in ("num_kv_heads", "head_dim", "chunk_size", "memory_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.memory_size % self.chunk_size:
            raise ValueError(
                f"`memory_size` ({self.memory_size}) must be a multiple of `chunk_size` ({self.chunk_size})."
            )

    @property
    def capacity_chunks(self) -> int:
        return self.memory_size // self.chunk_size


@dataclass
class Retrieved:
    """Key/value pairs retrieved for a block of queries.

    keys, values: (batch, heads, tokens, topk_chunks * chunk_size, head_dim); valid: (batch, heads, tokens,
    topk_chunks * chunk_size), False where a stream holds fewer chunks than asked for.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


class MemoryBank:
    """FIFO banks of chunked keys and values, one per stream.

    Storage is a ring buffer per stream: `keys`/`values` of shape (streams, kv_heads, capacity_chunks, chunk_size,
    head_dim) and the chunk keys (their mean over the chunk) of shape (streams, kv_heads, capacity_chunks, head_dim).
    The order of chunks in the ring does not matter for retrieval: memories carry no position (see
    `LongMemForCausalLM`).
    """

    def __init__(self, spec: MemoryBankSpec, num_streams: int, backend: str = "torch", *, faiss_nlist: int = 0,
                 faiss_nprobe: int = 8, faiss_hnsw_m: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if backend not in RETRIEVAL_BACKENDS:
            raise ValueError(f"`backend` must be one of {RETRIEVAL_BACKENDS}, got {backend!r}.")
        if num_streams < 1:
            raise ValueError(f"`num_streams` must be >= 1, got {num_streams}.")
        self.spec = spec
        self.backend = backend
        self.faiss_nlist, self.faiss_nprobe, self.faiss_hnsw_m = faiss_nlist, faiss_nprobe, faiss_hnsw_m
        # Storage grows (doubling) up to the capacity, so that a 65k-token bank holding a short document stays small;
        # the ring only wraps once the storage has reached the capacity.
        shape = (num_streams, spec.num_kv_heads, min(spec.capacity_chunks, 256), spec.chunk_size, spec.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.chunk_keys = torch.zeros(shape[:3] + shape[4:], device=device, dtype=dtype)
        self.num_chunks = torch.zeros(num_streams, dtype=torch.long)  # stored chunks per stream
        self.write_slot = torch.zeros(num_streams, dtype=torch.long)  # ring position of the next chunk
        self.evicted_tokens = torch.zeros(num_streams, dtype=torch.long)
        # Tokens of an unfinished chunk: (kv_heads, n < chunk_size, head_dim) per stream.
        self.pending_keys: list[torch.Tensor | None] = [None] * num_streams
        self.pending_values: list[torch.Tensor | None] = [None] * num_streams
        self._faiss_indexes: dict[tuple[int, int], object] = {}
        self._faiss_count: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ state
    @property
    def num_streams(self) -> int:
        return self.keys.shape[0]

    def num_tokens(self) -> torch.LongTensor:
        """Tokens stored per stream (complete chunks only)."""
        return self.num_chunks * self.spec.chunk_size

    def is_empty(self) -> bool:
        return bool((self.num_chunks == 0).all())

    def reset(self, streams: torch.Tensor | list[int] | None = None) -> None:
        """Empty the given streams (all by default), e.g. at a document boundary."""
        rows = range(self.num_streams) if streams is None else [int(s) for s in torch.as_tensor(streams).flatten()]
        for s in rows:
            if not 0 <= s < self.num_streams:
                raise IndexError(f"stream {s} is out of range for a bank of {self.num_streams} streams.")
            self.num_chunks[s] = 0
            self.write_slot[s] = 0
            self.evicted_tokens[s] = 0
            self.pending_keys[s] = self.pending_values[s] = None
            for head in range(self.spec.num_kv_heads):
                self._faiss_indexes.pop((s, head), None)

    def check_batch(self, batch_size: int) -> None:
        if batch_size != self.num_streams:
            raise ValueError(
                f"The memory bank holds {self.num_streams} streams (one per batch row) but the batch has {batch_size} "
                f"rows. Call `reset_memory(batch_size={batch_size})` to start new banks, or pass as many rows as "
                "there are streams."
            )

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Append tokens to every stream: keys/values of shape (streams, tokens, kv_heads, head_dim).

        `token_mask` (streams, tokens), e.g. the attention mask, marks the real tokens (default: all); padding is
        skipped, on either side.
        A write longer than the bank keeps its last `memory_size` tokens; everything pushed out is counted as evicted.
        """
        self.check_batch(keys.shape[0])
        if keys.shape[2:] != (self.spec.num_kv_heads, self.spec.head_dim) or values.shape != keys.shape:
            raise ValueError(
                f"Expected keys and values of shape (streams, tokens, {self.spec.num_kv_heads}, {self.spec.head_dim}), "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}."
            )
        chunk = self.spec.chunk_size
        keys = keys.detach().to(self.keys.dtype).transpose(1, 2)  # (streams, heads, tokens, dim)
        values = values.detach().to(self.values.dtype).transpose(1, 2)
        for s in range(self.num_streams):
            if token_mask is None:
                stream_keys, stream_values = keys[s], values[s]
            else:
                real = token_mask[s].bool().to(keys.device)
                stream_keys, stream_values = keys[s][:, real], values[s][:, real]
            if self.pending_keys[s] is not None:
                stream_keys = torch.cat([self.pending_keys[s], stream_keys], dim=1)
                stream_values = torch.cat([self.pending_values[s], stream_values], dim=1)
            complete = stream_keys.shape[1] // chunk * chunk
            rest = stream_keys.shape[1] - complete
            self.pending_keys[s] = stream_keys[:, complete:].clone() if rest else None
            self.pending_values[s] = stream_values[:, complete:].clone() if rest else None
            if complete:
                heads, dim = self.spec.num_kv_heads, self.spec.head_dim
                self._append_chunks(s, stream_keys[:, :complete].reshape(heads, -1, chunk, dim),
                                    stream_values[:, :complete].reshape(heads, -1, chunk, dim))

    def _append_chunks(self, s: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        capacity = self.spec.capacity_chunks
        new = keys.shape[1]
        if new > capacity:  # a segment longer than the bank: only its newest `capacity` chunks can stay
            self.evicted_tokens[s] += (new - capacity) * self.spec.chunk_size
            keys, values, new = keys[:, -capacity:], values[:, -capacity:], capacity
        self._grow(min(int(self.num_chunks[s]) + new, capacity))
        overflow = int(self.num_chunks[s]) + new - capacity
        if overflow > 0:
            self.evicted_tokens[s] += overflow * self.spec.chunk_size
        slots = (self.write_slot[s] + torch.arange(new, device=self.keys.device)) % capacity
        self.keys[s][:, slots] = keys
        self.values[s][:, slots] = values
        self.chunk_keys[s][:, slots] = keys.mean(dim=2)  # §2.3: a chunk is retrieved by its mean key
        self.write_slot[s] = (self.write_slot[s] + new) % capacity
        self.num_chunks[s] = min(int(self.num_chunks[s]) + new, capacity)
        if overflow > 0:  # approximate indexes cannot delete: rebuild on the next search
            for head in range(self.spec.num_kv_heads):
                self._faiss_indexes.pop((s, head), None)

    def _grow(self, chunks: int) -> None:
        allocated = self.keys.shape[2]
        if chunks <= allocated:
            return
        size = min(self.spec.capacity_chunks, max(chunks, 2 * allocated))
        for name in ("keys", "values", "chunk_keys"):
            old = getattr(self, name)
            grown = old.new_zeros(old.shape[:2] + (size,) + old.shape[3:])
            grown[:, :, :allocated] = old
            setattr(self, name, grown)

    # ------------------------------------------------------------------ reading
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k chunks by inner product for queries of shape (streams, kv_heads, n, head_dim).

        Returns ring slots (streams, kv_heads, n, k) and a validity mask of the same shape; k is capped by the
        fullest stream, and slots beyond a stream's own count are marked invalid.
        """
        self.check_batch(queries.shape[0])
        k = min(k, int(self.num_chunks.max()))
        if k == 0:
            empty = torch.zeros(*queries.shape[:3], 0, dtype=torch.long, device=queries.device)
            return empty, empty.bool()
        if self.backend == "torch":
            return self._search_torch(queries, k)
        return self._search_faiss(queries, k)

    @torch.no_grad()
    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        filled = int(self.num_chunks.max())  # slots >= filled are empty in every stream (the ring fills from 0)
        chunk_keys = self.chunk_keys[:, :, :filled].transpose(-1, -2)
        queries = queries.to(chunk_keys.dtype)
        streams, heads, n, _ = queries.shape
        stored = torch.arange(filled, device=queries.device) < self.num_chunks.to(queries.device)[:, None]
        unfilled = None if bool(stored.all()) else ~stored[:, None, None, :]
        slots = torch.empty(streams, heads, n, k, dtype=torch.long, device=queries.device)
        top_scores = torch.empty(streams, heads, n, k, dtype=chunk_keys.dtype, device=queries.device)
        # The scores of all queries against a large bank (heads x tokens x chunks) are far larger than the cache:
        # score a block of queries at a time into one reused buffer, and keep only each block's top-k.
        block = max(1, min(n, SCORE_BLOCK_ELEMENTS // max(1, streams * heads * filled)))
        buffer = queries.new_empty(streams, heads, block, filled)
        for start in range(0, n, block):
            end = min(start + block, n)
            scores = buffer if end - start == block else queries.new_empty(streams, heads, end - start, filled)
            torch.matmul(queries[:, :, start:end], chunk_keys, out=scores)
            if unfilled is not None:
                scores.masked_fill_(unfilled, float("-inf"))
            top_scores[:, :, start:end], slots[:, :, start:end] = exact_topk(scores, k)
        return slots, top_scores > float("-inf")

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        streams, heads, n, _ = queries.shape
        slots = torch.zeros(streams, heads, n, k, dtype=torch.long)
        valid = torch.zeros(streams, heads, n, k, dtype=torch.bool)
        flat_queries = queries.detach().float().cpu().contiguous()
        for s in range(streams):
            if int(self.num_chunks[s]) == 0:
                continue
            for head in range(heads):
                _, found = self._faiss_index(s, head).search(flat_queries[s, head].numpy(), k)
                found = torch.from_numpy(found)
                valid[s, head] = found >= 0
                slots[s, head] = found.clamp(min=0)
        return slots.to(queries.device), valid.to(queries.device)

    def _faiss_index(self, s: int, head: int):
        """The faiss index of one stream and head, built on first use and extended while nothing was evicted."""

        count = int(self.num_chunks[s])
        index = self._faiss_indexes.get((s, head))
        if index is not None and self._faiss_count[(s, head)] == count:
            return index
        vectors = self.chunk_keys[s, head, :count].detach().float().cpu().contiguous().numpy()
        if index is not None and self.backend != "faiss-ivf":  # append the chunks written since the last search
            index.add(vectors[self._faiss_count[(s, head)]:])
        else:
            index = self.build_faiss_index(vectors)
        self._faiss_indexes[(s, head)] = index
        self._faiss_count[(s, head)] = count
        return index

    def build_faiss_index(self, vectors):
        """A faiss inner-product index of this bank's backend over `vectors` (n, head_dim), float32 numpy."""
        import faiss

        dim = vectors.shape[1]
        if self.backend == "faiss-flat":
            index = faiss.IndexFlatIP(dim)
        elif self.backend == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(dim, self.faiss_hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            # IVF needs enough points per list to train (faiss asks for 39); below that an exact flat index is both
            # faster and exact.
            nlist = self.faiss_nlist or max(1, int(math.sqrt(len(vectors))))
            if len(vectors) < 39 * nlist:
                index = faiss.IndexFlatIP(dim)
            else:
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
                index.train(vectors)
                index.nprobe = min(self.faiss_nprobe, nlist)
        index.add(vectors)
        return index

    def search_heads(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` for the queries of every attention head: (streams, heads, tokens, head_dim) with heads a multiple
        of the bank's key/value heads (grouped-query attention: query head h reads key/value head
        h // (heads / kv_heads)). Returns slots and validity of shape (streams, heads, tokens, k)."""
        streams, heads, tokens, dim = queries.shape
        kv_heads = self.spec.num_kv_heads
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly.")
        slots, valid = self.search(queries.reshape(streams, kv_heads, heads // kv_heads * tokens, dim), k)
        return slots.reshape(streams, heads, tokens, -1), valid.reshape(streams, heads, tokens, -1)

    def retrieve(self, queries: torch.Tensor, k: int) -> Retrieved:
        """Token keys and values of the top-k chunks, per query token and per head.

        queries: (streams, heads, tokens, head_dim), as `search_heads` takes them.
        """
        streams, heads, tokens, dim = queries.shape
        kv_heads = self.spec.num_kv_heads
        slots, valid = self.search_heads(queries, k)
        k = slots.shape[-1]
        chunk = self.spec.chunk_size
        # Rows of (chunk * dim) numbers picked by one flat index over (stream, head, slot): the fastest gather on CPU.
        allocated = self.keys.shape[2]
        offsets = (torch.arange(streams, device=slots.device)[:, None] * kv_heads
                   + torch.arange(kv_heads, device=slots.device)[None, :]) * allocated
        rows = (slots.reshape(streams, kv_heads, -1) + offsets[..., None]).flatten()
        shape = (streams, heads, tokens, k * chunk, dim)
        keys = self.keys.reshape(-1, chunk * dim).index_select(0, rows).reshape(shape)
        values = self.values.reshape(-1, chunk * dim).index_select(0, rows).reshape(shape)
        valid = valid[..., None].expand(-1, -1, -1, -1, chunk).reshape(streams, heads, tokens, k * chunk)
        return Retrieved(keys=keys, values=values, valid=valid)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write the bank to `directory/memory_bank.safetensors`, chunks oldest first, with its spec as metadata."""
        tensors = {}
        for s in range(self.num_streams):
            count = int(self.num_chunks[s])
            order = (self.write_slot[s] - count + torch.arange(count, device=self.keys.device)) % self.spec.capacity_chunks
            tensors[f"stream{s}.keys"] = self.keys[s][:, order].contiguous().cpu()
            tensors[f"stream{s}.values"] = self.values[s][:, order].contiguous().cpu()
            if self.pending_keys[s] is not None:
                tensors[f"stream{s}.pending_keys"] = self.pending_keys[s].contiguous().cpu()
                tensors[f"stream{s}.pending_values"] = self.pending_values[s].contiguous().cpu()
        tensors["evicted_tokens"] = self.evicted_tokens.clone()
        metadata = {"spec": json.dumps(asdict(self.spec)), "num_streams": str(self.num_streams)}
        atomic_write_bytes(os.path.join(directory, MEMORY_FILE), save(tensors, metadata=metadata))

    @classmethod
    def load(cls, directory: str | os.PathLike, expected: MemoryBankSpec, **kwargs) -> MemoryBank:
        """Read a bank saved by `save`; raises if it was made by another backbone, layer or bank geometry."""
        from safetensors import safe_open

        path = os.path.join(directory, MEMORY_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No memory bank at {path}.")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if "spec" not in metadata:
            raise ValueError(f"{path} has no memory bank spec in its metadata; it was not written by MemoryBank.save.")
        saved = MemoryBankSpec(**json.loads(metadata["spec"]))
        if saved != expected:
            differ = {k: (v, getattr(expected, k)) for k, v in asdict(saved).items() if v != getattr(expected, k)}
            details = ", ".join(f"{k}: saved {a!r} vs this model {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"The memory bank in {directory} was made for another model or layer and cannot be read by this one "
                f"({details}). Re-run `memorize` with this model instead."
            )
        tensors = load_file(path)
        bank = cls(saved, int(metadata["num_streams"]), **kwargs)
        for s in range(bank.num_streams):
            keys = tensors[f"stream{s}.keys"].to(bank.keys)
            bank._append_chunks(s, keys, tensors[f"stream{s}.values"].to(bank.values))
            if f"stream{s}.pending_keys" in tensors:
                bank.pending_keys[s] = tensors[f"stream{s}.pending_keys"].to(bank.keys)
                bank.pending_values[s] = tensors[f"stream{s}.pending_values"].to(bank.values)
        bank.evicted_tokens = tensors["evicted_tokens"].clone()
        return bank
