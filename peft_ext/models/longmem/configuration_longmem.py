"""Configuration of LongMem (Wang et al., "Augmenting Language Models with Long-Term Memory", NeurIPS 2023)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from .memory_bank import RETRIEVAL_BACKENDS

SUPPORTED_BACKBONES = ("gpt2", "llama")


def default_memory_layer(num_backbone_layers: int) -> int:
    """The backbone layer whose keys/values are cached: about ¾ of the depth (the paper: layer 18 of 24, index 17).

    It must be an odd index 2i+1, the block that initializes SideNet layer i, so that the SideNet's memory layer
    starts with the query projection that matches the cached keys.
    """
    return max(1, 2 * ((3 * num_backbone_layers // 4) // 2) - 1)


class LongMemConfig(PretrainedConfig):
    r"""Configuration of a [`LongMemForCausalLM`]: a frozen backbone, its memory bank and a trainable SideNet.

    Args:
        backbone (`str`, *optional*):
            Hub id or local folder of the frozen backbone. Stored in saved checkpoints instead of the backbone's
            weights; `from_pretrained` reloads the backbone from it. Set by `from_backbone`.
        backbone_config (`dict`, *optional*):
            The backbone's own config (a `to_dict()`), so that the model can be rebuilt without its weights and the
            layer indices below can be checked. Set by `from_backbone`.
        memory_layer (`int`, *optional*):
            0-based index of the backbone layer whose attention keys and values are cached (paper: 17 of 24).
            Must be odd (block 2i+1 initializes SideNet layer i, which becomes the memory-augmented layer).
            Default: [`default_memory_layer`] (about ¾ of the depth).
        chunk_size (`int`, defaults to 4):
            Tokens per memory chunk; a chunk is retrieved by the mean of its token keys (paper: 4, 2 for ICL).
        memory_size (`int`, defaults to 65536):
            Capacity of each stream's bank in tokens, a multiple of `chunk_size`; FIFO beyond it.
        topk_chunks (`int`, defaults to 16):
            Chunks retrieved per token and head (paper: 16, i.e. 64 key/value pairs at `chunk_size=4`; the official
            code fixes the pairs, k = 64, so its in-context-learning evaluation with chunks of 2 retrieves 32).
        retrieval_backend (`str`, defaults to `"torch"`):
            One of `"torch"` (exact), `"faiss-flat"` (exact), `"faiss-ivf"`, `"faiss-hnsw"` (approximate).
        faiss_nlist (`int`, defaults to 0):
            IVF lists; 0 picks √(chunks) when the index is built (an exact flat index below 39 chunks per list).
        faiss_nprobe (`int`, defaults to 8):
            IVF lists visited per query.
        faiss_hnsw_m (`int`, defaults to 32):
            HNSW neighbours per node.
        gate_init (`float`, defaults to 0.0):
            Initial value of the per-head memory gate logit g; the memory-augmented layer mixes
            σ(g)·memory + (1−σ(g))·local (σ(0) = ½, as in the official code).
    """

    model_type = "longmem"

    def __init__(self, backbone: str | None = None, backbone_config: dict | None = None,
                 memory_layer: int | None = None, chunk_size: int = 4, memory_size: int = 65536,
                 topk_chunks: int = 16, retrieval_backend: str = "torch", faiss_nlist: int = 0,
                 faiss_nprobe: int = 8, faiss_hnsw_m: int = 32, gate_init: float = 0.0, **kwargs):
        for name, value in (("chunk_size", chunk_size), ("memory_size", memory_size), ("topk_chunks", topk_chunks),
                            ("faiss_nprobe", faiss_nprobe), ("faiss_hnsw_m", faiss_hnsw_m)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(faiss_nlist, int) or faiss_nlist < 0:
            raise ValueError(f"`faiss_nlist` must be a non-negative integer (0 = automatic), got {faiss_nlist!r}.")
        if memory_size % chunk_size:
            raise ValueError(f"`memory_size` ({memory_size}) must be a multiple of `chunk_size` ({chunk_size}).")
        if retrieval_backend not in RETRIEVAL_BACKENDS:
            raise ValueError(f"`retrieval_backend` must be one of {RETRIEVAL_BACKENDS}, got {retrieval_backend!r}.")
        if backbone_config is not None:
            if isinstance(backbone_config, PretrainedConfig):
                backbone_config = backbone_config.to_dict()
            family = backbone_config.get("model_type")
            if family not in SUPPORTED_BACKBONES:
                raise ValueError(
                    f"Backbone model_type must be one of {SUPPORTED_BACKBONES} (GPT-2 or Llama families), got {family!r}."
                )
            depth = backbone_config.get("n_layer", backbone_config.get("num_hidden_layers"))
            if depth < 2:
                raise ValueError(f"The backbone needs at least 2 layers for a SideNet, it has {depth}.")
            if memory_layer is None:
                memory_layer = default_memory_layer(depth)
            if not isinstance(memory_layer, int) or not 1 <= memory_layer < depth or memory_layer % 2 == 0:
                raise ValueError(
                    f"`memory_layer` must be an odd backbone layer index in [1, {depth - 1}] (block 2i+1 initializes "
                    f"SideNet layer i), got {memory_layer!r}; the default for this backbone is "
                    f"{default_memory_layer(depth)}."
                )
        elif memory_layer is not None and (not isinstance(memory_layer, int) or memory_layer < 1 or memory_layer % 2 == 0):
            raise ValueError(f"`memory_layer` must be an odd positive layer index, got {memory_layer!r}.")
        self.backbone = backbone
        self.backbone_config = backbone_config
        self.memory_layer = memory_layer
        self.chunk_size = chunk_size
        self.memory_size = memory_size
        self.topk_chunks = topk_chunks
        self.retrieval_backend = retrieval_backend
        self.faiss_nlist = faiss_nlist
        self.faiss_nprobe = faiss_nprobe
        self.faiss_hnsw_m = faiss_hnsw_m
        self.gate_init = float(gate_init)
        if backbone_config is not None:
            for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, backbone_config.get(name))
        super().__init__(**kwargs)

    def get_backbone_config(self) -> PretrainedConfig:
        if self.backbone_config is None:
            raise ValueError("This LongMemConfig has no `backbone_config`; build the model with `from_backbone`.")
        settings = dict(self.backbone_config)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)

    @property
    def num_backbone_layers(self) -> int:
        return self.get_backbone_config().num_hidden_layers

    @property
    def sidenet_num_layers(self) -> int:
        """Half the backbone depth: SideNet layer i is initialized from backbone block 2i+1."""
        return self.num_backbone_layers // 2

    @property
    def sidenet_memory_layer(self) -> int:
        """The SideNet layer initialized from the memory layer, which reads the memory."""
        return (self.memory_layer - 1) // 2
