"""CUDA: every method gives its CPU numbers on a GPU, trains there, and saves checkpoints that load on the CPU.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine: `pytest tests/test_cuda.py`. Comparisons are
in float32 with TF32 switched off, so CPU and GPU differ by summation order only.
"""

import copy

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model

from peft_ext import NolaConfig
from peft_ext.models.leyolo import LeYoloConfig, LeYoloForObjectDetection
from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
from peft_ext.tuners.mixda import MixDAConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round matmul and convolution inputs to 10 mantissa bits: compare true float32 on both sides."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_close_across_devices(on_gpu: torch.Tensor, on_cpu: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(on_gpu.float().cpu(), on_cpu.float(), rtol=1e-4, atol=atol)


def train_on_one_batch(model, ids: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> list[float]:
    """The losses of 20 AdamW steps (lr 0.05) on one batch of token ids, under CUDA autocast if a dtype is given."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def nola_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "nola_factors")}


# ------------------------------------------------------------------------------------------------ NOLA
def test_nola_bases_are_bit_identical_whichever_device_builds_them():
    config = NolaConfig(r=2, num_basis_A=32, num_basis_B=32, target_modules=["q_proj", "v_proj"], init_weights=False)
    on_cpu = get_peft_model(tiny_llama(), copy.deepcopy(config))
    built_on_gpu = get_peft_model(tiny_llama().to(CUDA), copy.deepcopy(config))
    moved = copy.deepcopy(on_cpu).to(CUDA)
    reference = nola_layers(on_cpu)
    for model in (built_on_gpu, moved):
        layers = nola_layers(model)
        assert layers.keys() == reference.keys()
        for name, layer in layers.items():
            # the seeded CPU generators make the random tensors device-independent...
            for buffers in ("nola_A0", "nola_basis_A", "nola_basis_B"):
                got = getattr(layer, buffers)["default"]
                assert got.device.type == "cuda"
                assert torch.equal(got.cpu(), getattr(reference[name], buffers)["default"]), (name, buffers)
            # ... and their combinations with the coefficients differ by summation order only
            for got, expected in zip(layer.nola_factors("default"), reference[name].nola_factors("default")):
                assert_close_across_devices(got, expected, atol=1e-6)
    ids = torch.randint(0, 100, (2, 12))
    expected = on_cpu(ids).logits
    for model in (built_on_gpu, moved):
        assert_close_across_devices(model(ids.to(CUDA)).logits, expected)


def test_nola_trains_in_bf16_on_gpu_and_the_adapter_loads_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(CUDA), NolaConfig(r=2, num_basis_A=32, num_basis_B=32,
                                                             target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 100, (8, 16), device=CUDA)
    losses = train_on_one_batch(model, ids, autocast_dtype=torch.bfloat16)
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close_across_devices(model(ids).logits, reloaded(ids.cpu()).logits)


def test_nola_on_a_4bit_base_trains_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # in_features a multiple of 64 (the 4-bit block size), as in real models
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map={"": 0})
    base = prepare_model_for_kbit_training(base)
    model = get_peft_model(base, NolaConfig(r=4, num_basis_A=64, num_basis_B=64, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    losses = train_on_one_batch(model, torch.randint(0, 100, (8, 16), device=CUDA))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all("nola_coef_" in n for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ MixDA
def test_mixda_domain_adapter_gives_cpu_logits_on_gpu():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
    model = get_peft_model(bert, MixDAConfig(stage="domain", bottleneck_size=8, layers_to_transform=[0, 2]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)  # a zero up-projection would prove nothing
    ids = torch.randint(0, 100, (2, 10))
    expected = model(ids).logits
    assert_close_across_devices(model.to(CUDA)(ids.to(CUDA)).logits, expected)


# ------------------------------------------------------------------------------------------------ MoT
def test_mot_gives_cpu_logits_on_gpu_generates_with_cache_and_routes_gradients():
    from test_mot import tiny_mot

    model = tiny_mot()
    ids = torch.tensor([[3, 55, 7, 60, 12, 2], [70, 2, 81, 4, 9, 51]])
    expected = model(ids).logits
    gpu = copy.deepcopy(model).to(CUDA)
    assert_close_across_devices(gpu(ids.to(CUDA)).logits, expected)
    prompt = ids[:, :4].to(CUDA)
    with_cache, without = (gpu.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=c, pad_token_id=0)
                           for c in (True, False))
    assert torch.equal(with_cache, without)
    text_only = torch.randint(0, 50, (2, 8), device=CUDA)  # modality 0 only
    gpu.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu(text_only, labels=text_only).loss.backward()
    image_tower = gpu.model.layers[0].mlp[1]
    assert all(p.grad is None or not p.grad.any() for p in image_tower.parameters())
    assert any(p.grad is not None and p.grad.any() for p in gpu.model.layers[0].mlp[0].parameters())


# ------------------------------------------------------------------------------------------------ LongMem
def test_longmem_bank_on_gpu_gives_cpu_logits_and_generates():
    torch.manual_seed(0)
    lm = LongMemForCausalLM.from_backbone(tiny_llama(), LongMemConfig(memory_size=64, chunk_size=4, topk_chunks=3,
                                                                      gate_init=2.0))
    gpu = copy.deepcopy(lm).to(CUDA)
    context, question = torch.randint(1, 100, (2, 48)), torch.randint(1, 100, (2, 6))
    for model, device in ((lm, "cpu"), (gpu, CUDA)):
        model.reset_memory(batch_size=2)
        model.memorize(context.to(device), show_progress=False)
    assert gpu.memory.num_chunks.tolist() == lm.memory.num_chunks.tolist()
    assert_close_across_devices(gpu(question.to(CUDA), update_memory=False).logits,
                                lm(question, update_memory=False).logits)
    prompt = question.to(CUDA)
    out = gpu.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 12) and out.device.type == "cuda"


# ------------------------------------------------------------------------------------------------ LeYOLO
def test_leyolo_gives_cpu_detections_on_gpu():
    torch.manual_seed(0)
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("nano", num_labels=3)).eval()
    pixels = torch.rand(2, 3, 160, 160)
    expected = model(pixel_values=pixels)
    got = copy.deepcopy(model).to(CUDA)(pixel_values=pixels.to(CUDA))
    assert_close_across_devices(got.logits, expected.logits, atol=1e-4)
    assert_close_across_devices(got.pred_boxes, expected.pred_boxes, atol=1e-4)


def test_converted_official_nano_detects_on_gpu_through_the_pipeline():
    import os
    from pathlib import Path

    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from transformers import pipeline

    from peft_ext.models.leyolo.convert_leyolo_original_to_hf import convert_checkpoint
    from peft_ext.models.leyolo.image_processing_leyolo import LeYoloImageProcessor

    checkpoint = Path(os.environ.get("LEYOLO_NANO_CHECKPOINT", Path(__file__).parents[2] / "shared" / "leyolo"
                                     / "LeYOLONano.pt"))
    if not checkpoint.exists():
        pytest.skip(f"official checkpoint not found at {checkpoint}")
    detector = pipeline("object-detection", model=convert_checkpoint(checkpoint),
                        image_processor=LeYoloImageProcessor(size=640), device=0)
    assert detector.model.device.type == "cuda"
    for image, label in [(skimage_data.astronaut(), "person"), (skimage_data.chelsea(), "cat")]:
        scores = [d["score"] for d in detector(Image.fromarray(image), threshold=0.5) if d["label"] == label]
        assert scores and max(scores) >= 0.8, (label, scores)
