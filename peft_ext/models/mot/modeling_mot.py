"""Mixture-of-Transformers (Liang et al., TMLR 2025, https://arxiv.org/abs/2411.04996) as a transformers model.

The structure follows transformers' Llama (attention interface, rotary embedding, `Cache`, gradient
checkpointing layers, output capturing); rotary embedding, RMSNorm and eager attention are imported from it.
What MoT changes (paper, Sec. 2.2 and Algorithm 1) is that every non-embedding module exists once per
modality, and a token goes through the modules of its own modality only:

    Q, K, V = Q_{m_i} x_i, K_{m_i} x_i, V_{m_i} x_i          per-modality projections (and QK-norms)
    A       = softmax(Q Kᵀ / √d + causal mask) V            ONE attention over the whole interleaved sequence
    h_i     = x_i + O_{m_i} A_i,   y_i = h_i + FFN_{m_i}(h_i)   (with the modality's norms)

Routing without wasted compute: `ModalityRouter` sorts the tokens by modality once per forward (a stable
argsort), so that the tokens of each modality form one block; every per-modality module
(`ModalityModuleList`) then runs one matmul on its block only. A layer gathers its input into per-modality
blocks once and stays in them through the norms, projections, residuals and FFN; only the attention core
(which mixes all tokens) runs in sequence order, so Q, K and V are scattered back (`index_copy_` into a
preallocated tensor) and the attention output is gathered again. With a single modality present, the order is
the identity and nothing moves at all. Untied modules never concatenate; a tied (shared) module concatenates
the blocks to run once on all tokens.

This file is copied next to the weights by `save_pretrained` (for `trust_remote_code=True`), so it imports only
torch, transformers and its sibling `configuration_mot.py`; peft-ext's model-card helpers are imported lazily,
inside a try block, where they are optional.
"""

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_mot import MoTConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------


# The hidden states of one modality per entry, (tokens_of_that_modality, ...), or None where the modality has no
# token in the batch.
Blocks = list[torch.Tensor | None]


class ModalityRouter:
    """The token order grouped by modality, computed once per forward and shared by every layer.

    `dispatch` takes a tensor in sequence order, shaped (batch, seq_len, ...), to per-modality blocks: one gather
    into the grouped order (a stable argsort of the modality ids, so each block keeps sequence order), then views.
    `combine` writes the blocks back into sequence order with one `index_copy_` per modality into a
    preallocated output. With a single modality present the order is the identity and neither moves any data.
    """

    def __init__(self, modality_ids: torch.LongTensor, num_modalities: int):
        self.batch_shape = tuple(modality_ids.shape)
        self.num_modalities = num_modalities
        flat = modality_ids.reshape(-1)
        self.num_tokens = flat.numel()
        # Split sizes must be Python ints: this is the one host sync of the routing, once per forward.
        self.counts: list[int] = torch.bincount(flat, minlength=num_modalities).tolist()
        self.present: list[int] = [m for m, count in enumerate(self.counts) if count] or [0]
        self.order: torch.Tensor | None = None
        self.indices: tuple[torch.Tensor, ...] | None = None
        if len(self.present) > 1:
            self.order = torch.argsort(flat, stable=True)
            self.indices = self.order.split(self.counts)  # positions of each modality's tokens

    def dispatch(self, x: torch.Tensor) -> Blocks:
        """(batch, seq_len, ...) in sequence order -> one block per modality."""
        flat = x.reshape(self.num_tokens, *x.shape[len(self.batch_shape):])
        if self.order is None:  # a single modality: the whole batch is its block, nothing moves
            return [flat if m == self.present[0] else None for m in range(self.num_modalities)]
        grouped = flat.index_select(0, self.order)
        return [block if count else None for block, count in zip(grouped.split(self.counts), self.counts)]

    def combine(self, blocks: Blocks) -> torch.Tensor:
        """One block per modality -> (batch, seq_len, ...) in sequence order."""
        first = blocks[self.present[0]]
        if self.indices is None:
            out = first
        else:
            out = first.new_empty((self.num_tokens, *first.shape[1:]))
            for m in self.present:
                out.index_copy_(0, self.indices[m], blocks[m])
        return out.reshape(*self.batch_shape, *out.shape[1:])


def map_blocks(fn: Callable[..., torch.Tensor], *blocks: Blocks) -> Blocks:
    """Apply `fn` to the blocks of each modality present (e.g. a residual add, a reshape)."""
    return [None if parts[0] is None else fn(*parts) for parts in zip(*blocks)]


def apply_towers(towers: list[Callable[[torch.Tensor], torch.Tensor]], blocks: Blocks) -> Blocks:
    """Run tower m on the block of modality m (untied: one tower per modality), or one shared tower on all.

    A tower whose modality has no token in the batch is not called (so it gets no gradient). A shared tower
    runs once, on the concatenation of the blocks: one matmul for all modalities' tokens.
    """
    if len(towers) > 1:
        return [None if block is None else tower(block) for tower, block in zip(towers, blocks)]
    present = [block for block in blocks if block is not None]
    if len(present) == 1:
        return [None if block is None else towers[0](block) for block in blocks]
    outputs = iter(towers[0](torch.cat(present)).split([block.shape[0] for block in present]))
    return [None if block is None else next(outputs) for block in blocks]


class ModalityModuleList(nn.ModuleList):
    """One module per modality (untied) or a single module shared by all modalities (tied).

    Called on per-modality blocks (see `ModalityRouter`), tower m runs once, on the modality-m tokens only (see
    `apply_towers`). The parameters are named `<name>.<modality>.<param>`, e.g. `self_attn.q_proj.1.weight`
    for the image tower of a text/image model.
    """

    @property
    def is_untied(self) -> bool:
        return len(self) > 1

    def forward(self, blocks: Blocks) -> Blocks:
        return apply_towers(list(self), blocks)


PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tower_target_modules(names: list[str], modalities: list[int] | None = None) -> str:
    """PEFT `target_modules` (a regex) for the towers of the named projections, e.g. LoRA on Q and V of every tower.

    `LoraConfig(target_modules=["q_proj", "v_proj"])` matches the `ModalityModuleList` named `q_proj`, which is not
    a layer PEFT can adapt; the layers are its towers, `q_proj.<modality>`. `modalities` picks towers (e.g. `[1]`:
    only the image tower of a text/image model); default all. A tied module has the single tower 0.

        get_peft_model(mot, LoraConfig(target_modules=tower_target_modules(["q_proj", "v_proj"])))
    """
    unknown = [name for name in names if name not in PROJECTION_NAMES]
    if not names or unknown:
        raise ValueError(f"`names` must be a non-empty list of {PROJECTION_NAMES}, got {names}.")
    if modalities is not None and (not modalities or any(not isinstance(m, int) or m < 0 for m in modalities)):
        raise ValueError(f"`modalities` must be None (all towers) or a non-empty list of tower indices >= 0, "
                         f"got {modalities}.")
    towers = r"\d+" if modalities is None else "|".join(str(m) for m in modalities)
    return rf".*\.({'|'.join(names)})\.({towers})"


def modality_ids_from_vocab(input_ids: torch.LongTensor, config: MoTConfig) -> torch.LongTensor:
    """The modality of each token from its id and `config.modality_vocab_ranges`.

    Raises a `ValueError` for an id outside every range (its modality is unknown) or when the config has no
    ranges.
    """
    ranges = config.modality_vocab_ranges
    if ranges is None:
        raise ValueError(
            "Cannot tell the modality of the tokens: pass `modality_ids` (same shape as `input_ids`, values in "
            f"[0, {config.num_modalities})) or set `config.modality_vocab_ranges`, which `generate()` needs to know "
            "the modality of each generated token."
        )
    modality_ids = torch.full_like(input_ids, -1)
    for modality, (start, end) in enumerate(ranges):
        modality_ids.masked_fill_((input_ids >= start) & (input_ids < end), modality)
    outside = modality_ids < 0
    if outside.any():
        bad = input_ids[outside]
        raise ValueError(
            f"Token id {bad[0].item()} ({bad.numel()} token(s) in all) is outside every range of "
            f"`config.modality_vocab_ranges` = {ranges} ({config.modality_names}), so its modality is unknown. "
            "Pass `modality_ids` explicitly or cover that id with a range."
        )
    return modality_ids


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class MoTMLP(nn.Module):
    """One modality's SwiGLU feed-forward network: down(act(gate(x)) * up(x)), no bias (as Llama's)."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _towers(config: MoTConfig, untied: bool) -> int:
    return config.num_modalities if untied else 1


def _norms(config: MoTConfig, size: int) -> ModalityModuleList:
    towers = _towers(config, config.untie_norms)
    return ModalityModuleList(LlamaRMSNorm(size, eps=config.rms_norm_eps) for _ in range(towers))


class MoTAttention(nn.Module):
    """Per-modality Q/K/V/O projections (and QK-norms) around one causal attention over all tokens.

    Takes and returns per-modality blocks of hidden states (see `ModalityRouter`); the queries, keys and values
    go back to sequence order for the attention itself, which is shared: the attention scores between any two
    tokens, whatever their modalities, are computed globally (paper, Algorithm 1).
    """

    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        towers = _towers(config, config.untie_attention)

        def projections(in_features: int, out_features: int) -> ModalityModuleList:
            return ModalityModuleList(nn.Linear(in_features, out_features, bias=False) for _ in range(towers))

        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = projections(config.hidden_size, q_size)
        self.k_proj = projections(config.hidden_size, kv_size)
        self.v_proj = projections(config.hidden_size, kv_size)
        self.o_proj = projections(q_size, config.hidden_size)
        # QK-norm: an RMSNorm over each head's queries and keys, before RoPE (as in Chameleon, OLMo 2, Qwen3).
        self.q_norm = _norms(config, self.head_dim) if config.qk_norm else None
        self.k_norm = _norms(config, self.head_dim) if config.qk_norm else None

    def forward(
        self,
        hidden_states: Blocks,
        router: ModalityRouter,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[Blocks, torch.Tensor | None]:
        def heads(projection: ModalityModuleList, norm: ModalityModuleList | None = None) -> torch.Tensor:
            # Each tower on its own tokens (and each modality's QK-norm on its own heads), then back to sequence
            # order, (batch, heads, seq_len, head_dim): from here on nothing depends on modality.
            blocks = map_blocks(lambda block: block.unflatten(-1, (-1, self.head_dim)), projection(hidden_states))
            return router.combine(blocks if norm is None else norm(blocks)).transpose(1, 2)

        query_states, key_states = heads(self.q_proj, self.q_norm), heads(self.k_proj, self.k_norm)
        value_states = heads(self.v_proj)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        # (batch, seq_len, heads, head_dim) -> per-modality blocks of (tokens, heads * head_dim) for O.
        attn_output = attn_output.reshape(*router.batch_shape, -1)
        return self.o_proj(router.dispatch(attn_output)), attn_weights


class MoTDecoderLayer(GradientCheckpointingLayer):
    """A transformer block whose attention projections, FFN and norms are chosen by each token's modality.

    norm_placement "pre" (Llama):          h = x + Attn(Norm₁(x)),   y = h + FFN(Norm₂(h))
    norm_placement "post_branch" (Chameleon's "swin" norm):
                                           h = x + Norm₁(Attn(x)),   y = h + Norm₂(FFN(h))

    Takes and returns (batch, seq_len, hidden) in sequence order (so captured hidden states and gradient
    checkpointing see ordinary tensors) and works on per-modality blocks in between.
    """

    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.norm_placement = config.norm_placement
        self.self_attn = MoTAttention(config=config, layer_idx=layer_idx)
        self.mlp = ModalityModuleList(MoTMLP(config) for _ in range(_towers(config, config.untie_ffn)))
        self.input_layernorm = _norms(config, config.hidden_size)
        self.post_attention_layernorm = _norms(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality_router: ModalityRouter | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        router = modality_router
        if router is None:
            raise ValueError("`modality_router` is required: MoTModel.forward builds it once and passes it to every layer.")
        residual = router.dispatch(hidden_states)  # per-modality blocks until the end of the layer
        attention_kwargs = dict(
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        if self.norm_placement == "pre":
            attn_output, _ = self.self_attn(self.input_layernorm(residual), router, **attention_kwargs)
            residual = map_blocks(torch.add, residual, attn_output)
            output = map_blocks(torch.add, residual, self.mlp(self.post_attention_layernorm(residual)))
        else:  # "post_branch"
            attn_output, _ = self.self_attn(residual, router, **attention_kwargs)
            residual = map_blocks(torch.add, residual, self.input_layernorm(attn_output))
            output = map_blocks(torch.add, residual, self.post_attention_layernorm(self.mlp(residual)))
        return router.combine(output)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MoTCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""`CausalLMOutputWithPast` plus the language-modeling loss of each modality.

    loss_per_modality (`torch.FloatTensor` of shape `(num_modalities,)`, *optional*, returned when `labels` are
        given): for each modality, the mean next-token cross-entropy over the targets of that modality (the
        modality of a target is the modality of the token being predicted); NaN for a modality without targets
        in the batch. Differentiable, so a trainer can weight modalities.
    """

    loss_per_modality: torch.FloatTensor | None = None


class MoTPreTrainedModel(PreTrainedModel):
    config: MoTConfig
    config_class = MoTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # The attention core is Llama's, called through the same interface.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The per-modality block sizes are data-dependent (Python ints from the batch), so no full-graph compile.
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": MoTDecoderLayer,
        "attentions": MoTAttention,
    }

    # -- model card ------------------------------------------------------------------------------------------

    def _write_model_card(self, save_directory: str | os.PathLike, repo_id: str | None = None,
                          tags: list[str] | None = None) -> None:
        try:
            # peft-ext's card helpers are optional here: this file also runs as remote code
            # (trust_remote_code=True) where peft-ext is not installed, and transformers only checks imports
            # outside try blocks. Without them the folder simply has no card, as for any transformers model.
            from peft_ext.hub import render_model_card, save_model_card
        except ImportError:
            return
        card = render_model_card(
            "mot",
            pipeline_tag="text-generation" if self.can_generate() else None,
            repo_id=repo_id,
            extra_tags=tags,
        )
        save_model_card(card, save_directory)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict | None = None, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the Mixture-of-Transformers model card (README.md)."""
        if push_to_hub:
            # transformers would upload the folder before the card is written; save, then upload as a whole.
            repo_id = kwargs.pop("repo_id", os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1])
            hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "create_pr", "private", "token") if k in kwargs}
            self.save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
            if is_main_process:
                self.push_to_hub(repo_id, **hub_kwargs)
            return
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if is_main_process:
            self._write_model_card(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the saved folder (weights, config, code for `trust_remote_code` and our model card) as one commit.

        Takes the keywords of `PreTrainedModel.push_to_hub`. transformers' own `push_to_hub` replaces the card
        that `save_pretrained` wrote with the remote or a generic one, so the saved folder is uploaded as is.
        """
        try:
            from peft_ext.hub import push_folder_to_hub  # optional, see `_write_model_card`
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        max_shard_size = kwargs.pop("max_shard_size", "50GB")
        tags = kwargs.pop("tags", None)

        def save_to(folder: str) -> None:
            # the plain transformers save, then the card once, with the repo id and tags it should show
            PreTrainedModel.save_pretrained(self, folder, max_shard_size=max_shard_size)
            self._write_model_card(folder, repo_id=repo_id, tags=tags)

        return push_folder_to_hub(save_to, repo_id, **kwargs)


class MoTModel(MoTPreTrainedModel):
    """The Mixture-of-Transformers decoder (embeddings, MoT layers, final norm), without the output head."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        # The final norm is a non-embedding parameter too: per modality when the norms are untied.
        self.norm = _norms(config, config.hidden_size)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        # Initialize weights and apply final processing
        self.post_init()

    def get_modality_ids(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """Check `modality_ids` if given, else derive them from the token ids (`config.modality_vocab_ranges`);
        with a single modality and no ranges, every token is modality 0. Raises a `ValueError` that says what is
        wrong, before any compute."""
        reference = input_ids if input_ids is not None else inputs_embeds
        shape = tuple(reference.shape[:2])
        num_modalities = self.config.num_modalities
        if modality_ids is not None:
            if not isinstance(modality_ids, torch.Tensor):
                modality_ids = torch.as_tensor(modality_ids)
            if modality_ids.is_floating_point() or modality_ids.is_complex() or modality_ids.dtype == torch.bool:
                raise ValueError(f"`modality_ids` must be an integer tensor, got dtype {modality_ids.dtype}.")
            if tuple(modality_ids.shape) != shape:
                raise ValueError(
                    f"`modality_ids` must have the shape of `input_ids`, (batch, seq_len) = {shape}, got "
                    f"{tuple(modality_ids.shape)}."
                )
            if modality_ids.numel():
                low, high = (int(v) for v in torch.stack([modality_ids.min(), modality_ids.max()]).tolist())
                if low < 0 or high >= num_modalities:
                    raise ValueError(
                        f"`modality_ids` must hold integers in [0, num_modalities) = [0, {num_modalities}) "
                        f"({self.config.modality_names}), got values from {low} to {high}."
                    )
            return modality_ids.to(device=reference.device, dtype=torch.long)
        if self.config.modality_vocab_ranges is not None and input_ids is not None:
            return modality_ids_from_vocab(input_ids, self.config)
        if num_modalities == 1:
            return torch.zeros(shape, dtype=torch.long, device=reference.device)
        if input_ids is None:
            raise ValueError(
                f"With `inputs_embeds` and num_modalities={num_modalities}, pass `modality_ids` (batch, seq_len): "
                "the modality cannot be read from token ids."
            )
        return modality_ids_from_vocab(input_ids, self.config)  # raises: no ranges

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        modality_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        modality_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The modality of each input token, in [0, num_modalities). Defaults to the modality of each token id
            under `config.modality_vocab_ranges`, or to 0 when the model has a single modality.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        # Check the input and compute the routing before any compute: bad input fails fast, and the token
        # order grouped by modality is computed once and shared by every layer.
        modality_ids = self.get_modality_ids(input_ids, inputs_embeds, modality_ids)
        router = ModalityRouter(modality_ids, self.config.num_modalities)

        if inputs_embeds is None:
            inputs_embeds: torch.Tensor = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                modality_router=router,
                **kwargs,
            )

        hidden_states = router.combine(self.norm(router.dispatch(hidden_states)))
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
        )


class MoTForCausalLM(MoTPreTrainedModel, GenerationMixin):
    """Mixture-of-Transformers language model: `MoTModel` plus the output head shared by all modalities."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.model = MoTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        # Initialize weights and apply final processing
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        modality_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoTCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modeling loss, shifted inside the model as for Llama (-100 is ignored). Also
            gives `loss_per_modality`.
        modality_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The modality of each input token, in [0, num_modalities). Defaults to the modality of each token id
            under `config.modality_vocab_ranges`, or to 0 when the model has a single modality.

        Example:

        ```python
        >>> import torch, peft_ext
        >>> config = peft_ext.MoTConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                             num_attention_heads=4, num_modalities=2,
        ...                             modality_vocab_ranges=[[0, 50], [50, 100]])
        >>> model = peft_ext.MoTForCausalLM(config)
        >>> out = model(torch.tensor([[1, 2, 60, 61, 3]]), labels=torch.tensor([[1, 2, 60, 61, 3]]))
        >>> out.loss_per_modality.shape
        torch.Size([2])
        ```"""
        if labels is not None:
            # The per-modality loss needs the modality of every target: resolve (and check) it here once.
            modality_ids = self.model.get_modality_ids(input_ids, inputs_embeds, modality_ids)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            modality_ids=modality_ids,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = loss_per_modality = None
        if labels is not None:
            loss, loss_per_modality = self._losses(logits, labels, modality_ids, kwargs.get("num_items_in_batch"))

        return MoTCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            loss_per_modality=loss_per_modality,
        )

    def _losses(self, logits: torch.Tensor, labels: torch.LongTensor, modality_ids: torch.LongTensor,
                num_items_in_batch: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The language-modeling loss as Llama's (`ForCausalLMLoss`: shifted targets, -100 ignored, divided by
        `num_items_in_batch` when `Trainer` gives it, else the mean) and the mean loss per modality, from one
        cross-entropy over the vocabulary (the log-softmax over the logits is the costly part)."""
        # Position t predicts token t + 1, whose modality is the target's modality; the last position has no target.
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device).reshape(-1)
        target_modality = F.pad(modality_ids, (0, 1))[:, 1:].to(logits.device).reshape(-1)
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=-100,
                                    reduction="none")
        valid = targets != -100
        if num_items_in_batch is None:
            loss = per_token.sum() / valid.sum()
        else:
            loss = per_token.sum() / torch.as_tensor(num_items_in_batch, device=per_token.device)
        target_modality = target_modality[valid]
        num_modalities = self.config.num_modalities
        # index_add keeps the sums differentiable; a modality without targets gives 0 / 0 = NaN.
        sums = per_token.new_zeros(num_modalities).index_add(0, target_modality, per_token[valid])
        counts = torch.bincount(target_modality, minlength=num_modalities).to(sums.dtype)
        return loss, sums / counts

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        modality_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        """GenerationMixin's inputs, plus the `modality_ids` of the positions fed in this step.

        `modality_ids` given to `generate()` describe the prompt; the modality of every generated token follows
        from its id (`config.modality_vocab_ranges`). When the model gets no `modality_ids`, it derives them all
        from the ids.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if modality_ids is None:
            return model_inputs
        fed_embeds = model_inputs.get("inputs_embeds")
        if fed_embeds is not None:
            # A prompt given as embeddings: `modality_ids` describe exactly those positions.
            model_inputs["modality_ids"] = modality_ids[:, -fed_embeds.shape[1]:]
            return model_inputs
        if inputs_embeds is not None:
            # Later steps after an embeddings prompt: `input_ids` holds only generated tokens, which the
            # `modality_ids` of the prompt do not describe; the model reads their modality from their ids.
            return model_inputs
        total, known = input_ids.shape[1], modality_ids.shape[1]
        if modality_ids.shape[0] != input_ids.shape[0] or known > total:
            raise ValueError(
                f"`modality_ids` of shape {tuple(modality_ids.shape)} do not fit `input_ids` of shape "
                f"{tuple(input_ids.shape)}: they must describe the prompt (batch, prompt_len)."
            )
        start = total - model_inputs["input_ids"].shape[1]  # first position fed in this step
        if start >= known:
            return model_inputs  # only generated tokens: the model reads their modality from their ids
        fed = modality_ids[:, start:]
        if known < total:
            fed = torch.cat([fed, modality_ids_from_vocab(input_ids[:, known:], self.config).to(fed.device)], dim=1)
        model_inputs["modality_ids"] = fed.contiguous()
        return model_inputs

    @classmethod
    def from_dense(
        cls,
        dense_model: PreTrainedModel,
        num_modalities: int,
        modality_names: list[str] | None = None,
        modality_vocab_ranges: list[list[int]] | None = None,
        **untie_flags: bool,
    ) -> "MoTForCausalLM":
        """Upcycle a dense Llama language model into a Mixture-of-Transformers model.

        Every tower of every untied module starts as a copy of the dense module, so the MoT model computes
        exactly the dense model's function for any mix of modalities; training then lets the towers diverge.

        Args:
            dense_model (`LlamaForCausalLM`): the dense model (weights are copied, not shared).
            num_modalities (`int`): K, the number of modalities.
            modality_names (`list[str]`, *optional*): see `MoTConfig`.
            modality_vocab_ranges (`list[list[int]]`, *optional*): see `MoTConfig`.
            **untie_flags: `untie_attention`, `untie_ffn`, `untie_norms` (each True by default).
        """
        allowed = ("untie_attention", "untie_ffn", "untie_norms")
        unknown = sorted(set(untie_flags) - set(allowed))
        if unknown:
            raise ValueError(
                f"`from_dense` takes only the untie flags {allowed} as keywords, got {unknown} (qk_norm and "
                "norm_placement='post_branch' change the function, so an upcycled model cannot start with them)."
            )
        dense_config = getattr(dense_model, "config", None)
        if getattr(dense_config, "model_type", None) != "llama" or not hasattr(dense_model, "lm_head"):
            raise ValueError(
                "`dense_model` must be a LlamaForCausalLM (model_type 'llama' with an `lm_head`), got "
                f"{type(dense_model).__name__}."
            )
        for name in ("attention_bias", "mlp_bias"):
            if getattr(dense_config, name, False):
                raise ValueError(f"`dense_model` has {name}=True; MoT's projections have no bias.")

        config = MoTConfig(
            vocab_size=dense_config.vocab_size,
            hidden_size=dense_config.hidden_size,
            intermediate_size=dense_config.intermediate_size,
            num_hidden_layers=dense_config.num_hidden_layers,
            num_attention_heads=dense_config.num_attention_heads,
            num_key_value_heads=dense_config.num_key_value_heads,
            head_dim=dense_config.head_dim,
            hidden_act=dense_config.hidden_act,
            max_position_embeddings=dense_config.max_position_embeddings,
            initializer_range=dense_config.initializer_range,
            rms_norm_eps=dense_config.rms_norm_eps,
            use_cache=dense_config.use_cache,
            pad_token_id=dense_config.pad_token_id,
            bos_token_id=dense_config.bos_token_id,
            eos_token_id=dense_config.eos_token_id,
            tie_word_embeddings=dense_config.tie_word_embeddings,
            rope_parameters=copy.deepcopy(dense_config.rope_parameters),
            attention_dropout=dense_config.attention_dropout,
            num_modalities=num_modalities,
            modality_names=modality_names,
            modality_vocab_ranges=modality_vocab_ranges,
            attn_implementation=dense_config._attn_implementation,
            **untie_flags,
        )
        reference = next(dense_model.parameters())
        model = cls(config).to(device=reference.device, dtype=reference.dtype)

        # Every MoT key is a dense key with a tower index after a ModalityModuleList's name
        # (`...self_attn.q_proj.1.weight` <- `...self_attn.q_proj.weight`).
        tower_lists = {name for name, module in model.named_modules() if isinstance(module, ModalityModuleList)}
        dense_state = dense_model.state_dict()
        state = {}
        for key in model.state_dict():
            parts = key.split(".")
            dense_key = key
            for i in range(1, len(parts) - 1):
                if parts[i].isdigit() and ".".join(parts[:i]) in tower_lists:
                    dense_key = ".".join(parts[:i] + parts[i + 1:])
                    break
            if dense_key not in dense_state:
                raise ValueError(f"`dense_model` has no weight {dense_key!r} for MoT's {key!r}.")
            state[key] = dense_state[dense_key]
        # load_state_dict copies, so the towers start equal but never share storage.
        model.load_state_dict(state, strict=True)
        model.generation_config = copy.deepcopy(dense_model.generation_config)
        return model.train(dense_model.training)


__all__ = [
    "ModalityModuleList",
    "ModalityRouter",
    "MoTCausalLMOutputWithPast",
    "map_blocks",
    "MoTForCausalLM",
    "MoTModel",
    "MoTPreTrainedModel",
    "modality_ids_from_vocab",
    "tower_target_modules",
]
