"""LeYOLO architecture: official parameter counts and GFLOPs, decoding, Auto classes, saving, fuse and ONNX."""

import io
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

from peft_ext.models.leyolo import COCO_LABELS, LeYoloConfig, LeYoloForObjectDetection, LeYoloModel
from peft_ext.models.leyolo.modeling_leyolo import count_gflops

# The issue's reference table: official code measured with Ultralytics' model.info() (params, fused / unfused)
# and get_flops (GFLOPs on the Ultralytics-fused model) at each input size.
OFFICIAL_PARAMS = {
    "nano": (1_119_040, 1_120_480),
    "small": (1_915_952, 1_917_440),
    "medium": (2_401_256, 2_402_744),
    "large": (2_401_256, 2_402_744),
}
OFFICIAL_GFLOPS = [
    ("nano", 320, 0.660), ("nano", 480, 1.486), ("nano", 640, 2.641), ("nano", 768, 3.803),
    ("small", 320, 1.126), ("small", 480, 2.534), ("small", 640, 4.505), ("small", 768, 6.488),
    ("medium", 320, 1.454), ("medium", 480, 3.272), ("medium", 640, 5.818), ("medium", 768, 8.378),
    ("large", 768, 8.378),
]  # fmt: skip


def tiny_detector(seed=0, num_labels=3) -> LeYoloForObjectDetection:
    torch.manual_seed(seed)
    return LeYoloForObjectDetection(LeYoloConfig.from_variant("nano", num_labels=num_labels)).eval()


def randomize_batch_norms(model, seed=0):
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("variant", list(OFFICIAL_PARAMS))
def test_parameter_counts_match_the_official_models(variant):
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant(variant))
    fused, unfused = OFFICIAL_PARAMS[variant]
    assert model.num_parameters() == unfused
    # the 16 DFL bin values are frozen, as in the official model
    assert model.num_parameters(only_trainable=True) == unfused - 16
    assert model.fuse("ultralytics").num_parameters() == fused


@pytest.mark.parametrize(("variant", "size", "reference"), OFFICIAL_GFLOPS)
def test_gflops_match_the_official_count(variant, size, reference):
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant(variant)).fuse("ultralytics")
    assert count_gflops(model, size) == pytest.approx(reference, rel=1e-3)


def test_gflops_agree_with_torch_flop_counter():
    # On the fully fused model only convs, the two upsamplings and the DFL expectation are counted; torch's own
    # FlopCounterMode counts the convs (2 x MACs), and the other two are counted by hand for a 64x64 input:
    # upsampled maps 96 x 4 x 4 and 64 x 8 x 8, DFL 16 bins x 4 sides x (8x8 + 4x4 + 2x2) cells.
    from torch.utils.flop_counter import FlopCounterMode

    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("nano")).fuse()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    hand = counter.get_total_flops() + 2 * (96 * 4 * 4 + 64 * 8 * 8) + 2 * 16 * 4 * (64 + 16 + 4)
    assert count_gflops(model, 64) == pytest.approx(hand / 1e9, rel=1e-12)


def test_medium_builds_the_unused_layers_but_skips_them():
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("medium")).eval()
    assert len(model.model.layers) == 42 and model.model.output_layers == (27, 32, 37)
    ran = []
    hook = model.model.layers[41].register_forward_hook(lambda *args: ran.append(True))
    with torch.no_grad():
        skipped = model(torch.rand(1, 3, 64, 64))
        everything = model(torch.rand(1, 3, 64, 64), run_unused_layers=True)
    hook.remove()
    assert ran == [True]  # only in the second call
    assert skipped.logits.shape == everything.logits.shape == (1, 84, 80)


def test_outputs_shapes_anchor_order_and_decoding():
    model = tiny_detector()
    pixel_values = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model(pixel_values)
    cells = [(64 // s, 96 // s, s) for s in (8, 16, 32)]
    assert outputs.logits.shape == (2, sum(h * w for h, w, _ in cells), 3)
    assert outputs.pred_box_distribution.shape == (2, outputs.logits.shape[1], 4, 16)
    # decode a few cells by hand: the k-th cell of a level is (row k // W, column k % W), centre (col + .5) * s
    for level_offset, (_height, width, stride), index in [(0, cells[0], 13), (96, cells[1], 7), (120, cells[2], 5)]:
        row, column = divmod(index, width)
        probabilities = outputs.pred_box_distribution[0, level_offset + index].softmax(-1)
        left, top, right, bottom = (probabilities * torch.arange(16.0)).sum(-1).tolist()
        cx, cy = (column + 0.5) * stride, (row + 0.5) * stride
        x1, y1, x2, y2 = cx - left * stride, cy - top * stride, cx + right * stride, cy + bottom * stride
        expected = torch.tensor([(x1 + x2) / 2 / 96, (y1 + y2) / 2 / 64, (x2 - x1) / 96, (y2 - y1) / 64])
        torch.testing.assert_close(outputs.pred_boxes[0, level_offset + index], expected, atol=1e-5, rtol=1e-5)


def test_config_defaults_variants_and_validation():
    config = LeYoloConfig.from_variant("small")
    assert config.num_labels == 80 and config.id2label[15] == "cat" == COCO_LABELS[15]
    assert (config.architecture, config.width_multiple) == ("nano", 1.33)
    assert LeYoloConfig.from_variant("large").image_size == 768
    assert LeYoloConfig.from_variant("nano", num_labels=3).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="`variant` must be one of"):
        LeYoloConfig.from_variant("tiny")
    with pytest.raises(ValueError, match="`architecture` must be one of"):
        LeYoloConfig(architecture="huge")
    with pytest.raises(ValueError, match="`width_multiple` must be a positive number"):
        LeYoloConfig(width_multiple=0)
    with pytest.raises(ValueError, match="`image_size` must be a multiple of the largest stride 32"):
        LeYoloConfig(image_size=100)
    with pytest.raises(ValueError, match="`reg_max` must be at least 2"):
        LeYoloConfig(reg_max=1)


def test_bad_input_tensors_give_clear_errors():
    model = tiny_detector()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 65, 64))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(torch.rand(1, 1, 64, 64))


def test_auto_classes_and_save_load_round_trip(tmp_path):
    model = randomize_batch_norms(tiny_detector())
    auto_model = AutoModelForObjectDetection.from_config(model.config)
    assert type(auto_model) is LeYoloForObjectDetection
    assert type(AutoModel.from_config(model.config)) is LeYoloModel
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: object-detection" in card and "arxiv.org/abs/2406.14239" in card
    assert type(AutoConfig.from_pretrained(tmp_path)) is LeYoloConfig
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.float32
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


def test_push_to_hub_and_load_with_the_processor(hub):
    """Push to the local Hub: one commit with weights, config and our card (naming the repo); pull through the
    Auto classes and the pipeline."""
    from huggingface_hub import HfApi, ModelCard
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from peft_ext.models.leyolo import LeYoloImageProcessor

    model = randomize_batch_norms(tiny_detector())
    model.push_to_hub("me/leyolo-tiny")
    LeYoloImageProcessor(size=64).push_to_hub("me/leyolo-tiny")
    files = set(HfApi().list_repo_files("me/leyolo-tiny"))
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= files
    card = ModelCard.load("me/leyolo-tiny")
    assert card.data.pipeline_tag == "object-detection" and "leyolo" in card.data.tags
    assert "me/leyolo-tiny" in card.text

    pulled = AutoModelForObjectDetection.from_pretrained("me/leyolo-tiny").eval()
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pulled(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained("me/leyolo-tiny")
    assert type(processor) is LeYoloImageProcessor
    detector = pipeline("object-detection", model="me/leyolo-tiny")
    detections = detector(Image.new("RGB", (80, 48), (128, 128, 128)), threshold=0.0)
    assert detections and {d["label"] for d in detections} <= set(model.config.id2label.values())
    for detection in detections:  # boxes in the original image's pixels
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 80 and 0 <= box["ymin"] <= box["ymax"] <= 48


def test_loading_with_another_num_labels_needs_ignore_mismatched_sizes(tmp_path):
    tiny_detector(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LeYoloForObjectDetection.from_pretrained(tmp_path, num_labels=5)
    model = LeYoloForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5 and model.head.class_branches[0].output.out_channels == 5


@pytest.mark.parametrize("scope", ["all", "ultralytics"])
def test_fuse_keeps_outputs(scope):
    model = randomize_batch_norms(tiny_detector())
    pixel_values = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        eager = model(pixel_values)
        fused = model.fuse(scope)(pixel_values)
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (remaining == 0) == (scope == "all")
    torch.testing.assert_close(fused.logits, eager.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused.pred_boxes, eager.pred_boxes, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="`scope` must be 'all' or 'ultralytics'"):
        model.fuse("some")


def test_onnx_export_matches_eager():
    onnxruntime = pytest.importorskip("onnxruntime")
    model = randomize_batch_norms(tiny_detector())
    pixel_values = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        eager = model(pixel_values)

    class Exported(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, pixel_values):
            outputs = self.detector(pixel_values)
            return outputs.logits, outputs.pred_boxes

    buffer = io.BytesIO()
    torch.onnx.export(Exported(model.fuse()), (pixel_values,), buffer, input_names=["pixel_values"],
                      output_names=["logits", "pred_boxes"], dynamo=False)  # fmt: skip
    session = onnxruntime.InferenceSession(buffer.getvalue())
    logits, boxes = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert np.abs(logits - eager.logits.numpy()).max() <= 1e-4
    assert np.abs(boxes - eager.pred_boxes.numpy()).max() <= 1e-4


def test_head_bias_prior():
    model = tiny_detector(num_labels=3)
    for branch, stride in zip(model.head.class_branches, (8, 16, 32)):
        assert torch.allclose(branch.output.bias, torch.full((3,), math.log(5 / 3 / (640 / stride) ** 2)))
    assert torch.equal(model.head.distribution_bins, torch.arange(16.0))
