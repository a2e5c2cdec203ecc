"""Offline `evaluate` metric modules of LeYOLO: `load_coco_map()` loads the COCO mAP metric shipped in this folder."""

from pathlib import Path

COCO_MAP_SCRIPT = Path(__file__).with_name("coco_detection_map.py")


def load_coco_map(**kwargs):
    """`evaluate.load` of the COCO detection mAP metric from the package (no Hub access needed)."""
    import evaluate

    return evaluate.load(str(COCO_MAP_SCRIPT), **kwargs)
