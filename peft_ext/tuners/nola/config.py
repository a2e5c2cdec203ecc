"""Configuration of NOLA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from peft_ext.registry import add_peft_type
from peft_ext.validation import check_choice, check_dropout, check_positive_int, normalize_module_targets

NOLA = add_peft_type("NOLA")
BASIS_MODES = ("auto", "cached", "chunked")
BIAS_OPTIONS = ("none", "all", "nola_only")


@dataclass
class NolaConfig(PeftConfig):
    """Configuration of a [`NolaModel`]: NOLA, "Compressing LoRA using Linear Combination of Random Basis"
    (Koohpayegani et al., ICLR 2024, https://arxiv.org/abs/2310.02556).

    Each adapted weight gets the LoRA update `ΔW = (nola_alpha / r) · B A` with

        A = A0 + Σ_i a_i A_i / √num_basis_A        (A_i: r × in_features)
        B =      Σ_j b_j B_j / √num_basis_B        (B_j: out_features × r)

    where the bases A_i, B_j are uniform(-1, 1) and A0 is Kaiming-uniform (LoRA's init of its A),
    all frozen and regenerated from `basis_seed`; only the coefficients a (num_basis_A) and
    b (num_basis_B) train. b starts at zero, so ΔW = 0 at insertion while b gets a gradient
    through A0 from the first step (the official code's B0 is the zero matrix, so it is dropped).

    Args:
        r (`int`): rank of the LoRA factors A and B.
        num_basis_A (`int`): k, the number of random bases that A mixes (trainable a's per module).
        num_basis_B (`int`): l, the number of random bases that B mixes (trainable b's per module).
        nola_alpha (`float`): LoRA-style scale; the update is multiplied by `nola_alpha / r`.
        nola_dropout (`float`): dropout on the adapter's input, in [0, 1).
        target_modules (`list[str] | str`): module names (suffix match) or a regex of the modules to adapt;
            `"all-linear"` adapts every linear layer but the output head. Defaults to the attention
            projections peft's LoRA targets for known architectures.
        exclude_modules (`list[str] | str`): modules never to adapt.
        layers_to_transform (`list[int] | int`): only adapt layers with these indices.
        layers_pattern (`list[str] | str`): name of the `nn.ModuleList` holding the layers (e.g. "h", "layers"),
            used with `layers_to_transform`.
        modules_to_save (`list[str]`): other modules trained fully and saved (e.g. a classifier head).
        fan_in_fan_out (`bool`): the target stores its weight as (in, out), as GPT-2's `Conv1D` does; set
            automatically for `Conv1D`.
        bias (`str`): which biases train: "none", "all" or "nola_only" (the adapted modules' biases).
        basis_seed (`int`): defines every basis; bases are a pure function of (basis_seed, module name,
            factor, shape), identical on every device and process. Not stored in the weights file as
            bases: only this integer is.
        init_weights (`bool`): True (default) starts with ΔW = 0 (b = 0, a = 0); False draws non-zero
            coefficients, for tests.
        basis_mode (`str`): how the frozen bases are held. "cached": generated once per layer and kept as
            non-persistent buffers (k·r·(in+out) floats per layer; fastest). "chunked": regenerated in
            groups of 64 bases inside a custom autograd function in every forward and backward, never
            materializing the full basis (memory bounded by one group; for 7B+ models). "auto" (default)
            caches a layer's bases when they take at most `max_cached_basis_mib` and chunks otherwise.
        max_cached_basis_mib (`float`): the per-layer threshold for `basis_mode="auto"`, in MiB of float32.
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoRA factors A and B."})
    num_basis_A: int = field(default=1024, metadata={"help": "Number of random bases mixed into A."})
    num_basis_B: int = field(default=1024, metadata={"help": "Number of random bases mixed into B."})
    nola_alpha: float = field(default=8.0, metadata={"help": "Scale; the update is multiplied by nola_alpha / r."})
    nola_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to adapt, or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer ModuleList."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained fully and saved."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Target stores weight as (in, out) (Conv1D)."})
    bias: Literal["none", "all", "nola_only"] = field(default="none", metadata={"help": "Which biases train."})
    basis_seed: int = field(default=0, metadata={"help": "Seed that defines every random basis."})
    init_weights: bool = field(default=True, metadata={"help": "True: ΔW = 0 at start; False: random coefficients."})
    basis_mode: Literal["auto", "cached", "chunked"] = field(
        default="auto", metadata={"help": "'cached', 'chunked', or 'auto' (by size)."}
    )
    max_cached_basis_mib: float = field(
        default=128.0, metadata={"help": "Per-layer basis size up to which 'auto' caches, in MiB."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = NOLA
        for name in ("r", "num_basis_A", "num_basis_B"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.nola_alpha, (int, float)) or self.nola_alpha <= 0:
            raise ValueError(f"`nola_alpha` must be a positive number, got {self.nola_alpha!r}.")
        check_dropout("nola_dropout", self.nola_dropout)
        check_choice("bias", self.bias, BIAS_OPTIONS)
        check_choice("basis_mode", self.basis_mode, BASIS_MODES)
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int) or not 0 <= self.basis_seed < 2**63:
            raise ValueError(f"`basis_seed` must be an integer in [0, 2**63), got {self.basis_seed!r}.")
        if not self.max_cached_basis_mib > 0:
            raise ValueError(f"`max_cached_basis_mib` must be positive, got {self.max_cached_basis_mib!r}.")
        normalize_module_targets(self)
