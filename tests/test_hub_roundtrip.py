"""Round trips through the local Hub (tests/hub_server.py) with the real huggingface_hub client over HTTP."""

from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

INPUT_IDS = torch.tensor([[1, 5, 9, 42, 7, 99, 0, 3]])


@pytest.fixture(autouse=True)
def only_local_hub(hub):
    # Every request must go to the local server: the client's endpoint is read at import time.
    assert constants.ENDPOINT == hub.url
    assert urlsplit(hub.url).hostname == "127.0.0.1"
    assert HfApi().endpoint == hub.url


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_model_push_and_load(hub):
    model = tiny_gpt2()
    commit = model.push_to_hub("tester/tiny-gpt2")

    stored = hub.repos["tester/tiny-gpt2"][-1]
    assert commit.oid == stored.oid
    assert {"config.json", "model.safetensors", "README.md"} <= stored.files.keys()

    loaded = AutoModelForCausalLM.from_pretrained("tester/tiny-gpt2").eval()
    # The weights really came over HTTP (transformers resolves "main" to the commit id first).
    assert ("GET", f"/tester/tiny-gpt2/resolve/{commit.oid}/model.safetensors") in hub.requests
    assert torch.equal(logits(loaded), logits(model))
    # A differently seeded model must differ, or the equality above proves nothing.
    assert not torch.equal(logits(tiny_gpt2(seed=1)), logits(model))


def test_lora_adapter_push_and_load(hub):
    lora_model = get_peft_model(
        tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    lora_model.eval()
    assert not torch.equal(logits(lora_model), logits(tiny_gpt2()))  # the adapter really changes the output
    lora_model.push_to_hub("tester/tiny-lora")

    assert "adapter_model.safetensors" in hub.repos["tester/tiny-lora"][-1].files
    loaded = PeftModel.from_pretrained(tiny_gpt2(), "tester/tiny-lora").eval()
    assert torch.equal(logits(loaded), logits(lora_model))


def test_missing_file_and_missing_repo(hub):
    api = HfApi()
    api.create_repo("tester/errors")
    api.upload_file(path_or_fileobj=b"present", path_in_repo="present.txt", repo_id="tester/errors")

    with open(hf_hub_download("tester/errors", "present.txt"), "rb") as file:
        assert file.read() == b"present"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/errors", "absent.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/no-such-repo", "config.json")


def test_second_push_is_a_new_revision(hub):
    first = GPT2Config(n_layer=2).push_to_hub("tester/revisions")
    second = GPT2Config(n_layer=3).push_to_hub("tester/revisions")

    assert first.oid != second.oid
    assert [commit.oid for commit in hub.repos["tester/revisions"][-2:]] == [first.oid, second.oid]
    assert AutoConfig.from_pretrained("tester/revisions", revision=first.oid).n_layer == 2
    assert AutoConfig.from_pretrained("tester/revisions").n_layer == 3
    assert AutoConfig.from_pretrained("tester/revisions", revision=second.oid).n_layer == 3


def test_repo_metadata_endpoints(hub, tmp_path):
    api = HfApi()
    assert api.whoami()["name"] == hub.user

    api.create_repo("tester/metadata")
    api.create_repo("tester/metadata", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("tester/metadata")
    assert error.value.response.status_code == 409

    for path, data in {"a.txt": b"a", "sub/b.txt": b"bb", "sub/deeper/c.txt": b"ccc"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    commit = api.upload_folder(folder_path=tmp_path, repo_id="tester/metadata")

    info = api.model_info("tester/metadata")
    assert info.sha == commit.oid
    assert sorted(sibling.rfilename for sibling in info.siblings) == [
        "a.txt",
        "sub/b.txt",
        "sub/deeper/c.txt",
    ]
    assert sorted(entry.path for entry in api.list_repo_tree("tester/metadata")) == ["a.txt", "sub"]
    assert sorted(entry.path for entry in api.list_repo_tree("tester/metadata", path_in_repo="sub")) == [
        "sub/b.txt",
        "sub/deeper",
    ]
    assert sorted(api.list_repo_files("tester/metadata")) == ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    paths = api.get_paths_info("tester/metadata", ["sub/b.txt", "sub", "missing.txt"])
    assert [(type(entry).__name__, entry.path) for entry in paths] == [
        ("RepoFile", "sub/b.txt"),
        ("RepoFolder", "sub"),
    ]
    assert paths[0].size == 2

    api.delete_repo("tester/metadata")
    assert not api.repo_exists("tester/metadata")
