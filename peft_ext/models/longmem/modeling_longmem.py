"""LongMem: a frozen causal LM as memory encoder, a memory bank of its attention keys/values, and a trained SideNet.

Wang et al., "Augmenting Language Models with Long-Term Memory" (NeurIPS 2023, arXiv:2306.07174). Notation of §2:

* The frozen backbone (L layers) encodes a segment; its hidden states are H^0 (embeddings) … H^L. The keys and values
  that its memory layer m computes are written to the memory bank after the segment has been read (§2.2), without
  gradients. They are taken from the backbone's own projection modules with forward hooks (`k_proj`/`v_proj` of
  Llama, the key/value thirds of GPT-2's `c_attn`), so the backbone is never re-implemented.
* The SideNet has L/2 layers; layer l (1-based) computes, eq. (1) of §2.4,
      H_side^l = f_side^l(H_side^{l-1}) + (H^{2l} − H^{2l−2}),       H_side^0 = H^0,
  the second term being the cross-network residual. Layer l is initialized from backbone block 2l−1 (0-based index
  2i+1 for SideNet layer i); its final norm is a copy of the backbone's, and the output head is the backbone's, frozen.
* The memory-augmented SideNet layer (the one initialized from the memory layer, so its queries start aligned with the
  cached keys) attends, per head h, to the local causal context and, with its own softmax, to the key/value pairs of
  the top-k chunks retrieved from the bank for each token (§2.3, eq. (2)):
      A = σ(g_h) · softmax(Q K̃ᵀ/√d) Ṽ + (1 − σ(g_h)) · softmax(Q Kᵀ/√d + causal) V
  with a learned gate logit g_h per head.

Position: memories carry no positional information. For rotary backbones (Llama) the bank stores keys *before* the
rotation (the output of `k_proj`) and the memory attention uses the SideNet's query before its rotation, so a memory
is matched by content only, wherever it was in the stream; local attention uses the rotary positions as usual. For
GPT-2 the learned absolute position embedding is part of the hidden state the keys are computed from (positions
restart at 0 with every segment), and memory attention adds no positional bias either.

Departures from the paper and the official code: one bank per batch row (see `memory_bank.py`); when a row's bank is
empty its memory branch is switched off (the layer is then plain local attention) instead of attending to nothing;
`generate` reads the bank but does not write the generated tokens into it (they are in the local KV cache).
"""

from __future__ import annotations

import copy
import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_longmem import LongMemConfig
from .memory_bank import MemoryBank, MemoryBankSpec


# ---------------------------------------------------------------------------------------------------------------
# Backbone families: where their blocks, norms and projections live. Only attribute access, no re-implementation.
# ---------------------------------------------------------------------------------------------------------------
class FusedQKV(nn.Module):
    """GPT-2's fused `c_attn` projection, returning (q, k, v)."""

    def __init__(self, c_attn: nn.Module, hidden_size: int):
        super().__init__()
        self.c_attn = c_attn
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.c_attn(x).split(self.hidden_size, dim=-1)


class SeparateQKV(nn.Module):
    """Llama's `q_proj`, `k_proj`, `v_proj`."""

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class BackboneFamily:
    """Attribute paths of one backbone family (GPT-2 or Llama)."""

    def __init__(self, backbone: PreTrainedModel):
        config = backbone.config
        self.model_type = config.model_type
        if self.model_type == "gpt2":
            if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
                raise ValueError("GPT-2 backbones with `scale_attn_by_inverse_layer_idx` or `reorder_and_upcast_attn` "
                                 "are not supported: the SideNet's attention uses the standard 1/√d scaling.")
            self.blocks = backbone.transformer.h
            self.final_norm = backbone.transformer.ln_f
            self.rotary = None
            self.num_heads = self.num_kv_heads = config.n_head
            self.head_dim = config.n_embd // config.n_head
            self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        elif self.model_type == "llama":
            self.blocks = backbone.model.layers
            self.final_norm = backbone.model.norm
            self.rotary = backbone.model.rotary_emb
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self.scaling = self.head_dim**-0.5
        else:
            raise ValueError(f"Backbone model_type must be 'gpt2' or 'llama', got {self.model_type!r}.")
        self.hidden_size = config.hidden_size

    def block_parts(self, index: int) -> dict[str, nn.Module]:
        """Deep copies of block `index`'s modules, to initialize a SideNet layer from."""
        block = copy.deepcopy(self.blocks[index])
        if self.model_type == "gpt2":
            return dict(norm1=block.ln_1, qkv=FusedQKV(block.attn.c_attn, self.hidden_size), out_proj=block.attn.c_proj,
                        norm2=block.ln_2, mlp=block.mlp)
        attn = block.self_attn
        return dict(norm1=block.input_layernorm, qkv=SeparateQKV(attn.q_proj, attn.k_proj, attn.v_proj),
                    out_proj=attn.o_proj, norm2=block.post_attention_layernorm, mlp=block.mlp)

    def key_value_modules(self, index: int) -> list[nn.Module]:
        """The modules of block `index` whose outputs are its keys and values (before any rotation)."""
        if self.model_type == "gpt2":
            return [self.blocks[index].attn.c_attn]
        attn = self.blocks[index].self_attn
        return [attn.k_proj, attn.v_proj]

    def split_key_value(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, tokens, kv_heads, head_dim) keys and values from the hooked modules' outputs."""
        if self.model_type == "gpt2":
            _, keys, values = outputs[0].split(self.hidden_size, dim=-1)
        else:
            keys, values = outputs
        shape = (*keys.shape[:2], self.num_kv_heads, self.head_dim)
        return keys.reshape(shape), values.reshape(shape)


class BackboneTaps:
    """Forward hooks on the frozen backbone: its hidden states H^0 … H^L and the memory layer's keys and values."""

    def __init__(self, family: BackboneFamily, memory_layer: int):
        self.family = family
        self.hidden_states: list[torch.Tensor | None] = []
        self.key_value_outputs: list[torch.Tensor] = []
        self.active = False
        family.blocks[0].register_forward_pre_hook(self._embeddings, with_kwargs=True)
        for block in family.blocks:
            block.register_forward_hook(self._block_output)
        for module in family.key_value_modules(memory_layer):
            module.register_forward_hook(self._key_value)

    def _embeddings(self, module, args, kwargs):
        if self.active:
            self.hidden_states.append(args[0] if args else kwargs["hidden_states"])

    def _block_output(self, module, args, output):
        if self.active:
            self.hidden_states.append(output[0] if isinstance(output, tuple) else output)

    def _key_value(self, module, args, output):
        if self.active:
            self.key_value_outputs.append(output)

    def run(self, backbone: nn.Module, **inputs) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, object]:
        """Run the backbone without gradients; returns (H^0…H^L, memory keys, memory values, backbone output)."""
        self.hidden_states, self.key_value_outputs, self.active = [], [], True
        try:
            with torch.no_grad():
                output = backbone(**inputs)
        finally:
            self.active = False
        keys, values = self.family.split_key_value(self.key_value_outputs)
        hidden_states = self.hidden_states
        self.hidden_states, self.key_value_outputs = [], []
        return hidden_states, keys, values, output


# ---------------------------------------------------------------------------------------------------------------
# SideNet
# ---------------------------------------------------------------------------------------------------------------
def memory_attention(queries: torch.Tensor, bank: MemoryBank, topk_chunks: int, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K̃ᵀ·scaling) Ṽ over each token's retrieved key/value pairs (its own softmax, no positional bias).

    queries: (batch, heads, tokens, head_dim). Returns the read-out of the same shape and a (batch, 1, tokens, 1)
    mask, False for the rows whose bank is empty (they have nothing to read).
    """
    retrieved = bank.retrieve(queries.detach(), topk_chunks)
    keys = retrieved.keys.to(queries.dtype)
    values = retrieved.values.to(queries.dtype)
    scores = torch.einsum("bhtd,bhtkd->bhtk", queries, keys) * scaling
    scores = scores.masked_fill(~retrieved.valid, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1) * retrieved.valid
    has_memory = retrieved.valid.any(dim=-1, keepdim=True).any(dim=1, keepdim=True)
    return torch.einsum("bhtk,bhtkd->bhtd", probs, values), has_memory


class SideNetLayer(nn.Module):
    """One pre-norm transformer block of the SideNet, initialized from a backbone block.

    The memory-augmented layer additionally reads the memory bank (eq. (2) of the module docstring) through its own
    query projection, mixing per head with the learned gate σ(g).
    """

    def __init__(self, parts: dict[str, nn.Module], family: BackboneFamily, cache_index: int,
                 gate_init: float | None):
        super().__init__()
        self.norm1, self.qkv, self.out_proj = parts["norm1"], parts["qkv"], parts["out_proj"]
        self.norm2, self.mlp = parts["norm2"], parts["mlp"]
        self.num_heads, self.num_kv_heads, self.head_dim = family.num_heads, family.num_kv_heads, family.head_dim
        self.scaling = family.scaling
        self.cache_index = cache_index
        self.memory_gate = None if gate_init is None else nn.Parameter(torch.full((family.num_heads,), gate_init))

    @property
    def reads_memory(self) -> bool:
        return self.memory_gate is not None

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                local_mask: torch.Tensor | None, cache: DynamicCache | None, bank: MemoryBank | None,
                topk_chunks: int) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden))
        q = q.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        memory_queries = q  # before the rotation: memories are matched by content only
        if rotary is not None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        local = F.scaled_dot_product_attention(
            q, k, v, attn_mask=local_mask, is_causal=local_mask is None and tokens > 1, scale=self.scaling,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        if self.reads_memory and bank is not None:
            if bank.is_empty():
                # Nothing to read; the gate stays in the graph (with a zero gradient), so that every process's
                # backward produces the same gradients whatever its banks hold (DeepSpeed reduces them by bucket).
                read, has_memory = torch.zeros_like(local), local.new_zeros(batch, 1, tokens, 1)
            else:
                read, has_memory = memory_attention(memory_queries, bank, topk_chunks, self.scaling)
            gate = torch.sigmoid(self.memory_gate)[None, :, None, None] * has_memory
            local = gate * read + (1 - gate) * local
        attended = self.out_proj(local.transpose(1, 2).reshape(batch, tokens, -1))
        hidden = hidden + attended
        return hidden + self.mlp(self.norm2(hidden))


def local_attention_mask(attention_mask: torch.Tensor | None, tokens: int, past: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean (batch, 1, tokens, past + tokens) mask: causal, without padded keys; None when plain causal works."""
    if attention_mask is None and past == 0:
        return None
    total = past + tokens
    query_positions = torch.arange(past, total, device=device)[:, None]
    key_positions = torch.arange(total, device=device)[None, :]
    mask = (key_positions <= query_positions)[None, None]
    if attention_mask is not None:
        # a padded query still sees itself, so that its softmax is defined (its output is never used)
        mask = mask & (attention_mask[:, None, None, :total].bool() | (key_positions == query_positions))
    return mask


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class LongMemPreTrainedModel(PreTrainedModel):
    config: LongMemConfig
    config_class = LongMemConfig
    base_model_prefix = "longmem"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        # Every weight is a copy of a backbone weight (or the gate, set from `gate_init`): nothing to initialize.
        return


class LongMemForCausalLM(LongMemPreTrainedModel, GenerationMixin):
    """LongMem around a frozen GPT-2- or Llama-family causal LM. See the module docstring for the equations.

    Streams: the memory bank has one stream per batch row. `forward` reads a segment (retrieving from each row's
    bank) and then writes that segment's memory-layer keys/values into the same row's bank, so consecutive calls
    with consecutive segments of the same documents build each row's long-term memory; pass `new_document` (a bool
    per row) to empty a row's bank when a new document starts there. A batch whose size differs from the bank's
    number of streams raises, unless the bank was never used (it is then created with one stream per row).
    """

    def __init__(self, config: LongMemConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = AutoModelForCausalLM.from_config(config.get_backbone_config())
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        family = BackboneFamily(backbone)
        self.family = family
        self.taps = BackboneTaps(family, config.memory_layer)
        depth = len(family.blocks)
        self.sidenet = nn.ModuleList(
            SideNetLayer(family.block_parts(2 * i + 1), family, cache_index=depth + i,
                         gate_init=config.gate_init if i == config.sidenet_memory_layer else None)
            for i in range(depth // 2)
        )
        self.sidenet_norm = copy.deepcopy(family.final_norm)
        self.sidenet.requires_grad_(True)
        self.sidenet_norm.requires_grad_(True)
        self.memory: MemoryBank | None = None
        self.post_init()

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str | os.PathLike | PreTrainedModel, config: LongMemConfig | None = None,
                      **backbone_kwargs) -> LongMemForCausalLM:
        """Wrap a frozen backbone (a model, a Hub id or a local folder) with a fresh SideNet.

        `config` gives the LongMem settings; its backbone fields are filled in from the backbone. The reference saved
        with the SideNet is the id or folder the backbone was loaded from (`name_or_path`); a backbone built from a
        config has none, and must then be passed again to `from_pretrained`.
        """
        if not isinstance(backbone, PreTrainedModel):
            backbone = AutoModelForCausalLM.from_pretrained(backbone, **backbone_kwargs)
        settings = (config or LongMemConfig()).to_dict()
        for name in ("backbone", "backbone_config", "model_type", "transformers_version", "architectures"):
            settings.pop(name, None)
        config = LongMemConfig(backbone=getattr(backbone, "name_or_path", None) or None,
                               backbone_config=backbone.config.to_dict(), **settings)
        return cls(config, backbone=backbone)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        backbone: PreTrainedModel | None = None, config: LongMemConfig | None = None, **kwargs):
        """Load a SideNet saved by `save_pretrained` (a folder or a Hub id) and the backbone it references.

        Pass `backbone` to use an already loaded backbone (required when the checkpoint has no backbone reference,
        i.e. the backbone was built from a config). The backbone's weights are checked against the reference by
        shape only; it is the caller's job to pass the same model.
        """
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file
        from transformers.utils import SAFE_WEIGHTS_NAME

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        if config is None:
            config = LongMemConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if backbone is None:
            if not config.backbone:
                raise ValueError(
                    f"The checkpoint {pretrained_model_name_or_path} has no backbone reference (its backbone was built "
                    "from a config); pass the backbone: `LongMemForCausalLM.from_pretrained(path, backbone=model)`."
                )
            backbone = AutoModelForCausalLM.from_pretrained(config.backbone, **hub_kwargs)
        model = cls(config, backbone=backbone)
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            weights = os.path.join(folder, SAFE_WEIGHTS_NAME)
        else:
            weights = hf_hub_download(folder, SAFE_WEIGHTS_NAME, **hub_kwargs)
        state = load_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"SideNet weights in {folder} do not fit this model: missing {missing}, "
                             f"unexpected {unexpected}.")
        return model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout in the memory encoder, the bank must not depend on the mode
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `forward` creates its own cache (backbone layers, then SideNet layers), see `_new_cache`.
        return False

    # -- memory ----------------------------------------------------------------------------------------------
    def memory_spec(self) -> MemoryBankSpec:
        """What this model's banks hold; a bank saved with another spec cannot be loaded into it."""
        weights = [m.weight for m in self.family.key_value_modules(self.config.memory_layer)]
        digest = hashlib.sha256(b"".join(w.detach().float().cpu().numpy().tobytes() for w in weights)).hexdigest()
        name = self.config.backbone or self.config.backbone_config.get("_name_or_path") or self.family.model_type
        return MemoryBankSpec(source=f"{name}@{digest[:16]}", layer=self.config.memory_layer,
                              num_kv_heads=self.family.num_kv_heads, head_dim=self.family.head_dim,
                              chunk_size=self.config.chunk_size, memory_size=self.config.memory_size)

    def _bank_options(self) -> dict:
        parameter = next(self.backbone.parameters())
        return dict(backend=self.config.retrieval_backend, faiss_nlist=self.config.faiss_nlist,
                    faiss_nprobe=self.config.faiss_nprobe, faiss_hnsw_m=self.config.faiss_hnsw_m,
                    device=parameter.device, dtype=parameter.dtype)

    def reset_memory(self, batch_size: int | None = None, rows: list[int] | torch.Tensor | None = None) -> None:
        """Empty the memory. `batch_size` starts new banks with that many streams; `rows` empties only those."""
        if batch_size is not None and (self.memory is None or self.memory.num_streams != batch_size):
            self.memory = MemoryBank(self.memory_spec(), batch_size, **self._bank_options())
        elif self.memory is not None:
            self.memory.reset(rows)

    def _bank_for(self, batch_size: int) -> MemoryBank:
        if self.memory is None:
            self.reset_memory(batch_size)
        self.memory.check_batch(batch_size)
        return self.memory

    def save_memory(self, directory: str | os.PathLike) -> None:
        if self.memory is None:
            raise ValueError("There is no memory to save: call `memorize` (or `forward`) first.")
        self.memory.save(directory)

    def load_memory(self, directory: str | os.PathLike) -> None:
        """Load a bank saved by `save_memory`; raises if another backbone, layer or bank geometry made it."""
        self.memory = MemoryBank.load(directory, self.memory_spec(), **self._bank_options())

    @torch.no_grad()
    def memorize(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                 segment_length: int = 1024, show_progress: bool | None = None) -> None:
        """Read a long input with the frozen backbone, `segment_length` tokens at a time, into the memory bank.

        input_ids: (batch, tokens), one stream per row (a 1-D tensor is one stream). Only the backbone runs (the
        SideNet is not needed to write memories). The progress bar shows for inputs of more than 8 segments unless
        `show_progress` says otherwise.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        if segment_length < 1:
            raise ValueError(f"`segment_length` must be >= 1, got {segment_length}.")
        bank = self._bank_for(input_ids.shape[0])
        starts = range(0, input_ids.shape[1], segment_length)
        show = len(starts) > 8 if show_progress is None else show_progress
        for start in tqdm(starts, desc="memorize", unit="segment", disable=not show):
            segment = input_ids[:, start:start + segment_length]
            mask = None if attention_mask is None else attention_mask[:, start:start + segment_length]
            _, keys, values, _ = self.taps.run(self.backbone.base_model, input_ids=segment, attention_mask=mask,
                                               use_cache=False)
            bank.write(keys, values, mask)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, past_key_values: DynamicCache | None = None,
                use_cache: bool | None = None, use_memory: bool = True, update_memory: bool = True,
                new_document: torch.BoolTensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Read a segment: retrieve from each row's bank, predict, then write the segment into the bank.

        Args:
            input_ids, attention_mask, labels: as for any causal LM (labels are shifted inside; -100 is ignored).
            past_key_values: the cache returned by a previous call (generation); local attention then covers it.
            use_memory: False reads no memory (the memory-augmented layer is then local attention only).
            update_memory: False leaves the bank unchanged (`generate` passes False).
            new_document: (batch,) bool; the banks of these rows are emptied before reading (document boundary).
            num_items_in_batch: set by `Trainer`: the loss is then the sum over this batch's labelled tokens divided
                by this count (their mean over all processes and accumulation steps).
        """
        batch, tokens = input_ids.shape
        bank = self._bank_for(batch) if (use_memory or update_memory) else None
        if new_document is not None and bank is not None:
            bank.reset(torch.nonzero(new_document.flatten()).flatten().tolist())
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        # The backbone's transformer only: its output head would compute logits that the SideNet replaces.
        hidden_states, keys, values, _ = self.taps.run(
            self.backbone.base_model, input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            use_cache=past_key_values is not None,
        )
        rotary = None
        if self.family.rotary is not None:
            positions = torch.arange(past, past + tokens, device=input_ids.device)[None].expand(batch, -1)
            rotary = self.family.rotary(hidden_states[0], positions)
        local_mask = local_attention_mask(attention_mask, tokens, past, input_ids.device)
        hidden = hidden_states[0]
        for i, layer in enumerate(self.sidenet):
            hidden = layer(hidden, rotary, local_mask, past_key_values, bank if use_memory else None,
                           self.config.topk_chunks)
            hidden = hidden + (hidden_states[2 * i + 2] - hidden_states[2 * i])  # cross-network residual
        logits = self.backbone.get_output_embeddings()(self.sidenet_norm(hidden))
        if update_memory:
            bank.write(keys, values, None if attention_mask is None else attention_mask[:, -tokens:])
        loss = None
        if labels is not None:
            # Llama's loss: with `Trainer`'s count of the labelled tokens of the whole (global, accumulated) batch,
            # their mean over all processes and accumulation steps, as Trainer expects of models that take loss kwargs
            loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: DynamicCache | None = None,
                                      attention_mask: torch.Tensor | None = None, **kwargs) -> dict:
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        return dict(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                    use_cache=kwargs.get("use_cache", True), update_memory=False,
                    use_memory=kwargs.get("use_memory", True))

    # -- saving ----------------------------------------------------------------------------------------------
    def sidenet_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only: SideNet layers, their final norm and the memory gates (not the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def _write_model_card(self, save_directory: str | os.PathLike, repo_id: str | None = None) -> None:
        from peft_ext.hub import render_model_card, save_model_card

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        # A local folder is no Hub id: the card's `base_model` metadata names Hub repositories only.
        hub_backbone = self.config.backbone if self.config.backbone and not os.path.exists(self.config.backbone) else None
        card = render_model_card(
            "longmem", base_model=hub_backbone, pipeline_tag="text-generation", repo_id=repo_id,
            config={k: getattr(self.config, k) for k in ("memory_layer", "chunk_size", "memory_size", "topk_chunks",
                                                           "retrieval_backend", "gate_init")},
            trainable_params=trainable, backbone_params=sum(p.numel() for p in self.backbone.parameters()),
        )
        save_model_card(card, save_directory)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs):
        """Save the SideNet (safetensors), the config with the backbone reference, and the model card.

        The frozen backbone is not saved; `from_pretrained` reloads it from `config.backbone`.
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use `push_to_hub(repo_id)` to upload a LongMem model.")
        kwargs.pop("state_dict", None)  # `Trainer.save_model` passes the full one; only the SideNet is saved
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=self.sidenet_state_dict(),
                                **kwargs)
        if is_main_process:
            self._write_model_card(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the saved folder (SideNet, config with the backbone reference, model card) as one commit."""
        from peft_ext.hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)
