"""Configuration of Mixture-of-Transformers models.

This file is copied next to the weights by `save_pretrained` (for `trust_remote_code=True`), so it imports
only transformers, huggingface_hub and the standard library, never `peft_ext`.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

NORM_PLACEMENTS = ("pre", "post_branch")
# The paper's modalities, in its order (text, image, then speech in the three-modality setting).
PAPER_MODALITY_NAMES = ("text", "image", "speech")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@strict
class MoTConfig(PreTrainedConfig):
    r"""Configuration of a Mixture-of-Transformers model: "Mixture-of-Transformers: A Sparse and Scalable
    Architecture for Multi-Modal Foundation Models" (Liang et al., TMLR 2025, https://arxiv.org/abs/2411.04996).

    MoT is a Llama-style decoder in which every non-embedding parameter is untied by modality (paper, Sec. 2.2,
    Algorithm 1): for a token x_i of modality m_i, layer l computes

        a_i = Attn({ (Q_{m_j} x_j, K_{m_j} x_j, V_{m_j} x_j) : j ≤ i })     one causal attention over all tokens
        h_i = x_i + O_{m_i} a_i                                            (with the modality's norms around it)
        y_i = h_i + FFN_{m_i}(h_i)

    The embeddings, the output head and the attention itself (the softmax over the whole interleaved
    sequence) are shared. Routing is fixed by the modality, so there is no router and no balancing loss, and
    a token costs the same FLOPs as in the dense model.

    Llama fields (same meaning and defaults as `LlamaConfig` in transformers 5.23): `vocab_size`,
    `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
    `head_dim`, `hidden_act`, `max_position_embeddings`, `initializer_range`, `rms_norm_eps`, `use_cache`,
    `pad_token_id`, `bos_token_id`, `eos_token_id`, `tie_word_embeddings`, `rope_parameters` (a `rope_theta=`
    keyword is folded into it, as for Llama) and `attention_dropout`. MoT's projections and FFNs have no bias.

    Args:
        num_modalities (`int`): K, the number of modalities (towers per untied module), at least 1.
        modality_names (`list[str]`): one distinct name per modality, used in logs and the model card.
            Defaults to the paper's ("text", "image", "speech") for K ≤ 3, else "modality_0", ...
        modality_vocab_ranges (`list[list[int]]`, *optional*): for each modality, the [start, end) range of its
            token ids, so that the modality of a token (and of every generated token) follows from its id.
            Ranges must lie in [0, vocab_size) and must not overlap; ids outside every range are rejected.
            Without ranges, `modality_ids` must be passed to `forward` (unless K == 1).
        untie_attention (`bool`): per-modality Q/K/V/O projections (True) or shared ones.
        untie_ffn (`bool`): per-modality SwiGLU feed-forward networks (True) or a shared one.
        untie_norms (`bool`): per-modality RMSNorms (True) or shared ones; this includes the QK-norms.
        qk_norm (`bool`): RMSNorm over each head of the queries and keys before RoPE (as Chameleon, which MoT
            builds on, does for stability).
        norm_placement (`str`): "pre" (Llama: h = x + Attn(Norm(x))) or "post_branch" (Chameleon's
            "swin" norm: h = x + Norm(Attn(x)), and likewise around the FFN).
    """

    model_type = "mot"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float | None = 0.0

    num_modalities: int = 2
    # Loosely typed on purpose: the checks in `__post_init__` give errors that name the field and what is
    # allowed, and tuples are accepted and normalized to lists (what JSON gives back).
    modality_names: list | tuple | None = None
    modality_vocab_ranges: list | tuple | None = None
    untie_attention: bool = True
    untie_ffn: bool = True
    untie_norms: bool = True
    qk_norm: bool = False
    norm_placement: str = "pre"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._validate_mot_fields()
        super().__post_init__(**kwargs)

    def _validate_mot_fields(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.attention_dropout is None:
            self.attention_dropout = 0.0
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")

        if not _is_int(self.num_modalities) or self.num_modalities < 1:
            raise ValueError(f"`num_modalities` must be an integer >= 1, got {self.num_modalities!r}.")
        k = self.num_modalities

        if self.modality_names is None:
            self.modality_names = (
                list(PAPER_MODALITY_NAMES[:k]) if k <= len(PAPER_MODALITY_NAMES) else [f"modality_{i}" for i in range(k)]
            )
        names = list(self.modality_names)
        if len(names) != k:
            raise ValueError(
                f"`modality_names` must have one name per modality (num_modalities={k}), got {len(names)}: {names!r}."
            )
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != k:
            raise ValueError(f"`modality_names` must be {k} distinct non-empty strings, got {names!r}.")
        self.modality_names = names

        if self.modality_vocab_ranges is not None:
            self.modality_vocab_ranges = self._checked_vocab_ranges(self.modality_vocab_ranges)

        for name in ("untie_attention", "untie_ffn", "untie_norms", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"`norm_placement` must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}.")

    def _checked_vocab_ranges(self, ranges) -> list[list[int]]:
        k = self.num_modalities
        if not isinstance(ranges, (list, tuple)) or len(ranges) != k:
            raise ValueError(
                f"`modality_vocab_ranges` must be a list of num_modalities={k} [start, end) pairs (or None), "
                f"got {ranges!r}."
            )
        checked = []
        for m, pair in enumerate(ranges):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(_is_int(v) for v in pair)
                or not 0 <= pair[0] < pair[1] <= self.vocab_size
            ):
                raise ValueError(
                    f"`modality_vocab_ranges[{m}]` must be a pair [start, end) of integers with "
                    f"0 <= start < end <= vocab_size={self.vocab_size}, got {pair!r}."
                )
            checked.append([int(pair[0]), int(pair[1])])
        by_start = sorted(range(k), key=lambda m: checked[m][0])
        for a, b in zip(by_start, by_start[1:]):
            if checked[b][0] < checked[a][1]:
                raise ValueError(
                    f"`modality_vocab_ranges` must not overlap: {self.modality_names[a]!r} {checked[a]} and "
                    f"{self.modality_names[b]!r} {checked[b]} share token ids."
                )
        return checked


__all__ = ["MoTConfig"]
