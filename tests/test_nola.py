"""NOLA: math against an independent reference, seed-defined bases, checkpoints, PEFT feature parity."""

import copy
import hashlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

import peft_ext
from peft_ext import NolaConfig
from peft_ext.tuners.nola.layer import BASIS_FORMAT, BASIS_GROUP_SIZE

# --- an independent reference: the paper's formula with bases built from the documented definition ---


def reference_uniform(basis_seed, module_name, factor, shape, num_basis, low=-1.0, high=1.0):
    """Re-derive the bases from their definition: groups of 64, each group from a CPU generator seeded
    with sha256("peft-ext-nola-v1|seed|module|factor|RxC|group")[:8] (little endian, 63 bits)."""
    groups = []
    for group, start in enumerate(range(0, num_basis, BASIS_GROUP_SIZE)):
        n = min(BASIS_GROUP_SIZE, num_basis - start)
        key = f"{BASIS_FORMAT}|{basis_seed}|{module_name}|{factor}|{shape[0]}x{shape[1]}|{group}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        groups.append(torch.empty((n, *shape)).uniform_(low, high, generator=gen))
    return torch.cat(groups)


def reference_delta(layer, module_name, cfg, adapter="default", a0_bound=None):
    """(α/r) · B A in float64, from explicitly built bases; A0 ~ U(-1/√in, 1/√in) unless `a0_bound` is given."""
    r, k, l = cfg.r, cfg.num_basis_A, cfg.num_basis_B
    in_f, out_f = layer.in_features, layer.out_features
    bases_A = reference_uniform(cfg.basis_seed, module_name, "A", (r, in_f), k).double()
    bases_B = reference_uniform(cfg.basis_seed, module_name, "B", (out_f, r), l).double()
    bound = a0_bound if a0_bound is not None else 1 / math.sqrt(in_f)
    A0 = reference_uniform(cfg.basis_seed, module_name, "A0", (r, in_f), 1, -bound, bound)[0].double()
    a = layer.nola_coef_A[adapter].detach().double()
    b = layer.nola_coef_B[adapter].detach().double()
    A = A0 + sum(a[i] * bases_A[i] for i in range(k)) / math.sqrt(k)
    B = sum(b[j] * bases_B[j] for j in range(l)) / math.sqrt(l)
    return (cfg.nola_alpha / r) * (B @ A)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8, bias=False)
        self.relu = nn.ReLU()

    def forward(self, ids):
        return self.lin1(self.relu(self.lin0(self.emb(ids))))


@pytest.mark.parametrize("basis_mode", ["cached", "chunked"])
def test_linear_output_matches_float64_reference(basis_mode):
    torch.manual_seed(0)
    cfg = NolaConfig(r=3, num_basis_A=150, num_basis_B=70, nola_alpha=5, target_modules=["lin0"],
                     init_weights=False, basis_seed=1234, basis_mode=basis_mode)
    model = get_peft_model(MLP(), cfg)
    layer = model.base_model.model.lin0
    x = torch.randn(5, 16)
    delta = reference_delta(layer, "lin0", cfg)
    expected = x.double() @ (layer.base_layer.weight.double() + delta).T + layer.base_layer.bias.double()
    assert delta.abs().max() > 1e-2  # the update is far from zero
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), delta, atol=1e-6, rtol=1e-5)


def test_embedding_and_conv1d_match_reference():
    torch.manual_seed(0)
    cfg = NolaConfig(r=2, num_basis_A=40, num_basis_B=40, target_modules=["emb"], init_weights=False)
    model = get_peft_model(MLP(), cfg)
    layer = model.base_model.model.emb
    ids = torch.tensor([[1, 4, 49, 0]])
    delta = reference_delta(layer, "emb", cfg, a0_bound=math.sqrt(3)).T  # (num_embeddings, dim)
    torch.testing.assert_close(layer(ids).double(), (layer.base_layer.weight.double() + delta)[ids], atol=1e-5, rtol=1e-5)

    gpt = get_peft_model(tiny_gpt2(), NolaConfig(r=2, num_basis_A=30, num_basis_B=30, target_modules=["c_attn"],
                                                 init_weights=False))
    conv = gpt.base_model.model.transformer.h[0].attn.c_attn
    assert conv.fan_in_fan_out
    x = torch.randn(3, 32)
    delta = reference_delta(conv, "transformer.h.0.attn.c_attn", gpt.peft_config["default"])
    expected = x.double() @ (conv.base_layer.weight.double() + delta.T) + conv.base_layer.bias.double()
    torch.testing.assert_close(conv(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_init_is_identity_and_trainable_count(input_ids):
    base = tiny_llama()
    expected = base(input_ids).logits
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=8, num_basis_A=1024, num_basis_B=1024,
                                                           target_modules=["q_proj", "v_proj"]))
    assert torch.equal(model(input_ids).logits, expected)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * 1024 * 4  # 2 layers × (q_proj, v_proj)
    # b = 0 but A0 ≠ 0: the gradient of b is non-zero at step 0, that of a is zero
    model(input_ids).logits.sum().backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.nola_coef_B["default"].grad.abs().sum() > 0
    assert layer.nola_coef_A["default"].grad.abs().sum() == 0


def test_bases_never_touch_the_global_rng():
    torch.manual_seed(3)
    base = MLP()
    torch.manual_seed(11)
    model = get_peft_model(base, NolaConfig(r=2, num_basis_A=100, num_basis_B=100, target_modules=["lin0", "lin1"],
                                            basis_mode="chunked"))
    model(torch.tensor([[1, 2]])).sum().backward()  # regenerates bases in forward and backward
    after_nola = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(after_nola, torch.rand(4))


def test_bases_identical_in_another_process_and_depend_on_name_seed_and_shape():
    from peft_ext.tuners.nola import BasisSpec

    spec = BasisSpec(5, "model.layers.0.q_proj", "A", (4, 16), 100)
    code = ("from peft_ext.tuners.nola import BasisSpec;import hashlib;"
            "t=BasisSpec(5,'model.layers.0.q_proj','A',(4,16),100).full();"
            "print(hashlib.sha256(t.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256(spec.full().numpy().tobytes()).hexdigest()
    reference = reference_uniform(5, "model.layers.0.q_proj", "A", (4, 16), 100)
    assert torch.equal(spec.full(), reference)
    for other in (BasisSpec(6, spec.module_name, "A", (4, 16), 100), BasisSpec(5, "model.layers.1.q_proj", "A", (4, 16), 100),
                  BasisSpec(5, spec.module_name, "B", (4, 16), 100)):
        assert not torch.equal(other.full(), spec.full())
    assert spec.full().min() >= -1 and spec.full().max() <= 1


def test_cached_and_chunked_agree_in_outputs_and_gradients(input_ids):
    base = tiny_llama()
    models = {}
    for mode in ("cached", "chunked"):
        torch.manual_seed(0)
        models[mode] = get_peft_model(copy.deepcopy(base), NolaConfig(r=4, num_basis_A=130, num_basis_B=200,
                                                                      init_weights=False, basis_mode=mode))
    cached, chunked = models["cached"], models["chunked"]
    layer = chunked.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" not in layer.nola_basis_A and "default" in cached.base_model.model.model.layers[0].self_attn.q_proj.nola_basis_A
    out_cached, out_chunked = cached(input_ids).logits, chunked(input_ids).logits
    torch.testing.assert_close(out_cached, out_chunked, atol=1e-5, rtol=1e-5)
    out_cached.square().mean().backward()
    out_chunked.square().mean().backward()
    for (name, p), (_, q) in zip(cached.named_parameters(), chunked.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_seeded_buffers_stay_float32_through_dtype_casts(input_ids):
    model = get_peft_model(tiny_llama(), NolaConfig(r=2, num_basis_A=20, num_basis_B=20, init_weights=False))
    expected = model(input_ids).logits
    model = model.to(torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.nola_basis_A["default"].dtype == layer.nola_A0["default"].dtype == torch.float32
    torch.testing.assert_close(model(input_ids).logits.float(), expected, atol=0.1, rtol=0.05)


def test_low_cpu_mem_usage_loading(tmp_path, input_ids):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=2, num_basis_A=20, num_basis_B=20, init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_auto_mode_picks_by_size():
    model = get_peft_model(MLP(), NolaConfig(r=2, num_basis_A=64, num_basis_B=64, target_modules=["lin0"],
                                             max_cached_basis_mib=0.01))
    assert "default" not in model.base_model.model.lin0.nola_basis_A  # 64·2·(16+24)·4 B = 20 KiB > 10 KiB
    model = get_peft_model(MLP(), NolaConfig(r=2, num_basis_A=64, num_basis_B=64, target_modules=["lin0"]))
    assert "default" in model.base_model.model.lin0.nola_basis_A


def test_checkpoint_holds_coefficients_only(tmp_path, input_ids):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=8, num_basis_A=1024, num_basis_B=1024,
                                                           init_weights=False, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    trainable, _ = model.get_nb_trainable_parameters()
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert abs(size - 4 * trainable) <= 16 * 1024
    state = get_peft_model_state_dict(model)
    assert all("nola_coef_" in k or k.endswith("nola_basis_seed") for k in state)
    assert not any("basis_A" in k or "A0" in k for k in state)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_loading_with_another_seed_warns(tmp_path):
    model = get_peft_model(MLP(), NolaConfig(r=2, num_basis_A=10, num_basis_B=10, target_modules=["lin0"],
                                             init_weights=False, basis_seed=1))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="basis_seed=1 but is loaded into a config with basis_seed=2"):
        PeftModel.from_pretrained(MLP(), tmp_path, config=NolaConfig(r=2, num_basis_A=10, num_basis_B=10,
                                                                     target_modules=["lin0"], basis_seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(MLP(), tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "`r` must be a positive integer, got 0"),
        ({"num_basis_A": -1}, "`num_basis_A` must be a positive integer"),
        ({"num_basis_B": 2.5}, "`num_basis_B` must be a positive integer"),
        ({"nola_alpha": 0}, "`nola_alpha` must be a positive number"),
        ({"nola_dropout": 1.0}, r"`nola_dropout` must be in \[0, 1\)"),
        ({"bias": "some"}, r"`bias` must be one of \('none', 'all', 'nola_only'\)"),
        ({"basis_mode": "lazy"}, r"`basis_mode` must be one of \('auto', 'cached', 'chunked'\)"),
        ({"basis_seed": -3}, r"`basis_seed` must be an integer in \[0, 2\*\*63\)"),
        ({"max_cached_basis_mib": 0}, "`max_cached_basis_mib` must be positive"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NolaConfig(**kwargs)


def test_unsupported_layer_type_names_module_and_type():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    with pytest.raises(TypeError, match="NOLA cannot adapt module 'conv' of type Conv2d"):
        get_peft_model(WithConv(), NolaConfig(target_modules=["conv"]))


def test_multiple_adapters_set_disable_delete(input_ids):
    base = tiny_llama()
    expected = base(input_ids).logits
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=2, num_basis_A=20, num_basis_B=20, init_weights=False))
    model.add_adapter("other", NolaConfig(r=4, num_basis_A=30, num_basis_B=10, init_weights=False, basis_seed=9))
    out_default = model(input_ids).logits
    model.set_adapter("other")
    out_other = model(input_ids).logits
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_other, expected)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.nola_coef_A["other"].requires_grad and not layer.nola_coef_A["default"].requires_grad
    with model.disable_adapter():
        assert torch.equal(model(input_ids).logits, expected)
    model.delete_adapter("other")
    assert "other" not in layer.nola_coef_A and "other" not in layer.nola_basis_A and "other" not in layer.nola_A0
    model.set_adapter("default")
    assert torch.equal(model(input_ids).logits, out_default)


def test_merge_unmerge_safe_merge_unload(input_ids):
    base = tiny_llama()
    expected_base = base(input_ids).logits
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=4, num_basis_A=50, num_basis_B=50, init_weights=False,
                                                           target_modules=["q_proj", "v_proj", "embed_tokens"]))
    adapted = model(input_ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-5, rtol=1e-5)
    model.base_model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(hasattr(m, "nola_coef_A") for m in merged.modules())
    torch.testing.assert_close(merged(input_ids).logits, adapted, atol=1e-5, rtol=1e-5)
    unloaded = model.unload()
    torch.testing.assert_close(unloaded(input_ids).logits, expected_base, atol=1e-6, rtol=1e-6)


def test_inject_adapter_in_model_and_transformers_load_adapter(tmp_path, input_ids):
    base = tiny_llama()
    cfg = NolaConfig(r=2, num_basis_A=20, num_basis_B=20, init_weights=False)
    injected = inject_adapter_in_model(cfg, copy.deepcopy(base))
    assert isinstance(injected.model.layers[0].self_attn.q_proj, peft_ext.tuners.nola.Linear)

    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path), adapter_name="nola")
    assert torch.equal(plain(input_ids).logits, expected)


def test_auto_peft_model_loads_from_folder(tmp_path, input_ids):
    from peft import AutoPeftModelForCausalLM

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), NolaConfig(r=2, num_basis_A=20, num_basis_B=20, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_trainer_with_gradient_checkpointing(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    base.config.use_cache = False
    model = get_peft_model(base, NolaConfig(r=4, num_basis_A=64, num_basis_B=64, basis_mode="chunked"))
    ids = torch.randint(1, 100, (16, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
                             activation_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("nola_coef_" in n for n in changed)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_layers_on_cpu(bits, input_ids):
    bnb = pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    quantized = copy.deepcopy(base)
    layer = quantized.model.layers[0].self_attn.q_proj
    if bits == 8:
        qlayer = bnb.nn.Linear8bitLt(32, 32, bias=False, has_fp16_weights=False)
        qlayer.load_state_dict({"weight": layer.weight.data})
    else:
        qlayer = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        qlayer.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
    quantized.model.layers[0].self_attn.q_proj = qlayer.to("cpu")
    quant_out = quantized(input_ids).logits
    model = get_peft_model(quantized, NolaConfig(r=2, num_basis_A=20, num_basis_B=20, target_modules=["q_proj"],
                                                 init_weights=False))
    nola_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(nola_layer, peft_ext.tuners.nola.Linear)
    assert isinstance(nola_layer.base_layer, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    adapted = model(input_ids).logits
    assert not torch.allclose(adapted, quant_out)
    adapted.sum().backward()
    assert nola_layer.nola_coef_B["default"].grad.abs().sum() > 0
    # the adapter adds exactly its float update to the quantized layer's output
    x = torch.randn(2, 32)
    delta = nola_layer.get_delta_weight("default")
    torch.testing.assert_close(nola_layer(x), nola_layer.base_layer(x) + x @ delta.T, atol=1e-4, rtol=1e-4)


def test_model_card_written_on_save(tmp_path):
    from huggingface_hub import ModelCard

    model = get_peft_model(tiny_gpt2(), NolaConfig(r=2, num_basis_A=10, num_basis_B=10, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert "nola" in card.data.tags and "arxiv:2310.02556" in card.data.tags
    assert "import peft_ext" in card.text
    assert "| `num_basis_A` | `10` |" in card.text


def test_example_docstring_usage_runs():
    # the snippet in the issue: 2 · 1024 trainable numbers per adapted module
    model = get_peft_model(tiny_llama(), NolaConfig(r=8, num_basis_A=1024, num_basis_B=1024, nola_alpha=8,
                                                    target_modules=["q_proj", "v_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 1024
    assert os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1")
