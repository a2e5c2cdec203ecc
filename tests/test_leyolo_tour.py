"""The LeYOLO tour stage, run as the tour runs it."""

import pytest

from peft_ext.models.leyolo.tour import DETECTION_CLASSES, DETECTION_SET, skimage_detection_set


def test_detection_set_is_consistent():
    pytest.importorskip("skimage")
    samples = skimage_detection_set()
    assert [name for name, _, _ in samples] == list(DETECTION_SET)
    for _, image, annotation in samples:
        height, width = image.shape[:2]
        assert image.ndim == 3 and image.shape[2] == 3
        for obj in annotation["annotations"]:
            x, y, w, h = obj["bbox"]
            assert 0 <= x < x + w <= width and 0 <= y < y + h <= height
            assert 0 <= obj["category_id"] < len(DETECTION_CLASSES)
    assert sum(len(a["annotations"]) for _, _, a in samples) == 29


@pytest.mark.slow
def test_run_stage(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from peft_ext.models.leyolo.tour import run_stage

    class Progress:
        def update(self, n=1, **postfix):
            pass

        def close(self):
            pass

    result = run_stage(tmp_path, lambda total: Progress())
    print(result.metrics)
    assert (tmp_path / "leyolo_detections.png").stat().st_size > 10_000
    assert result.metrics["reload max |Δlogit|"] == 0.0
    assert result.metrics["mAP50-95 after"] > result.metrics["mAP50-95 before"] + 0.3
    assert (tmp_path / "leyolo-nano-skimage" / "model.safetensors").exists()
