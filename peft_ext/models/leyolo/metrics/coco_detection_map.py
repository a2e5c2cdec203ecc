"""COCO detection mAP (pycocotools' COCOeval) as an `evaluate` metric, loadable offline from a file path:

    metric = evaluate.load("path/to/coco_detection_map.py")   # or peft_ext.models.leyolo.metrics.load_coco_map()
    metric.add_batch(predictions=[{"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}],
                     references=[{"boxes": [[x1, y1, x2, y2], ...], "labels": [...]}])
    metric.compute()  # {"map": AP@[.50:.95], "map_50": AP@.50, "map_75", "map_small", "map_medium", "map_large", "mar_100"}

One dict per image, boxes in absolute pixel corners (what `LeYoloImageProcessor.post_process_object_detection`
returns with `target_sizes`). Values are pycocotools' (101-point interpolated AP, area ranges in pixels^2, up to
100 detections per image); -1 where COCOeval has nothing to average (e.g. no object of that size).
"""

import contextlib
import io

import datasets
import evaluate

_STATS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
          "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # fmt: skip


class CocoDetectionMap(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4))
        return evaluate.MetricInfo(
            description="COCO-style mean average precision of object detections (pycocotools COCOeval).",
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=__doc__,
            features=datasets.Features({
                "predictions": {"boxes": boxes, "scores": datasets.Sequence(datasets.Value("float32")),
                                "labels": datasets.Sequence(datasets.Value("int64"))},
                "references": {"boxes": boxes, "labels": datasets.Sequence(datasets.Value("int64"))},
            }),  # fmt: skip
        )

    def _compute(self, predictions, references):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, annotations, detections, categories = [], [], [], set()
        for image_id, (prediction, reference) in enumerate(zip(predictions, references)):
            images.append({"id": image_id})
            for box, label in zip(reference["boxes"], reference["labels"]):
                width, height = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": [box[0], box[1], width, height], "area": width * height, "iscrowd": 0})
                categories.add(int(label))  # fmt: skip
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
                detections.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
                categories.add(int(label))
        if not annotations or not detections:
            # COCOeval cannot load an empty result list: with nothing detected (or nothing to find), AP is 0 (or -1)
            value = 0.0 if annotations else -1.0
            return dict.fromkeys(_STATS, value)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ground_truth = COCO()
            ground_truth.dataset = {"images": images, "annotations": annotations,
                                    "categories": [{"id": c} for c in sorted(categories)]}  # fmt: skip
            ground_truth.createIndex()
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {name: float(value) for name, value in zip(_STATS, evaluation.stats)}
