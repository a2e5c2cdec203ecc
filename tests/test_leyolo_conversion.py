"""Official LeYOLO checkpoint conversion: restricted unpickling, exact weights, detections through the pipeline.

The official Nano checkpoint (AGPL, test data only, never shipped) is read from $LEYOLO_NANO_CHECKPOINT, by default
../shared/leyolo/LeYOLONano.pt next to the repository; the tests that need it skip when it is absent.
"""

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from peft_ext.models.leyolo import LeYoloForObjectDetection, LeYoloImageProcessor
from peft_ext.models.leyolo.convert_leyolo_original_to_hf import (
    convert_checkpoint,
    load_original_checkpoint,
    load_original_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(os.environ.get("LEYOLO_NANO_CHECKPOINT", REPO.parent / "shared" / "leyolo" / "LeYOLONano.pt"))
needs_checkpoint = pytest.mark.skipif(not CHECKPOINT.exists(), reason=f"official checkpoint not found at {CHECKPOINT}")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_runs_no_foreign_code(tmp_path):
    marker = tmp_path / "pwned"
    archive = tmp_path / "evil.pt"
    payload = pickle.dumps({"model": _Exploit(marker)}, protocol=2)
    assert b"system" in payload
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("evil/data.pkl", payload)
    checkpoint = load_original_checkpoint(archive)
    assert not marker.exists()
    assert type(checkpoint["model"]).__module__ == "stub:posix"
    # a plain-pickled tensor would reach torch.load through torch.storage._load_from_bytes: stubbed and refused
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("evil/data.pkl", pickle.dumps({"model": _Exploit(marker), "weights": torch.ones(2)}))
    with pytest.raises(pickle.UnpicklingError, match="archive's raw data files"):
        load_original_checkpoint(archive)
    assert not marker.exists()


def test_not_a_checkpoint_is_rejected(tmp_path):
    archive = tmp_path / "empty.pt"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("x/other.txt", "nothing")
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        load_original_checkpoint(archive)
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("x/data.pkl", pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_original_checkpoint(archive)


@needs_checkpoint
def test_conversion_is_exact_and_float32(tmp_path):
    original = load_original_state_dict(CHECKPOINT)
    assert len(original) == 651 and all(t.dtype in (torch.float32, torch.int64) for t in original.values())
    model = convert_checkpoint(CHECKPOINT, tmp_path)
    reloaded = LeYoloForObjectDetection.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.float32 and reloaded.num_parameters() == 1_120_480
    # spot-check the renaming: stem, a block without expansion, SPPF, head branches, DFL bins
    ours = reloaded.state_dict()
    for official_name, our_name in [
        ("model.0.c.weight", "model.layers.0.conv.weight"),
        ("model.2.layers.0.c.weight", "model.layers.2.depthwise.conv.weight"),
        ("model.2.layers.2.running_var", "model.layers.2.project_norm.running_var"),
        ("model.3.layers.0.bn.bias", "model.layers.3.expand.norm.bias"),
        ("model.14.cv2.conv.weight", "model.layers.14.expand.conv.weight"),
        ("model.35.cv3.2.2.bn.weight", "head.class_branches.2.depthwise2.norm.weight"),
        ("model.35.cv2.0.3.bias", "head.box_branches.0.output.bias"),
    ]:
        assert torch.equal(ours[our_name], original[official_name]), official_name
    assert torch.equal(ours["head.distribution_bins"], torch.arange(16.0))
    assert model.config.id2label[0] == "person" and model.config.width_multiple == 1.0


@needs_checkpoint
def test_converted_nano_finds_the_astronaut_and_the_cat():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from transformers import pipeline

    model = convert_checkpoint(CHECKPOINT)
    detector = pipeline("object-detection", model=model, image_processor=LeYoloImageProcessor(size=640))
    for image, label, region in [
        (skimage_data.astronaut(), "person", (0, 0, 400, 512)),  # she fills the left two thirds
        (skimage_data.chelsea(), "cat", (0, 0, 451, 300)),
    ]:
        detections = detector(Image.fromarray(image), threshold=0.5)
        best = max((d for d in detections if d["label"] == label), key=lambda d: d["score"])
        assert best["score"] >= 0.5
        box = best["box"]
        assert region[0] <= box["xmin"] < box["xmax"] <= region[2] and region[1] <= box["ymin"] < box["ymax"] <= region[3]
        assert (box["xmax"] - box["xmin"]) * (box["ymax"] - box["ymin"]) > 0.4 * image.shape[0] * image.shape[1]


@pytest.mark.slow
@needs_checkpoint
def test_command_line_conversion(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_ext.models.leyolo.convert_leyolo_original_to_hf", "--checkpoint", str(CHECKPOINT),
         "--output", str(tmp_path), "--image-processor"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1,120,480 parameters" in result.stdout
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}


@needs_checkpoint
def test_large_needs_the_medium_table():
    with pytest.raises(ValueError, match="not large's"):
        convert_checkpoint(CHECKPOINT, variant="large")
