"""Train or fine-tune a LeYOLO detector with `Trainer` on a COCO-format dataset.

    python examples/leyolo_train.py --annotations_file train.json --images_dir images/ --output_dir out/leyolo
    python examples/leyolo_train.py --model_name_or_path ./leyolo-nano-converted --annotations_file train.json \
        --images_dir images/ --output_dir out/ft --max_steps 2000 --learning_rate 1e-3
    python examples/leyolo_train.py --output_dir out/demo      # offline demo: scikit-image's photos, 5 classes

The annotations file is COCO detection json ("images" with "id" and "file_name", "annotations" with "image_id",
"bbox" [x, y, w, h] in pixels and "category_id", "categories" with "id" and "name"); category ids are mapped to
contiguous class indices in sorted order and their names become `id2label`. `--eval_annotations_file` (same format)
gives a held-out set; without it the training images are evaluated (a memorization check, say so when you report
it). Training images get box-preserving augmentations: horizontal flip, a random crop keeping at least
`--min_crop` of each side (boxes are cut to the crop; boxes left with less than a fifth of their area are dropped),
and brightness / contrast jitter. Evaluation reports COCO mAP (pycocotools, through peft-ext's offline `evaluate`
module) before and after training. Every `TrainingArguments` flag works (`--max_steps`, `--learning_rate`,
`--per_device_train_batch_size`, `--use_cpu`, ...), and so does `accelerate launch`.

Several processes (data parallel; see the README's "Scaling out" for the DeepSpeed configs):

    accelerate launch --multi_gpu --num_processes 8 examples/leyolo_train.py --sync_batch_norm ...   # GPUs
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 examples/leyolo_train.py \
        --sync_batch_norm --use_cpu ...                                                             # CPU, gloo

Each process normalizes its own images with its BatchNorms' batch statistics unless `--sync_batch_norm`, which
computes them over the global batch (torch's `SyncBatchNorm` on CUDA, `DistributedBatchNorm2d` on CPU): at a few
images per process the per-process statistics are noisy. The loss is normalized per process (by the sum of that
process's target scores, as in YOLOv8), so N processes optimize the mean of N losses, each over one process's
images, not the loss of the global batch taken as one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from peft_ext.models.leyolo import (
    LeYoloConfig,
    LeYoloForObjectDetection,
    LeYoloImageProcessor,
    convert_sync_batch_norm,
)
from peft_ext.models.leyolo.metrics import load_coco_map
from peft_ext.models.leyolo.tour import DETECTION_CLASSES, skimage_detection_set


@dataclass
class ScriptArguments:
    annotations_file: str | None = field(default=None, metadata={"help": "COCO json; default: the offline demo set."})
    images_dir: str | None = field(default=None, metadata={"help": "Folder the json's file_name entries are in."})
    eval_annotations_file: str | None = field(default=None, metadata={"help": "Held-out COCO json (same images_dir)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved LeYOLO to fine-tune; else new."})
    variant: str = field(default="nano", metadata={"help": "nano, small, medium or large, for a new model."})
    image_size: int = field(default=640, metadata={"help": "Letterbox size (a multiple of 32)."})
    min_crop: float = field(default=0.6, metadata={"help": "Random crops keep at least this share of each side."})
    augment: bool = field(default=True, metadata={"help": "Box-preserving augmentations on the training images."})
    score_threshold: float = field(default=0.001, metadata={"help": "Detection threshold for the mAP evaluation."})
    sync_batch_norm: bool = field(default=False, metadata={"help": "BatchNorm statistics over all processes' images."})

    def __post_init__(self):
        if (self.annotations_file is None) != (self.images_dir is None):
            raise ValueError("`annotations_file` and `images_dir` go together (or neither, for the demo set).")
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"`image_size` must be a positive multiple of 32, got {self.image_size}.")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"`min_crop` must be in (0, 1], got {self.min_crop}.")


def load_coco(annotations_file, images_dir, categories=None):
    """[(image uint8 RGB, boxes (M, 4) xyxy pixels, class indices (M,))] and the category names, in index order.
    `categories` (category id -> index) fixes the mapping, so that an evaluation file uses the training one."""
    coco = json.loads(Path(annotations_file).read_text())
    if categories is None:
        categories = {category["id"]: index for index, category in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    names = {category["id"]: category["name"] for category in coco["categories"]}
    by_image = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        if annotation["category_id"] not in categories:
            raise ValueError(f"Annotation {annotation.get('id')} has category {annotation['category_id']}, unknown.")
        by_image[annotation["image_id"]].append(annotation)
    samples = []
    for image in coco["images"]:
        pixels = np.array(Image.open(Path(images_dir) / image["file_name"]).convert("RGB"))
        objects = by_image[image["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)], dtype=np.float32)
        samples.append((pixels, boxes.reshape(-1, 4), np.array([categories[a["category_id"]] for a in objects], dtype=np.int64)))
    labels = [names[category_id] for category_id, _ in sorted(categories.items(), key=lambda item: item[1])]
    return samples, labels, categories


def demo_samples():
    samples = []
    for _, image, annotation in skimage_detection_set():
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotation["annotations"])],
                         dtype=np.float32)  # fmt: skip
        samples.append((image, boxes, np.array([a["category_id"] for a in annotation["annotations"]], dtype=np.int64)))
    return samples, list(DETECTION_CLASSES)


def augment(image, boxes, classes, rng, min_crop):
    """Horizontal flip, random crop (boxes cut to it, those keeping < 1/5 of their area dropped), brightness and
    contrast jitter. Returns the new image, boxes (xyxy pixels of the new image) and classes."""
    height, width = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes = np.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), axis=1)
    crop_width = int(round(width * rng.uniform(min_crop, 1)))
    crop_height = int(round(height * rng.uniform(min_crop, 1)))
    left, top = int(rng.integers(0, width - crop_width + 1)), int(rng.integers(0, height - crop_height + 1))
    image = image[top : top + crop_height, left : left + crop_width]
    shifted = boxes - np.array([left, top, left, top], dtype=np.float32)
    cut = np.clip(shifted, 0, [crop_width, crop_height, crop_width, crop_height])
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    keep = area(cut) >= 0.2 * np.maximum(area(shifted), 1e-9)
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    image = np.clip(image.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), cut[keep].astype(np.float32), classes[keep]


def to_annotation(boxes, classes):
    return {"annotations": [{"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "category_id": int(c)}
                            for (x1, y1, x2, y2), c in zip(boxes, classes)]}  # fmt: skip


class DetectionDataset(torch.utils.data.Dataset):
    def __init__(self, samples, processor, augment_with=None, seed=0):
        self.samples, self.processor, self.augment_with = samples, processor, augment_with
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, boxes, classes = self.samples[index]
        if self.augment_with is not None:
            image, boxes, classes = augment(image, boxes, classes, self.rng, self.augment_with)
        encoded = self.processor(image, annotations=to_annotation(boxes, classes), return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"][0], "labels": encoded["labels"][0]}


def collate(batch):
    return {"pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "labels": [{"class_labels": item["labels"]["class_labels"], "boxes": item["labels"]["boxes"]} for item in batch]}  # fmt: skip


@torch.no_grad()
def evaluate_map(model, processor, samples, threshold, batch_size=8):
    model.eval()
    predictions, references = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = processor([image for image, _, _ in chunk], return_tensors="pt").to(model.device)
        outputs = model(**inputs)
        detections = processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=[image.shape[:2] for image, _, _ in chunk]
        )
        for detection, (_, boxes, classes) in zip(detections, chunk):
            predictions.append({key: detection[key].tolist() for key in ("boxes", "scores", "labels")})
            references.append({"boxes": boxes.tolist(), "labels": classes.tolist()})
    return load_coco_map().compute(predictions=predictions, references=references)


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    if args.annotations_file is None:
        train_samples, label_names = demo_samples()
        eval_samples = train_samples
    else:
        train_samples, label_names, categories = load_coco(args.annotations_file, args.images_dir)
        eval_samples = (load_coco(args.eval_annotations_file, args.images_dir, categories)[0]
                        if args.eval_annotations_file else train_samples)  # fmt: skip
    id2label = dict(enumerate(label_names))
    if args.model_name_or_path:
        model = LeYoloForObjectDetection.from_pretrained(
            args.model_name_or_path, id2label=id2label, label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,
        )  # fmt: skip
    else:
        model = LeYoloForObjectDetection(LeYoloConfig.from_variant(args.variant, id2label=id2label))
    if args.sync_batch_norm:
        model = convert_sync_batch_norm(model, training_args.device)
    processor = LeYoloImageProcessor(size=args.image_size)
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=DetectionDataset(train_samples, processor, args.min_crop if args.augment else None, training_args.seed),
        eval_dataset=DetectionDataset(eval_samples, processor),
        data_collator=collate,
    )
    before = evaluate_map(model, processor, eval_samples, args.score_threshold)
    trainer.train()
    after = evaluate_map(model, processor, eval_samples, args.score_threshold)
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    held_out = "held-out" if args.eval_annotations_file else "training images (memorization check)"
    print(f"mAP50-95 on {held_out}: {before['map']:.3f} -> {after['map']:.3f}; "
          f"mAP50 {before['map_50']:.3f} -> {after['map_50']:.3f}; eval loss {eval_loss:.3f}")  # fmt: skip
    if not math.isfinite(eval_loss):
        raise SystemExit("The evaluation loss is not finite.")


if __name__ == "__main__":
    main()
