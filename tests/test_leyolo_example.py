"""examples/leyolo_train.py: box-preserving augmentations, and a tiny Trainer run on a COCO-format folder."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "leyolo_train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("leyolo_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_augmentations_keep_boxes_on_their_objects():
    script = load_script()
    image = np.zeros((90, 120, 3), dtype=np.uint8)
    boxes = np.array([[10, 20, 40, 60], [70, 5, 110, 35]], dtype=np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 200
    rng = np.random.default_rng(0)
    for _ in range(30):
        augmented, new_boxes, classes = script.augment(image, boxes, np.array([0, 1]), rng, min_crop=0.6)
        bright = augmented.mean(-1) > augmented.mean()  # the objects stay the bright pixels after the jitter
        covered = np.zeros(bright.shape, dtype=bool)
        for x1, y1, x2, y2 in np.round(new_boxes).astype(int):
            assert bright[y1:y2, x1:x2].mean() > 0.95  # every kept box lies on its object
            covered[y1:y2, x1:x2] = True
        assert not (bright & ~covered).any() or len(classes) < 2  # all object pixels are inside a kept box
        assert len(new_boxes) == len(classes)


def test_training_script_on_a_coco_folder(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    images = {"chelsea.png": (skimage_data.chelsea(), [[0, 0, 410, 300]], 17),
              "coffee.png": (skimage_data.coffee(), [[175, 15, 245, 305]], 47)}  # fmt: skip
    coco = {"images": [], "annotations": [], "categories": [{"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]}
    for image_id, (name, (pixels, boxes, category)) in enumerate(images.items()):
        Image.fromarray(pixels).save(tmp_path / name)
        coco["images"].append({"id": image_id, "file_name": name})
        coco["annotations"] += [{"id": len(coco["annotations"]), "image_id": image_id, "bbox": box,
                                 "category_id": category} for box in boxes]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(coco))
    output = tmp_path / "out"
    # in-process (the subprocess start-up alone would cost more than the run); `main` takes the command line
    load_script().main(["--annotations_file", str(tmp_path / "train.json"), "--images_dir", str(tmp_path),
                        "--image_size", "64", "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu",
                        "--report_to", "none", "--save_strategy", "no", "--output_dir", str(output)])  # fmt: skip
    assert "mAP50-95 on training images (memorization check)" in capsys.readouterr().out
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "leyolo" and config["id2label"] == {"0": "cat", "1": "cup"}
    assert (output / "preprocessor_config.json").exists()


def test_training_script_rejects_bad_arguments(tmp_path):
    script = load_script()
    with pytest.raises(ValueError, match="`annotations_file` and `images_dir` go together"):
        script.ScriptArguments(annotations_file="a.json")
    with pytest.raises(ValueError, match="multiple of 32"):
        script.ScriptArguments(image_size=100)
