"""NOLA layers: LoRA factors built as linear combinations of seeded random bases.

For an adapted weight W (out × in) the layer computes, following the paper's Eq. (2)-(3),

    y = W x + (α / r) · B A dropout(x)
    A = A0 + Σ_{i<k} a_i A_i / √k        A_i ~ U(-1, 1)^{r × in},  A0 ~ U(-1/√in, 1/√in) (LoRA's Kaiming init)
    B =      Σ_{j<l} b_j B_j / √l        B_j ~ U(-1, 1)^{out × r}

(for embeddings A0 ~ U(-√3, √3), see `Embedding`). Only a (k numbers) and b (l numbers) train. Every frozen tensor (A_i, B_j, A0) is a pure function of
(basis_seed, module name, factor, shape): it is drawn in groups of `BASIS_GROUP_SIZE` bases, each
group from its own `torch.Generator` on the CPU seeded with a hash of those values. So the bases
are bit-identical on every device and process, can be regenerated one group at a time, and
never touch the global RNG (the official code reseeds it, which changes dropout).

Departures from the official code (UCDvision/NOLA), all deliberate:
- no B0: the official B0 is a frozen zero matrix, so it is omitted rather than stored;
- bases come from per-group CPU generators instead of `torch.manual_seed` on the parameter's device,
  so an adapter trained on a GPU reloads with the same bases on a CPU;
- merging uses the trained coefficients (the official LLaMA merge adds B0 @ A0 = 0).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from peft_ext.validation import base_layer_features

from .config import NolaConfig

# Part of the basis definition: changing either changes every basis, so both are constants.
BASIS_GROUP_SIZE = 64
BASIS_FORMAT = "peft-ext-nola-v1"


@dataclass(frozen=True)
class BasisSpec:
    """The random tensors of one factor of one module: `num_basis` matrices of `shape`."""

    basis_seed: int
    module_name: str
    factor: str  # "A", "B" or "A0"
    shape: tuple[int, int]
    num_basis: int

    @property
    def num_elements(self) -> int:
        return self.num_basis * self.shape[0] * self.shape[1]

    def _generator(self, group: int) -> torch.Generator:
        key = f"{BASIS_FORMAT}|{self.basis_seed}|{self.module_name}|{self.factor}|{self.shape[0]}x{self.shape[1]}|{group}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
        return torch.Generator(device="cpu").manual_seed(seed)

    def group_bounds(self) -> list[tuple[int, int]]:
        return [(s, min(s + BASIS_GROUP_SIZE, self.num_basis)) for s in range(0, self.num_basis, BASIS_GROUP_SIZE)]

    def group(self, index: int) -> torch.Tensor:
        """Bases [index·G, (index+1)·G) as a float32 CPU tensor of shape (n, *shape), values in U(-1, 1)."""
        start, stop = self.group_bounds()[index]
        out = torch.empty((stop - start, *self.shape), dtype=torch.float32)
        return out.uniform_(-1.0, 1.0, generator=self._generator(index))

    def full(self) -> torch.Tensor:
        return torch.cat([self.group(i) for i in range(len(self.group_bounds()))])

    def uniform_matrix(self, bound: float) -> torch.Tensor:
        """One U(-bound, bound) matrix of `shape` from this spec's seed (used for A0)."""
        out = torch.empty(self.shape, dtype=torch.float32)
        return out.uniform_(-bound, bound, generator=self._generator(0))


class _ChunkedBasisCombination(torch.autograd.Function):
    """Σ_i c_i basis_i / √k without ever holding more than one group of bases in memory.

    The forward and the backward each regenerate the groups from their seeds; the backward
    needs ∂L/∂c_i = <∂L/∂out, basis_i> / √k and nothing else.
    """

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, spec: BasisSpec) -> torch.Tensor:
        ctx.spec = spec
        out = torch.zeros(spec.shape, dtype=torch.float32, device=coefficients.device)
        coefficients = coefficients.float()
        for index, (start, stop) in enumerate(spec.group_bounds()):
            basis = spec.group(index).to(coefficients.device, non_blocking=True)
            out += torch.tensordot(coefficients[start:stop], basis, dims=1)
        return out / math.sqrt(spec.num_basis)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        spec = ctx.spec
        grad_flat = grad_out.float().reshape(-1)
        grad = torch.empty(spec.num_basis, dtype=torch.float32, device=grad_out.device)
        for index, (start, stop) in enumerate(spec.group_bounds()):
            basis = spec.group(index).to(grad_out.device, non_blocking=True)
            grad[start:stop] = basis.reshape(stop - start, -1) @ grad_flat
        return grad / math.sqrt(spec.num_basis), None


def combine_bases(coefficients: torch.Tensor, spec: BasisSpec, cached_basis: torch.Tensor | None) -> torch.Tensor:
    """The float32 factor Σ_i c_i basis_i / √k, from the cached bases if given, else chunk by chunk."""
    if cached_basis is None:
        return _ChunkedBasisCombination.apply(coefficients, spec)
    return torch.tensordot(coefficients.float(), cached_basis, dims=1) / math.sqrt(spec.num_basis)


class SeededBufferDict(BufferDict):
    """Non-persistent buffers for seed-defined tensors: they follow device moves but keep float32 through
    `model.half()` / `model.to(torch.bfloat16)`, since they define the method, not its precision."""

    def __init__(self):
        super().__init__({}, persistent=False)

    def _apply(self, fn, recurse=True):
        for key, buffer in self._buffers.items():
            moved = fn(buffer)
            self._buffers[key] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self


class NolaLayer(BaseTunerLayer):
    adapter_layer_names = ("nola_coef_A", "nola_coef_B")
    other_param_names = ("r", "scaling", "nola_dropout", "basis_specs", "nola_A0", "nola_basis_A", "nola_basis_B")
    # Frozen, seed-defined tensors: kept in float32 whatever the base layer's dtype, never saved.
    _seeded_buffer_names = ("nola_A0", "nola_basis_A", "nola_basis_B")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.basis_specs: dict[str, tuple[BasisSpec, BasisSpec]] = {}
        self.nola_dropout = nn.ModuleDict({})
        self.nola_coef_A = nn.ParameterDict({})
        self.nola_coef_B = nn.ParameterDict({})
        self.nola_A0 = SeededBufferDict()
        self.nola_basis_A = SeededBufferDict()
        self.nola_basis_B = SeededBufferDict()
        self._disable_adapters = False
        self.merged_adapters = []

        self.in_features, self.out_features = base_layer_features(self, "NOLA")
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: NolaConfig, module_name: str, inference_mode: bool = False,
                     **kwargs) -> None:
        r, k, l = config.r, config.num_basis_A, config.num_basis_B
        spec_A = BasisSpec(config.basis_seed, module_name, "A", (r, self.in_features), k)
        spec_B = BasisSpec(config.basis_seed, module_name, "B", (self.out_features, r), l)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.nola_alpha / r
        self.basis_specs[adapter_name] = (spec_A, spec_B)
        self.nola_dropout[adapter_name] = nn.Dropout(config.nola_dropout) if config.nola_dropout > 0 else nn.Identity()
        self.nola_coef_A[adapter_name] = nn.Parameter(torch.zeros(k))
        self.nola_coef_B[adapter_name] = nn.Parameter(torch.zeros(l))
        a0_spec = BasisSpec(config.basis_seed, module_name, "A0", (r, self.in_features), 1)
        self.nola_A0[adapter_name] = a0_spec.uniform_matrix(self.a0_bound)

        basis_mib = 4 * (spec_A.num_elements + spec_B.num_elements) / 2**20
        cache = config.basis_mode == "cached" or (config.basis_mode == "auto" and basis_mib <= config.max_cached_basis_mib)
        if cache:
            self.nola_basis_A[adapter_name] = spec_A.full()
            self.nola_basis_B[adapter_name] = spec_B.full()

        if not config.init_weights:
            # Non-zero coefficients, drawn from the global RNG like other PEFT methods' test inits.
            with torch.no_grad():
                self.nola_coef_A[adapter_name].normal_(0.0, 0.5)
                self.nola_coef_B[adapter_name].normal_(0.0, 0.5)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # The base class would cast the seeded buffers to a half-precision base dtype, and move them to the
        # meta device under low_cpu_mem_usage loading (where nothing would refill them): handle them here.
        seeded = {name: getattr(self, name).pop(adapter_name) for name in self._seeded_buffer_names
                  if adapter_name in getattr(self, name)}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if device is None:
            device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        for name, tensor in seeded.items():
            getattr(self, name)[adapter_name] = tensor if device is None or device.type == "meta" else tensor.to(device)

    def nola_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 LoRA factors (A: r × in, B: out × r) of an adapter, differentiable in a and b."""
        spec_A, spec_B = self.basis_specs[adapter_name]
        cached = adapter_name in self.nola_basis_A
        A = self.nola_A0[adapter_name] + combine_bases(
            self.nola_coef_A[adapter_name], spec_A, self.nola_basis_A[adapter_name] if cached else None
        )
        B = combine_bases(self.nola_coef_B[adapter_name], spec_B, self.nola_basis_B[adapter_name] if cached else None)
        return A, B

    def _delta_weight_out_in(self, adapter_name: str) -> torch.Tensor:
        A, B = self.nola_factors(adapter_name)
        return (B @ A) * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.nola_coef_A:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter_name).to(weight.dtype)
            if safe_merge:
                merged = weight.clone() + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
                self.set_base_weight(merged)
            else:
                weight += delta
                self.set_base_weight(weight)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.nola_coef_A:
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(adapter_name).to(weight.dtype)
                self.set_base_weight(weight)

    def _base_output(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, bool]:
        """The base layer's output, and whether the (unmerged, enabled) adapters still have to be added to it."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs), not (self.disable_adapters or self.merged)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)


class Linear(nn.Module, NolaLayer):
    """NOLA on `nn.Linear`, GPT-2's `Conv1D` (fan_in_fan_out) and bitsandbytes 8/4-bit linear layers."""

    @property
    def a0_bound(self) -> float:
        # what nn.init.kaiming_uniform_(a=√5) gives LoRA's A: bound 1/√fan_in
        return 1.0 / math.sqrt(self.in_features)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, module_name: str,
                 is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__()
        NolaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the layout of the base weight ((in, out) for Conv1D)."""
        return transpose(self._delta_weight_out_in(adapter_name), self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        previous_dtype = x.dtype
        result, add_adapters = self._base_output(x, *args, **kwargs)
        if not add_adapters:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in self.active_adapters:
            if adapter_name not in self.nola_coef_A:
                continue
            A, B = self.nola_factors(adapter_name)
            compute_dtype = self.nola_coef_A[adapter_name].dtype
            x_in = self._cast_input_dtype(self.nola_dropout[adapter_name](x), compute_dtype)
            update = F.linear(F.linear(x_in, A.to(compute_dtype)), B.to(compute_dtype))
            result = result + (update * self.scaling[adapter_name]).to(result.dtype)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "nola." + super().__repr__()


class Embedding(nn.Module, NolaLayer):
    """NOLA on `nn.Embedding`: ΔW (num_embeddings × dim) = (α/r) · (B A)ᵀ, A: r × num_embeddings, B: dim × r.

    As for LoRA embeddings, `nola_dropout` does not apply: the input is token ids. A lookup reads one column
    of A rather than a weighted sum of in_features of them, so A0 has unit variance (U(-√3, √3)), the scale
    of LoRA's random embedding factor, instead of the 1/√fan_in bound of linear layers.
    """

    a0_bound = math.sqrt(3.0)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, module_name: str, **kwargs) -> None:
        super().__init__()
        NolaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta_weight_out_in(adapter_name).T

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result, add_adapters = self._base_output(x, *args, **kwargs)
        if not add_adapters:
            return result
        base = self.get_base_layer()
        embed_scale = self._get_embed_scale()
        for adapter_name in self.active_adapters:
            if adapter_name not in self.nola_coef_A:
                continue
            A, B = self.nola_factors(adapter_name)
            after_A = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)
            update = (after_A @ B.T) * self.scaling[adapter_name]
            if embed_scale is not None:
                update = update * embed_scale.to(update.dtype)
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "nola." + super().__repr__()
