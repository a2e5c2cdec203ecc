# ==============================================================================================
# Local Hugging Face Hub
#
# This section must stay at the very top: huggingface_hub reads HF_ENDPOINT, HF_HOME and friends
# once, when it is first imported. The server is bound here (so its URL is known) and only starts
# serving when a test asks for the `hub` fixture.
# ==============================================================================================
import atexit
import os
import shutil
import sys
import tempfile

import pytest
from hub_server import LocalHub

assert "huggingface_hub" not in sys.modules, (
    "huggingface_hub was imported before the local Hub was configured"
)

LOCAL_HUB = LocalHub()
_HF_HOME = tempfile.mkdtemp(prefix="peft-ext-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

# Variables that would point the caches, the token or the client elsewhere than the fresh HF_HOME / local Hub.
for _name in (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
):
    os.environ.pop(_name, None)
os.environ.update(
    HF_ENDPOINT=LOCAL_HUB.url,
    HF_HOME=_HF_HOME,
    HF_TOKEN=LOCAL_HUB.token,
    HF_HUB_DISABLE_TELEMETRY="1",
    # Belt and braces: the local Hub never sends xet headers, but nothing should ever reach for hf_xet.
    HF_HUB_DISABLE_XET="1",
    # Never route requests for the local Hub through a proxy from the environment.
    NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])),
)


@pytest.fixture(scope="session")
def hub():
    """The local Hub, serving for the whole session."""
    LOCAL_HUB.start()
    yield LOCAL_HUB
    LOCAL_HUB.stop()


# ==============================================================================================
# Tiny models for the tests (configs live here, not in the library)
# ==============================================================================================
import torch  # noqa: E402


def tiny_gpt2(seed: int = 0, vocab_size: int = 100):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, vocab_size: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def input_ids():
    return torch.tensor([[1, 5, 9, 42, 7, 99, 0, 3], [4, 4, 8, 15, 16, 23, 42, 2]])


# ==============================================================================================
# Benchmark modules the tests share code with (the scale-out benchmark's commands and tiny model)
# ==============================================================================================


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (not a package) as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama with a real (MiniLM's WordPiece) tokenizer, saved as a local model folder: the scale-out
    benchmark's, so the example tests and the benchmark train the same model."""
    return load_benchmark("scale_out").save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
