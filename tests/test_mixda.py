"""MixDA: both stages on tiny BERT, GPT-2 and Llama models; gate values against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from peft_ext.tuners.mixda import (
    MixDAConfig,
    MixDALayer,
    MixDAModel,
    mixda_domain_loss,
    recording_domain_deltas,
)

INPUT_IDS = torch.tensor([[2, 5, 9, 42, 7, 99, 11, 3], [4, 4, 8, 15, 16, 23, 0, 0]])
ATTENTION_MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def bert_config(hidden_size: int = 32) -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=hidden_size, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=2 * hidden_size, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def tiny_bert_mlm(hidden_size: int = 32) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(bert_config(hidden_size)).eval()


def tiny_bert_classifier(hidden_size: int = 32) -> BertForSequenceClassification:
    """Same encoder weights as `tiny_bert_mlm` (both seed 0, built in the same order), a fixed new head."""
    encoder = tiny_bert_mlm(hidden_size).bert.state_dict()
    torch.manual_seed(1)
    model = BertForSequenceClassification(bert_config(hidden_size)).eval()
    model.bert.load_state_dict(encoder, strict=False)
    return model


DOMAIN_CONFIG = dict(stage="domain", bottleneck_size=8, layers_to_transform=[0, 2])


def randomize_trainable(model, seed: int, std: float = 0.5, skip: str = "classifier") -> None:
    """Give the adapter parameters non-zero values, as training would (zero-initialized ones would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and skip not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def domain_dirs(tmp_path_factory):
    """Two trained-looking domain adapters (random weights) on tiny BERT layers 0 and 2, saved as peft does."""
    root = tmp_path_factory.mktemp("domains")
    for seed, name in enumerate(["news", "wiki", "law"]):
        model = get_peft_model(tiny_bert_mlm(), MixDAConfig(**DOMAIN_CONFIG), adapter_name=name)
        randomize_trainable(model, seed)
        model.save_pretrained(root)  # a non-default adapter goes to root / name
    return {name: root / name for name in ["news", "wiki", "law"]}


def logits(model, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def mixda_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MixDALayer)]


# ---- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage="pretrain"), r"`stage` must be one of \('domain', 'task'\), got 'pretrain'"),
    (dict(bottleneck_size=0), r"`bottleneck_size` must be a positive integer, got 0"),
    (dict(gate_kind="tanh"), r"`gate_kind` must be one of \('softmax', 'sigmoid'\), got 'tanh'"),
    (dict(gate_granularity="batch"), r"`gate_granularity` must be one of \('token', 'sequence'\)"),
    (dict(stage="task", domain_adapters={}), r"at least one domain adapter for stage='task' \(K ≥ 1\), got \{\}"),
    (dict(stage="task"), r"at least one domain adapter for stage='task' \(K ≥ 1\), got None"),
    (dict(domain_adapters={"news": 8}), r"`domain_adapters` .* are for stage='task' only"),
    (dict(stage="task", domain_adapters={"a.b": 8}), r"names must be identifiers"),
    (dict(gate_granularity="sequence", task_type="CAUSAL_LM"), r"use gate_granularity='token' with task_type"),
    (dict(domain_dropout=1.0), r"`domain_dropout` must be in \[0, 1\), got 1.0"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixDAConfig(**kwargs)


def test_for_task_with_no_domains_is_k_zero():
    with pytest.raises(ValueError, match=r"K ≥ 1"):
        MixDAModel.for_task(tiny_bert_classifier(), {})


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match=r"`layers_to_transform` has layer\(s\) \[7\] .* adapted layers are \[0, 2\]"):
        get_peft_model(tiny_bert_mlm(), MixDAConfig(stage="domain", layers_to_transform=[0, 2, 7]))


def test_unknown_target_module():
    with pytest.raises(ValueError, match=r"not found in the base model"):
        get_peft_model(tiny_bert_mlm(), MixDAConfig(stage="domain", target_modules=["ffn.down"]))


def test_default_targets_are_the_ffn_down_projections():
    bert = get_peft_model(tiny_bert_mlm(), MixDAConfig(stage="domain"))
    assert [n for n, _ in mixda_layers(bert)] == [f"base_model.model.bert.encoder.layer.{i}.output.dense"
                                                   for i in range(3)]
    gpt2 = get_peft_model(tiny_gpt2(), MixDAConfig(stage="domain", bottleneck_size=4))
    assert [n.split("model.transformer.")[1] for n, _ in mixda_layers(gpt2)] == ["h.0.mlp.c_proj", "h.1.mlp.c_proj"]
    llama = get_peft_model(tiny_llama(), MixDAConfig(stage="domain", bottleneck_size=4))
    assert [n.split("base_model.model.model.")[1] for n, _ in mixda_layers(llama)] == ["layers.0.mlp.down_proj",
                                                                          "layers.1.mlp.down_proj"]
    # the adapter reads the intermediate activation and writes the hidden size
    layer = mixda_layers(llama)[0][1]
    assert (layer.mixda_down["default"].in_features, layer.mixda_up["default"].out_features) == (64, 32)


# ---- insertion leaves the model unchanged ------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_bert_mlm, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_domain_stage_insertion_is_exact(make):
    reference = logits(make())
    model = get_peft_model(make(), MixDAConfig(stage="domain", bottleneck_size=4))
    assert torch.equal(logits(model), reference)
    randomize_trainable(model, 0)
    assert not torch.allclose(logits(model), reference)  # the adapter is really in the forward


@pytest.mark.parametrize("gate_kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_task_stage_insertion_is_exact_with_trained_domains(domain_dirs, gate_kind, granularity):
    reference = logits(tiny_bert_classifier())
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_kind=gate_kind, gate_granularity=granularity)
    assert torch.equal(logits(model), reference)
    # the domain adapters are loaded (non-zero) and enter as soon as the gate scale moves
    with torch.no_grad():
        for _, layer in mixda_layers(model):
            layer.mixda_gate_scale["default"].fill_(1.0)
    assert not torch.allclose(logits(model), reference)


# ---- gate and layer output against hand computations -------------------------------------------------------


def capture_intermediate(model):
    """Register hooks recording each MixDA layer's input a and output; returns the dict they fill."""
    seen = {}
    for name, layer in mixda_layers(model):
        layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    return seen


@pytest.mark.parametrize("gate_kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_layer_output_matches_hand_computation(domain_dirs, gate_kind, granularity):
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_kind=gate_kind, gate_granularity=granularity).eval()
    randomize_trainable(model, 3)
    seen = capture_intermediate(model)
    logits(model)
    saved = {}
    for k in ["news", "wiki"]:
        from safetensors.torch import load_file
        saved[k] = load_file(domain_dirs[k] / "adapter_model.safetensors")
    for name, layer in mixda_layers(model):
        a, out = seen[name]
        base = layer.base_layer(a)
        # Δ_k from the saved stage-1 files, not from the layer's buffers
        deltas = []
        for k in ["news", "wiki"]:
            w = {p: saved[k][f"{name}.{p}"] for p in ["mixda_down.weight", "mixda_down.bias", "mixda_up.weight",
                                                       "mixda_up.bias"]}
            hidden = F.gelu(a @ w["mixda_down.weight"].T + w["mixda_down.bias"])
            deltas.append(hidden @ w["mixda_up.weight"].T + w["mixda_up.bias"])
        gate = layer.mixda_gate["default"]
        if granularity == "token":
            gate_in = a
        else:
            m = ATTENTION_MASK.unsqueeze(-1).float()
            gate_in = ((a * m).sum(1) / m.sum(1)).unsqueeze(1)
        z = gate_in @ gate.weight.T + gate.bias
        if gate_kind == "softmax":
            assert z.shape[-1] == 3  # K + 1: the FFN and two domain adapters
            g = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
            g = g[..., 1:]
        else:
            assert z.shape[-1] == 2
            g = 1 / (1 + torch.exp(-z))
        expected_gate_shape = (2, 8, 2) if granularity == "token" else (2, 1, 2)
        assert tuple(g.shape) == expected_gate_shape
        assert torch.allclose(layer.gate_weights("default", a), g, atol=1e-6)
        y = base + layer.mixda_gate_scale["default"] * (g[..., :1] * deltas[0] + g[..., 1:] * deltas[1])
        t_down, t_up = layer.mixda_task_down["default"], layer.mixda_task_up["default"]
        assert t_down.out_features == 32 // 16
        expected = y + torch.relu(y @ t_down.weight.T + t_down.bias) @ t_up.weight.T + t_up.bias
        assert torch.allclose(out, expected, atol=1e-5)


def test_padding_does_not_change_a_sequence_gate(domain_dirs):
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_granularity="sequence").eval()
    randomize_trainable(model, 4)
    seen = capture_intermediate(model)
    gates = {}
    for label, ids, mask in [("alone", INPUT_IDS[1:, :6], ATTENTION_MASK[1:, :6]),
                             ("padded", INPUT_IDS, ATTENTION_MASK)]:
        out = logits(model, ids, mask)
        gates[label] = {}
        for name, layer in mixda_layers(model):
            layer.forward_context.attention_mask = mask
            gates[label][name] = layer.gate_weights("default", seen[name][0])
        gates[label]["logits"] = out
    for name, _ in mixda_layers(model):
        assert torch.allclose(gates["alone"][name][0], gates["padded"][name][1], atol=1e-6)
        # the pads really were different inputs: without the mask they would move the gate
        unmasked = gates["padded"][name][1]
        layer = dict(mixda_layers(model))[name]
        layer.forward_context.attention_mask = None
        assert not torch.allclose(layer.gate_weights("default", seen[name][0])[1], unmasked, atol=1e-6)
    assert torch.allclose(gates["alone"]["logits"][0], gates["padded"]["logits"][1], atol=1e-5)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_batch_size_one_equals_batched(domain_dirs, granularity):
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_granularity=granularity).eval()
    randomize_trainable(model, 5)
    batched = logits(model)
    for i in range(2):
        single = logits(model, INPUT_IDS[i:i + 1], ATTENTION_MASK[i:i + 1])
        assert single.shape == (1, 2)
        assert torch.allclose(single[0], batched[i], atol=1e-5)


# ---- stage 1 loss ------------------------------------------------------------------------------------------


def test_domain_loss_terms_match_hand_computation():
    model = get_peft_model(tiny_bert_mlm(), MixDAConfig(**DOMAIN_CONFIG))
    randomize_trainable(model, 6, std=0.2)
    seen = capture_intermediate(model)
    domain = dict(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100))
    general = dict(input_ids=INPUT_IDS.flip(0), attention_mask=ATTENTION_MASK.flip(0))
    total, mlm, retention = mixda_domain_loss(model, domain, general, knowledge_weight=0.5)
    # L2 = ‖DA(a) − FFN(a)‖², DA(a) = the adapted layer's output, FFN(a) = the frozen projection's output
    per_layer = []
    for name, layer in mixda_layers(model):
        a, adapted = seen[name]  # from the last forward, the general batch
        frozen = layer.base_layer(a)
        per_token = (adapted - frozen).pow(2).mean(-1)
        m = general["attention_mask"].float()
        per_layer.append((per_token * m).sum() / m.sum())
    assert retention > 0
    assert torch.allclose(retention, torch.stack(per_layer).mean(), atol=1e-6)
    assert torch.allclose(total, 0.5 * mlm + retention)
    assert torch.allclose(mlm, model(**domain).loss)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_recording_needs_mixda_layers():
    with pytest.raises(ValueError, match=r"no MixDA layers"):
        with recording_domain_deltas(tiny_bert_mlm()):
            pass


def test_domain_trainer_trains_only_the_domain_adapter(tmp_path):
    from transformers import AutoTokenizer

    from peft_ext.embedded import minilm_path, news_paragraphs, wikipedia_paragraphs
    from peft_ext.tuners.mixda import MixDADomainCollator, MixDADomainTrainer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = bert_config()
    config.vocab_size = len(tokenizer)
    base = BertForMaskedLM(config)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, MixDAConfig(**DOMAIN_CONFIG), adapter_name="news")
    examples = [{"text": t, "general_text": g} for t, g in zip(news_paragraphs()[:8], wikipedia_paragraphs(8))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="no")
    trainer = MixDADomainTrainer(model=model, args=args, train_dataset=examples,
                                 data_collator=MixDADomainCollator(tokenizer, max_length=32))
    trainer.train()
    changed = {n for n, p in model.get_base_model().named_parameters()
               if n in before and not torch.equal(p, before[n])}
    assert changed == set()
    up = [m.mixda_up["news"].weight for _, m in mixda_layers(model)]
    assert all(w.abs().sum() > 0 for w in up)  # the zero-initialized up projections moved


# ---- stage 2: freezing, Trainer, round trips ---------------------------------------------------------------


class LabelledDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = INPUT_IDS[i % 2]
        return {"input_ids": ids, "attention_mask": ATTENTION_MASK[i % 2], "labels": torch.tensor(i % 2)}


def test_stage_two_trains_gate_task_adapter_and_head_only(domain_dirs, tmp_path):
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_granularity="sequence")
    trainable = {n.split(".default")[0].rsplit(".", 1)[-1] if "mixda" in n else n.split(".")[2]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mixda_gate", "mixda_gate_scale", "mixda_task_down", "mixda_task_up", "classifier"}
    frozen = {n: b.clone() for n, b in model.named_buffers() if "mixda_domains" in n}
    assert len(frozen) == 2 * 2 * 4  # layers × domains × (W_down, b_down, W_up, b_up)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
                             report_to="none", use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=LabelledDataset()).train()
    for name, buffer in model.named_buffers():
        if name in frozen:
            assert torch.equal(buffer, frozen[name]), name  # bit-identical
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[n])]
    assert any("mixda_gate_scale" in n for n in moved) and any("mixda_task_up" in n for n in moved)


def test_round_trips_restore_outputs(domain_dirs, tmp_path):
    # stage 1
    domain = PeftModel.from_pretrained(tiny_bert_mlm(), domain_dirs["news"]).eval()
    trained = get_peft_model(tiny_bert_mlm(), MixDAConfig(**DOMAIN_CONFIG), adapter_name="news")
    randomize_trainable(trained, 0)
    assert torch.equal(logits(domain), logits(trained.eval()))
    # stage 2, reloaded from its own folder only
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]},
                                gate_kind="sigmoid", gate_granularity="sequence").eval()
    randomize_trainable(model, 7, skip="nothing")
    model.save_pretrained(tmp_path / "task")
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "task").eval()
    assert torch.equal(logits(reloaded), logits(model))
    assert not torch.allclose(logits(reloaded), logits(tiny_bert_classifier()))
    assert reloaded.peft_config["default"].domain_adapters == {"news": 8, "wiki": 8}


def test_adding_a_domain_reuses_the_saved_adapters(domain_dirs):
    two = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]})
    three = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki", "law"]})
    for (_, l2), (_, l3) in zip(mixda_layers(two), mixda_layers(three)):
        assert l3.mixda_gate["default"].out_features == 4  # K + 1 with K = 3
        for name in ["news", "wiki"]:
            assert torch.equal(l2.mixda_domains["default"][name].up_weight, l3.mixda_domains["default"][name].up_weight)


def test_domain_adapter_from_another_base_is_refused(domain_dirs, tmp_path):
    other = get_peft_model(tiny_bert_mlm(hidden_size=48), MixDAConfig(**DOMAIN_CONFIG), adapter_name="big")
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'big' .* maps 96 → 8 → 48 at .*layer\.0\.output\.dense.* maps 64 → 32 "
                                         r".*trained on a base model with other hidden or intermediate sizes"):
        MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"], "big": tmp_path / "big"})


def test_domain_adapters_on_other_layers_are_refused(domain_dirs, tmp_path):
    other = get_peft_model(tiny_bert_mlm(), MixDAConfig(stage="domain", bottleneck_size=8, layers_to_transform=[1]),
                           adapter_name="mid")
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'mid' .* has no weights for .*layer\.0\.output\.dense"):
        MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"], "mid": tmp_path / "mid"})


def test_not_a_domain_adapter_is_refused(domain_dirs, tmp_path):
    task = MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"]})
    task.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not a MixDA domain adapter \(stage='domain'\)"):
        MixDAModel.for_task(tiny_bert_classifier(), {"task": tmp_path})


def test_merge_is_refused_and_unload_restores_the_base(domain_dirs):
    model = MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"]})
    randomize_trainable(model, 8)
    with pytest.raises(NotImplementedError, match=r"cannot be merged .* call `unload\(\)`"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match=r"cannot be merged"):
        model.merge_adapter()
    base = model.unload()
    assert not mixda_layers(base)
    assert torch.allclose(logits(base), logits(tiny_bert_classifier()), atol=1e-6)


# ---- decoders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_causal_lm_two_stages_and_generate(make, tmp_path):
    domain = get_peft_model(make(), MixDAConfig(stage="domain", bottleneck_size=4, layers_to_transform=[1]),
                            adapter_name="code")
    randomize_trainable(domain, 9)
    domain.save_pretrained(tmp_path)
    ids = INPUT_IDS[:1]
    model = MixDAModel.for_task(make(), {"code": tmp_path / "code"}).eval()
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert torch.equal(logits(model, ids, None), logits(make(), ids, None))
    randomize_trainable(model, 10, std=0.3)
    # token gates are causal: a prefix's logits do not depend on later tokens
    assert torch.allclose(logits(model, ids[:, :5], None), logits(model, ids, None)[:, :5], atol=1e-5)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


# ---- Hub ---------------------------------------------------------------------------------------------------


def test_domain_adapters_push_and_pull_on_their_own(hub, domain_dirs):
    news = PeftModel.from_pretrained(tiny_bert_mlm(), domain_dirs["news"], adapter_name="news")
    news.push_to_hub("tester/mixda-news")
    files = hub.repos["tester/mixda-news"][-1].files
    assert {"news/adapter_config.json", "news/adapter_model.safetensors", "README.md"} <= set(files)
    assert "Mixture-of-Domain-Adapters" in bytes(files["README.md"]).decode()
    model = MixDAModel.for_task(tiny_bert_classifier(), {"news": "tester/mixda-news", "wiki": domain_dirs["wiki"]})
    local = MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"], "wiki": domain_dirs["wiki"]})
    for (_, a), (_, b) in zip(mixda_layers(model), mixda_layers(local)):
        for name in ["news", "wiki"]:
            assert torch.equal(a.mixda_domains["default"][name].down_weight, b.mixda_domains["default"][name].down_weight)
    assert model.peft_config["default"].domain_adapter_sources["news"] == "tester/mixda-news"


def test_saved_cards_say_which_stage(domain_dirs, tmp_path):
    domain_card = (domain_dirs["news"].parent / "README.md").read_text()
    assert "This adapter is a **`domain`**-stage adapter" in domain_card
    model = MixDAModel.for_task(tiny_bert_classifier(), {k: domain_dirs[k] for k in ["news", "wiki"]})
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "a **`task`**-stage adapter mixing the domain\nadapters `news`, `wiki`" in card
    assert "| `gate_kind` | `softmax` |" in card


def test_task_adapter_loads_with_low_cpu_mem_usage(domain_dirs, tmp_path):
    model = MixDAModel.for_task(tiny_bert_classifier(), {"news": domain_dirs["news"]}).eval()
    randomize_trainable(model, 11, skip="nothing")
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(b.is_meta for b in reloaded.buffers())
    assert torch.equal(logits(reloaded), logits(model))
