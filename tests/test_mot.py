"""Mixture-of-Transformers: equivalence with Llama, upcycling, routing, generation, saving and loading."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark, tiny_llama
from huggingface_hub import ModelCard
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import peft_ext
from peft_ext import MoTConfig, MoTForCausalLM, MoTModel
from peft_ext.models.mot import ModalityModuleList, MoTCausalLMOutputWithPast

TWO_RANGES = [[0, 50], [50, 100]]
THREE_RANGES = [[0, 40], [40, 80], [80, 100]]


def mot_config(**overrides) -> MoTConfig:
    """The tiny MoT of these tests: tiny_llama's sizes (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 100)."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  num_modalities=2, modality_vocab_ranges=TWO_RANGES)
    kwargs.update(overrides)
    return MoTConfig(**kwargs)


def tiny_mot(seed: int = 0, **overrides) -> MoTForCausalLM:
    torch.manual_seed(seed)
    return MoTForCausalLM(mot_config(**overrides)).eval()


def random_mix(num_modalities: int, shape=(2, 8), seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, num_modalities, shape, generator=torch.Generator().manual_seed(seed))
    ids[0, :num_modalities] = torch.arange(num_modalities)  # every modality present
    return ids


def tower_parameters(model: nn.Module, modality: int) -> dict[str, torch.Tensor]:
    """The parameters of tower `modality` of every untied module."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ModalityModuleList) and module.is_untied:
            out.update({f"{name}.{modality}.{p}": t for p, t in module[modality].named_parameters()})
    return out


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: loaded weights live at other memory alignments than freshly built ones, and
    the CPU GEMM kernels may sum in another order for them (cloning the loaded weights gives bit-identical
    logits). The tests that use this also check that the weights themselves are bit-identical."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def assert_same_weights(got: nn.Module, expected: nn.Module) -> None:
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def llama_state_as_single_tower(state: dict) -> dict:
    """LlamaForCausalLM keys -> MoT keys with one tower (index 0) per untied module."""
    towers = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "input_layernorm", "post_attention_layernorm")
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            i = next(i for i, p in enumerate(parts) if p in towers)
            parts.insert(i + 1, "0")
        elif key == "model.norm.weight":
            parts.insert(2, "0")
        out[".".join(parts)] = value
    return out


# -- (1) one modality is Llama --------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_single_modality_equals_llama(attn_implementation, input_ids):
    llama = tiny_llama()
    llama.set_attn_implementation(attn_implementation)
    mot = MoTForCausalLM(mot_config(num_modalities=1, modality_vocab_ranges=None,
                                    attn_implementation=attn_implementation)).eval()
    assert mot.config._attn_implementation == attn_implementation
    mot.load_state_dict(llama_state_as_single_tower(llama.state_dict()), strict=True)

    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, so the mask path is covered
    output_attentions = attn_implementation == "eager"
    with torch.no_grad():
        expected = llama(input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         output_attentions=output_attentions)
        got = mot(input_ids, attention_mask=attention_mask, output_hidden_states=True,
                  output_attentions=output_attentions)
    assert isinstance(got, MoTCausalLMOutputWithPast)
    assert (got.logits - expected.logits).abs().max() <= 1e-5
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert (a - b).abs().max() <= 1e-5
    if output_attentions:
        for a, b in zip(got.attentions, expected.attentions):
            assert (a - b).abs().max() <= 1e-5


# -- (2) upcycling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_modalities,untie", [(2, {}), (3, {}), (3, {"untie_norms": False, "untie_ffn": False})])
def test_from_dense_equals_dense_for_any_mix(num_modalities, untie, input_ids):
    dense = tiny_llama()
    mot = MoTForCausalLM.from_dense(dense, num_modalities, **untie)
    assert mot.config.num_modalities == num_modalities
    assert len(mot.model.layers[0].self_attn.q_proj) == num_modalities
    assert len(mot.model.layers[0].mlp) == (1 if "untie_ffn" in untie else num_modalities)
    # Towers are copies, not views of one tensor: training one must not move the others.
    q = mot.model.layers[0].self_attn.q_proj
    assert q[0].weight.data_ptr() != q[1].weight.data_ptr()
    torch.testing.assert_close(q[1].weight, dense.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)

    with torch.no_grad():
        expected = dense(input_ids).logits
        for seed in range(3):
            got = mot(input_ids, modality_ids=random_mix(num_modalities, input_ids.shape, seed)).logits
            assert (got - expected).abs().max() <= 1e-5


def test_from_dense_with_vocab_ranges_and_bad_flags(input_ids):
    dense = tiny_llama()
    mot = MoTForCausalLM.from_dense(dense, 2, modality_names=["text", "image"], modality_vocab_ranges=TWO_RANGES)
    with torch.no_grad():
        assert (mot(input_ids).logits - dense(input_ids).logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="untie flags"):
        MoTForCausalLM.from_dense(dense, 2, qk_norm=True)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        MoTForCausalLM.from_dense(dense.model, 2)


def test_upcycled_tower_gradients_sum_to_the_dense_gradient(input_ids):
    # The towers start as copies of the dense weights, so d loss / d W_dense = sum over towers of d loss / d W_m:
    # checks the backward of the routing (gather, per-tower matmuls, scatter) end to end.
    dense = tiny_llama()
    mot = MoTForCausalLM.from_dense(dense, 3)
    modality_ids = random_mix(3, input_ids.shape, seed=5)
    dense(input_ids, labels=input_ids).loss.backward()
    mot(input_ids, labels=input_ids, modality_ids=modality_ids).loss.backward()
    dense_grads = dict(dense.named_parameters())
    for name, module in mot.named_modules():
        if isinstance(module, ModalityModuleList):
            for param_name, _ in module[0].named_parameters():
                total = sum(tower.get_parameter(param_name).grad for tower in module)
                expected = dense_grads[f"{name}.{param_name}"].grad
                torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mot.model.embed_tokens.weight.grad, dense.model.embed_tokens.weight.grad,
                               rtol=1e-4, atol=1e-6)


# -- (3) gradient isolation -----------------------------------------------------------------------------------


def test_gradients_stay_in_the_towers_of_the_batch_modalities():
    model = tiny_mot(qk_norm=True).train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))  # text only: modality 0
    model(ids, labels=ids).loss.backward()

    unused = tower_parameters(model, 1)
    used = tower_parameters(model, 0)
    assert unused and len(unused) == len(used)
    for name, param in unused.items():
        assert param.grad is None or not param.grad.any(), name
    for name, param in used.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The shared parameters learn from every modality.
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = tiny_mot().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


# -- (4) routing ----------------------------------------------------------------------------------------------


def test_each_tower_runs_once_per_layer_on_its_tokens_only():
    model = tiny_mot(num_modalities=3, modality_vocab_ranges=None, qk_norm=True)
    modality_ids = random_mix(3, (2, 8), seed=3)
    expected_rows = torch.bincount(modality_ids.flatten(), minlength=3).tolist()
    assert all(expected_rows)

    seen: dict[str, list[tuple[int, int]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ModalityModuleList):
            for m, tower in enumerate(module):
                for sub_name, sub in tower.named_modules():
                    if isinstance(sub, (nn.Linear, type(tower))) and not list(sub.children()):
                        key = f"{name}.{m}.{sub_name}".rstrip(".")

                        def hook(mod, args, output, key=key, m=m):
                            seen.setdefault(key, []).append((m, args[0].shape[0]))

                        handles.append(sub.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 8)), modality_ids=modality_ids)
    for handle in handles:
        handle.remove()

    # q/k/v/o, q/k-norm, gate/up/down, two norms per layer and the final norm: every tower leaf ran once.
    assert len(seen) == 3 * (2 * (4 + 2 + 3 + 2) + 1)
    for key, calls in seen.items():
        assert len(calls) == 1, key
        modality, rows = calls[0]
        assert rows == expected_rows[modality], key


def test_each_projection_runs_one_matmul_per_tower():
    """Every projection runs one matmul per tower, on that tower's tokens only (7 per tower and layer: Q, K, V, O,
    gate, up, down; plus the head), as Llama runs them: no concatenated weights, no split outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                CountMatmuls.rows.append(args[-2].shape[0])
            return func(*args, **(kwargs or {}))

    model = tiny_mot(num_modalities=3, modality_vocab_ranges=None).train()
    input_ids, modality_ids = torch.randint(0, 100, (2, 8)), random_mix(3, (2, 8), seed=3)
    with CountMatmuls():
        model(input_ids, modality_ids=modality_ids)
    counts = torch.bincount(modality_ids.flatten(), minlength=3).tolist()
    assert sorted(CountMatmuls.rows) == sorted([n for n in counts for _ in range(2 * 7)] + [16])


def test_router_groups_and_restores_the_order():
    modality_ids = torch.tensor([[1, 0, 2, 1], [0, 0, 2, 1]])
    router = peft_ext.models.mot.ModalityRouter(modality_ids, 3)
    x = torch.arange(8.0).reshape(2, 4, 1)
    blocks = router.dispatch(x)
    assert router.counts == [3, 3, 2]
    assert [block.flatten().tolist() for block in blocks] == [[1, 4, 5], [0, 3, 7], [2, 6]]
    assert torch.equal(router.combine(blocks), x)
    single = peft_ext.models.mot.ModalityRouter(torch.ones(2, 4, dtype=torch.long), 3)
    blocks = single.dispatch(x)
    assert single.order is None and blocks[0] is None and blocks[2] is None
    assert blocks[1].data_ptr() == x.data_ptr() and single.combine(blocks).data_ptr() == x.data_ptr()  # nothing moves


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"qk_norm": True, "norm_placement": "post_branch"}])
def test_routed_model_equals_every_tower_on_every_token(overrides, monkeypatch):
    model = tiny_mot(num_modalities=3, modality_vocab_ranges=None, **overrides).train()
    with torch.no_grad():  # norms that differ per tower, so that a norm applied to the wrong rows shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    input_ids, modality_ids = torch.randint(0, 100, (2, 8)), random_mix(3, (2, 8), seed=4)
    routed = model(input_ids, modality_ids=modality_ids)
    routed.logits.square().mean().backward()
    routed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # The reference: every tower on every token, each token keeping its own tower's output (the benchmark's naive MoT).
    monkeypatch.setattr(peft_ext.models.mot.modeling_mot, "ModalityRouter", load_benchmark("mot").NaiveAllTowersRouter)
    reference = model(input_ids, modality_ids=modality_ids)
    reference.logits.square().mean().backward()
    torch.testing.assert_close(routed.logits, reference.logits, rtol=0, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(routed_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


# -- (5) generation -------------------------------------------------------------------------------------------


def test_generate_with_and_without_cache_agree():
    model = tiny_mot()
    prompt = torch.tensor([[3, 55, 7, 60, 12], [70, 2, 81, 4, 9]])
    outputs = {}
    for use_cache in (True, False):
        outputs[use_cache] = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                                            pad_token_id=0)
    assert outputs[True].shape == (2, 13)
    assert torch.equal(outputs[True], outputs[False])

    # Prompt modalities given explicitly (here not those of the vocabulary): the generated tokens still take
    # theirs from their ids, with and without the cache.
    prompt_modalities = torch.ones_like(prompt)
    with_ids = {
        use_cache: model.generate(prompt, modality_ids=prompt_modalities, max_new_tokens=8, do_sample=False,
                                  use_cache=use_cache, pad_token_id=0)
        for use_cache in (True, False)
    }
    assert torch.equal(with_ids[True], with_ids[False])
    # Greedy by hand with the same rule gives the same tokens.
    sequence = prompt
    for _ in range(8):
        derived = peft_ext.models.mot.modeling_mot.modality_ids_from_vocab(sequence[:, prompt.shape[1]:], model.config)
        modalities = torch.cat([prompt_modalities, derived], dim=1)
        with torch.no_grad():
            next_token = model(sequence, modality_ids=modalities).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(with_ids[True], sequence)


# -- (6) save / load ------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_card(tmp_path, input_ids):
    model = tiny_mot(modality_names=["text", "image"], qk_norm=True)
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md", "configuration_mot.py", "modeling_mot.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert "mot" in card.data.tags and card.data.pipeline_tag == "text-generation"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mot" and saved["modality_vocab_ranges"] == TWO_RANGES
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mot.MoTForCausalLM"

    with torch.no_grad():
        expected = model(input_ids).logits
        loaded = MoTForCausalLM.from_pretrained(tmp_path).eval()
        assert_same_weights(loaded, model)
        assert_same_logits(loaded(input_ids).logits, expected)
        auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(auto) is MoTForCausalLM  # the registered class, not a remote-code copy
        assert_same_weights(auto, model)
        assert_same_logits(auto(input_ids).logits, expected)
    assert auto.config.modality_names == ["text", "image"] and auto.config.qk_norm


def test_auto_classes_build_from_config():
    config = mot_config()
    assert type(AutoModelForCausalLM.from_config(config)) is MoTForCausalLM
    from transformers import AutoConfig, AutoModel

    assert type(AutoModel.from_config(config)) is MoTModel
    assert type(AutoConfig.for_model("mot", num_modalities=1)) is MoTConfig


# -- (7) the Hub ----------------------------------------------------------------------------------------------


def test_push_to_hub_and_load(hub, input_ids):
    model = tiny_mot(seed=1)
    model.push_to_hub("tester/tiny-mot")
    stored = hub.repos["tester/tiny-mot"][-1].files
    assert {"config.json", "model.safetensors", "README.md", "modeling_mot.py"} <= stored.keys()
    readme = stored["README.md"].decode()
    assert "tester/tiny-mot" in readme and "- mot" in readme and "library_name: transformers" in readme

    loaded = AutoModelForCausalLM.from_pretrained("tester/tiny-mot").eval()
    assert type(loaded) is MoTForCausalLM
    assert_same_weights(loaded, model)
    with torch.no_grad():
        assert_same_logits(loaded(input_ids).logits, model(input_ids).logits)
        # A differently seeded model must differ, or the equality above proves nothing.
        assert (tiny_mot(seed=2)(input_ids).logits - model(input_ids).logits).abs().max() > 1e-2


# -- (8) trust_remote_code without peft-ext -------------------------------------------------------------------


def test_loads_with_trust_remote_code_without_peft_ext(tmp_path, input_ids):
    folder = tmp_path / "model"
    model = tiny_mot(qk_norm=True, norm_placement="post_branch")
    model.save_pretrained(folder)
    modality_ids = random_mix(2, input_ids.shape)
    with torch.no_grad():
        expected = model(input_ids, modality_ids=modality_ids).logits
    torch.save({"input_ids": input_ids, "modality_ids": modality_ids, "logits": expected}, tmp_path / "expected.pt")

    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft_ext"] = None  # `import peft_ext` now raises ImportError
        try:
            import peft_ext
        except ImportError:
            pass
        else:
            raise SystemExit("peft_ext is importable")
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(data["input_ids"], modality_ids=data["modality_ids"]).logits
        # Up to float32 rounding, as `assert_same_logits` in the test module explains.
        torch.testing.assert_close(logits, data["logits"], rtol=0, atol=1e-6)
        model.save_pretrained({str(tmp_path / "resaved")!r})  # works without peft-ext, just without our card
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    assert (tmp_path / "resaved" / "model.safetensors").exists()
    assert not (tmp_path / "resaved" / "README.md").exists()


# -- (9) per-modality loss ------------------------------------------------------------------------------------


def test_loss_per_modality_matches_a_hand_computation():
    model = tiny_mot(num_modalities=3, modality_vocab_ranges=THREE_RANGES)
    # Modality 2 (ids 80..99) only at position 0, which is never a target: its loss is NaN.
    input_ids = torch.tensor([[85, 3, 45, 7, 60, 12, 41, 2], [4, 44, 5, 46, 6, 47, 8, 48]])
    labels = input_ids.clone()
    labels[1, 3] = -100
    out = model(input_ids, labels=labels)

    modality = torch.bucketize(input_ids, torch.tensor([40, 80]), right=True)
    logits, targets, target_modality = out.logits[:, :-1], labels[:, 1:], modality[:, 1:]
    valid = targets != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[valid], targets[valid]))
    assert out.loss_per_modality.shape == (3,)
    for m in range(2):
        mask = valid & (target_modality == m)
        torch.testing.assert_close(out.loss_per_modality[m], F.cross_entropy(logits[mask], targets[mask]))
    assert torch.isnan(out.loss_per_modality[2])
    # Trainer's num_items_in_batch (gradient accumulation, several processes): the summed loss divided by it.
    summed = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    torch.testing.assert_close(model(input_ids, labels=labels, num_items_in_batch=40).loss, summed / 40)
    out.loss_per_modality[:2].sum().backward()  # differentiable
    assert model.lm_head.weight.grad is not None


# -- (10) bad input -------------------------------------------------------------------------------------------


def test_bad_input_fails_before_any_compute():
    model = tiny_mot(modality_vocab_ranges=[[0, 40], [60, 100]])
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[1, 2, 3, 61]])
    with pytest.raises(ValueError, match=r"Token id 50 .* outside every range of `config.modality_vocab_ranges`"):
        model(torch.tensor([[1, 50, 3, 61]]))
    with pytest.raises(ValueError, match=r"`modality_ids` must have the shape of `input_ids`.*\(1, 4\), got \(1, 3\)"):
        model(ids, modality_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`modality_ids` must hold integers in \[0, num_modalities\) = \[0, 2\).*to 2"):
        model(ids, modality_ids=torch.tensor([[0, 1, 2, 0]]))
    with pytest.raises(ValueError, match=r"`modality_ids` must hold integers.*from -1"):
        model(ids, modality_ids=torch.tensor([[0, -1, 1, 0]]))
    with pytest.raises(ValueError, match="`modality_ids` must be an integer tensor"):
        model(ids, modality_ids=torch.zeros(1, 4))
    no_ranges = tiny_mot(modality_vocab_ranges=None)
    no_ranges.model.embed_tokens.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"Cannot tell the modality of the tokens: pass `modality_ids`"):
        no_ranges(ids)
    assert calls == []  # nothing was computed
    # Explicit modality_ids override the vocabulary ranges (an id outside them is fine then).
    assert torch.isfinite(model(torch.tensor([[1, 50, 3, 61]]), modality_ids=torch.tensor([[0, 1, 1, 0]])).logits).all()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_modalities": 0}, r"`num_modalities` must be an integer >= 1, got 0"),
        ({"num_modalities": 3, "modality_vocab_ranges": None, "modality_names": ["text", "image"]},
         r"`modality_names` must have one name per modality \(num_modalities=3\), got 2"),
        ({"modality_names": ["text", "text"]}, r"`modality_names` must be 2 distinct non-empty strings"),
        ({"modality_vocab_ranges": [[0, 60], [50, 100]]}, r"`modality_vocab_ranges` must not overlap: 'text' \[0, 60\]"),
        ({"modality_vocab_ranges": [[0, 50], [50, 101]]}, r"`modality_vocab_ranges\[1\]` must be a pair .* vocab_size=100"),
        ({"modality_vocab_ranges": [[0, 100]]}, r"`modality_vocab_ranges` must be a list of num_modalities=2"),
        ({"norm_placement": "post"}, r"`norm_placement` must be one of \('pre', 'post_branch'\), got 'post'"),
        ({"num_attention_heads": 3}, r"`hidden_size` \(32\) must be a multiple of `num_attention_heads` \(3\)"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        mot_config(**overrides)


def test_config_normalizes_and_round_trips():
    config = mot_config(modality_vocab_ranges=((0, 50), (50, 100)), rope_theta=500000.0)
    assert config.modality_vocab_ranges == TWO_RANGES and config.modality_names == ["text", "image"]
    assert config.rope_parameters["rope_theta"] == 500000.0
    again = MoTConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert MoTConfig(num_modalities=4).modality_names == ["modality_0", "modality_1", "modality_2", "modality_3"]


# -- (11) variants --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{"norm_placement": "post_branch"}, {"qk_norm": True},
                                       {"qk_norm": True, "norm_placement": "post_branch", "untie_norms": False}])
def test_variants_run_and_are_finite(overrides, input_ids):
    model = tiny_mot(**overrides)
    out = model(input_ids, labels=input_ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert model.model.layers[0].norm_placement == model.config.norm_placement
    assert (model.model.layers[0].self_attn.q_norm is not None) == model.config.qk_norm


def _parameter_groups(model) -> dict[str, int]:
    groups = {"shared": 0, "attention": 0, "ffn": 0, "norms": 0}
    for name, param in model.named_parameters():
        if "norm" in name:
            groups["norms"] += param.numel()
        elif ".self_attn." in name:
            groups["attention"] += param.numel()
        elif ".mlp." in name:
            groups["ffn"] += param.numel()
        else:
            groups["shared"] += param.numel()
    return groups


@pytest.mark.parametrize("untie_attention,untie_ffn,untie_norms",
                         [(True, True, True), (False, True, True), (True, False, False), (False, False, False)])
def test_only_untied_groups_grow_with_the_modalities(untie_attention, untie_ffn, untie_norms):
    dense = _parameter_groups(tiny_mot(num_modalities=1, modality_vocab_ranges=None, qk_norm=True))
    flags = {"attention": untie_attention, "ffn": untie_ffn, "norms": untie_norms}
    model = tiny_mot(num_modalities=3, modality_vocab_ranges=None, qk_norm=True, untie_attention=untie_attention,
                     untie_ffn=untie_ffn, untie_norms=untie_norms)
    got = _parameter_groups(model)
    assert got["shared"] == dense["shared"]  # embeddings and head (100 * 32 each)
    for group, untied in flags.items():
        assert got[group] == dense[group] * (3 if untied else 1), group
    layer = model.model.layers[0]
    assert len(layer.self_attn.q_proj) == (3 if untie_attention else 1)
    assert len(layer.mlp) == (3 if untie_ffn else 1)
    assert len(layer.input_layernorm) == len(layer.self_attn.k_norm) == len(model.model.norm) == (3 if untie_norms else 1)
    # A fully tied MoT is a dense model: every modality gives the same output.
    if not any(flags.values()):
        ids = torch.randint(0, 100, (1, 6))
        with torch.no_grad():
            a = model(ids, modality_ids=torch.zeros_like(ids)).logits
            b = model(ids, modality_ids=torch.full_like(ids, 2)).logits
        assert torch.equal(a, b)


def test_tied_word_embeddings():
    model = tiny_mot(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama_is_untouched_by_the_import():
    # Our registration must not change what "llama" maps to.
    assert type(AutoModelForCausalLM.from_config(tiny_llama().config)) is LlamaForCausalLM


def test_lora_on_chosen_towers_trains_them_only_and_round_trips(tmp_path):
    """PEFT LoRA on the image tower's Q and V (`tower_target_modules`): only those layers get adapters, a text-only
    batch does not reach them, and the saved adapter reloads to the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from peft_ext.models.mot import tower_target_modules

    target = tower_target_modules(["q_proj", "v_proj"], modalities=[1])
    model = get_peft_model(tiny_mot(), LoraConfig(r=4, target_modules=target, init_lora_weights=False))
    adapted = sorted(name.split("base_model.model.")[1] for name, module in model.named_modules()
                     if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict))
    assert adapted == [f"model.layers.{i}.self_attn.{p}.1" for i in range(2) for p in ("q_proj", "v_proj")]

    text_only = torch.randint(0, 100, (2, 8))
    # Text tokens never pass an adapted layer: the loss does not depend on any trainable parameter.
    assert not model(text_only, modality_ids=torch.zeros_like(text_only), labels=text_only).loss.requires_grad
    mixed = random_mix(2)
    model(text_only, modality_ids=mixed, labels=text_only).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)

    model.eval()
    expected = model(text_only, modality_ids=mixed).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_mot(), tmp_path).eval()
    torch.testing.assert_close(reloaded(text_only, modality_ids=mixed).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(tiny_mot()(text_only, modality_ids=mixed).logits, expected)


def test_tower_target_modules_refuses_unknown_names():
    from peft_ext.models.mot import tower_target_modules

    with pytest.raises(ValueError, match=r"`names` must be a non-empty list of \('q_proj'.*got \['qproj'\]"):
        tower_target_modules(["qproj"])
    with pytest.raises(ValueError, match=r"`modalities` must be None .* got \[-1\]"):
        tower_target_modules(["q_proj"], modalities=[-1])
