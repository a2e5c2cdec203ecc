"""Model cards rendered from hub_cards/, and NOLA adapters through the local Hub."""

import re

import pytest
import torch
import yaml
from conftest import tiny_llama
from huggingface_hub import HfApi, ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_ext
from peft_ext.hub import METHOD_CARDS, render_model_card

EXPECTED_ARXIV = {"nola": "2310.02556", "mixda": "2306.05406", "longmem": "2306.07174", "mot": "2411.04996",
                  "leyolo": "2406.14239"}


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("template", sorted(EXPECTED_ARXIV))
def test_card_metadata_and_usage(template):
    tuner = METHOD_CARDS[template].library_name == "peft"
    card = render_model_card(template, base_model="org/base" if tuner else None,
                             pipeline_tag=None if tuner else "text-generation", repo_id="me/model")
    meta = front_matter(str(card))
    assert meta["library_name"] == ("peft" if tuner else "transformers")
    assert meta["license"] == "apache-2.0"
    assert {"peft-ext", template, f"arxiv:{EXPECTED_ARXIV[template]}"} <= set(meta["tags"])
    if tuner:
        assert meta["base_model"] == "org/base"
    else:
        assert meta["pipeline_tag"] == "text-generation"
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert snippet.splitlines()[0].startswith("import peft_ext")
    assert "me/model" in snippet
    assert f"https://arxiv.org/abs/{EXPECTED_ARXIV[template]}" in card.text


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match=r"`template` must be one of \['leyolo', 'longmem', 'mixda', 'mot', 'nola'\]"):
        render_model_card("lora")


def test_templates_ship_with_the_package():
    from importlib.resources import files

    shipped = {p.name for p in files("peft_ext").joinpath("hub_cards").iterdir() if p.name.endswith(".md")}
    assert shipped == {f"{name}.md" for name in METHOD_CARDS}


def test_nola_adapter_push_and_pull(hub):
    input_ids = torch.tensor([[1, 5, 9, 42, 7]])
    base = tiny_llama()
    base.push_to_hub("tester/tiny-llama")
    base = AutoModelForCausalLM.from_pretrained("tester/tiny-llama")
    model = get_peft_model(base, peft_ext.NolaConfig(r=2, num_basis_A=32, num_basis_B=32, init_weights=False,
                                                     task_type="CAUSAL_LM"))
    expected = model(input_ids).logits
    model.push_to_hub("tester/tiny-nola")

    files = set(HfApi().list_repo_files("tester/tiny-nola"))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    card = ModelCard.load("tester/tiny-nola")
    assert card.data.library_name == "peft" and card.data.base_model == "tester/tiny-llama"
    assert "nola" in card.data.tags and card.data.pipeline_tag == "text-generation"

    reloaded = PeftModel.from_pretrained(tiny_llama(), "tester/tiny-nola")
    assert torch.equal(reloaded(input_ids).logits, expected)
    auto = AutoPeftModelForCausalLM.from_pretrained("tester/tiny-nola")
    assert torch.equal(auto(input_ids).logits, expected)
