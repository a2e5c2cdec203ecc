"""Tour stage of LeYOLO: fine-tune a detector on a small real-image set built from scikit-image's sample photos,
evaluate mAP offline, save, reload, compare, and draw the detections on a photo."""

from __future__ import annotations

import numpy as np

# Objects in scikit-image's sample images, (x1, y1, x2, y2) in pixels. The single-object boxes were drawn by hand;
# the horse's is the extent of its silhouette; the 24 coins' come from the watershed segmentation of
# scikit-image's "coins" gallery example, checked by eye.
DETECTION_CLASSES = ("person", "cat", "cup", "coin", "horse")
_COINS = [
    (305, 16, 365, 72), (132, 28, 179, 74), (192, 30, 240, 73), (255, 34, 297, 72), (22, 35, 67, 74),
    (81, 39, 120, 74), (245, 95, 296, 144), (25, 104, 67, 145), (186, 105, 226, 144), (317, 106, 356, 145),
    (84, 108, 122, 145), (134, 110, 173, 145), (315, 156, 380, 218), (189, 170, 237, 217), (251, 172, 297, 217),
    (80, 175, 124, 217), (26, 179, 63, 217), (135, 179, 174, 217), (18, 233, 75, 288), (144, 236, 201, 288),
    (276, 239, 326, 289), (220, 240, 269, 288), (93, 245, 136, 287), (336, 248, 382, 289),
]  # fmt: skip
DETECTION_SET = {
    "astronaut": [("person", (15, 15, 365, 512))],
    "camera": [("person", (0, 55, 305, 512))],
    "chelsea": [("cat", (0, 0, 410, 300))],
    "coffee": [("cup", (175, 15, 420, 320))],
    "coins": [("coin", box) for box in _COINS],
    "horse": [("horse", (18, 9, 389, 313))],
}


def skimage_detection_set():
    """[(name, RGB uint8 image, COCO-format annotation)] for the images of `DETECTION_SET`; class ids index
    `DETECTION_CLASSES`."""
    import skimage.data

    samples = []
    for image_id, (name, objects) in enumerate(DETECTION_SET.items()):
        image = getattr(skimage.data, name)()
        if image.dtype == bool:  # the horse is a binary silhouette
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        annotations = [
            {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": DETECTION_CLASSES.index(label), "iscrowd": 0}
            for label, (x1, y1, x2, y2) in objects
        ]
        samples.append((name, image, {"image_id": image_id, "annotations": annotations}))
    return samples


def flip_batch(pixel_values, labels):
    """Mirror a letterboxed batch left-right, boxes with it (cx -> 1 - cx): a box-preserving augmentation."""
    flipped = []
    for target in labels:
        boxes = target["boxes"].clone()
        boxes[:, 0] = 1 - boxes[:, 0]
        flipped.append({**target, "boxes": boxes})
    return pixel_values.flip(-1), flipped


def train_detector(model, pixel_values, labels, steps, learning_rate, on_step=None, mirror=True, seed=0):
    """Full-batch AdamW with a one-cycle schedule; with `mirror`, a random half of the steps see the mirrored
    batch. Returns the last loss."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        inputs, targets = pixel_values, labels
        if mirror and torch.rand((), generator=generator) < 0.5:
            inputs, targets = flip_batch(pixel_values, labels)
        outputs = model(inputs, labels=targets)
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(outputs)
    model.eval()
    return outputs.loss.item()


def detection_map(model, processor, samples, threshold=0.001):
    """COCO mAP of `model` on `samples` (as `skimage_detection_set` gives them), through the offline metric."""
    import torch

    from .metrics import load_coco_map

    with torch.no_grad():
        outputs = model(**processor([image for _, image, _ in samples], return_tensors="pt"))
    detections = processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[image.shape[:2] for _, image, _ in samples]
    )
    predictions = [{key: detection[key].tolist() for key in ("boxes", "scores", "labels")} for detection in detections]
    references = [
        {"boxes": [[x, y, x + w, y + h] for x, y, w, h in (obj["bbox"] for obj in annotation["annotations"])],
         "labels": [obj["category_id"] for obj in annotation["annotations"]]}
        for _, _, annotation in samples
    ]  # fmt: skip
    return load_coco_map().compute(predictions=predictions, references=references)


def draw_detections(image, detections, path, title):
    """Save `image` with its pipeline detections drawn on it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure, axis = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    axis.imshow(image)
    for detection in detections:
        box = detection["box"]
        axis.add_patch(Rectangle((box["xmin"], box["ymin"]), box["xmax"] - box["xmin"], box["ymax"] - box["ymin"],
                                 fill=False, color="yellow", linewidth=2))  # fmt: skip
        axis.text(box["xmin"] + 3, box["ymin"] + 12, f"{detection['label']} {detection['score']:.2f}",
                  color="black", backgroundcolor="yellow", fontsize=8)  # fmt: skip
    axis.set_title(title, fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


TOUR_IMAGE_SIZE = 128
TOUR_STEPS = 200
TOUR_LEARNING_RATE = 6e-3


def run_stage(out_dir, make_progress):
    """Train LeYOLO-Nano from scratch on the 6 photos (29 objects, 5 classes) of `DETECTION_SET`, evaluate COCO
    mAP on them (a memorization check: there is no held-out split in 6 photos), save, reload and compare, and draw
    the reloaded model's detections on a photo through `pipeline("object-detection")`."""
    import time
    from pathlib import Path

    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
    from transformers.utils import logging

    from peft_ext.tour import StageResult

    from .configuration_leyolo import LeYoloConfig
    from .image_processing_leyolo import LeYoloImageProcessor
    from .modeling_leyolo import LeYoloForObjectDetection, count_gflops

    logging.set_verbosity_error()
    out_dir = Path(out_dir)
    samples = skimage_detection_set()
    processor = LeYoloImageProcessor(size=TOUR_IMAGE_SIZE)
    batch = processor([image for _, image, _ in samples], annotations=[a for _, _, a in samples], return_tensors="pt")
    torch.manual_seed(0)
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("nano", id2label=dict(enumerate(DETECTION_CLASSES))))
    before = detection_map(model.eval(), processor, samples)

    progress = make_progress(TOUR_STEPS)
    start = time.perf_counter()
    final_loss = train_detector(model, batch["pixel_values"], batch["labels"], TOUR_STEPS, TOUR_LEARNING_RATE,
                                on_step=lambda outputs: progress.update(loss=f"{outputs.loss.item():.3f}"))  # fmt: skip
    seconds = time.perf_counter() - start
    progress.close()
    after = detection_map(model, processor, samples)

    model.save_pretrained(out_dir / "leyolo-nano-skimage")
    processor.save_pretrained(out_dir / "leyolo-nano-skimage")
    reloaded = AutoModelForObjectDetection.from_pretrained(out_dir / "leyolo-nano-skimage").eval()
    reloaded_processor = AutoImageProcessor.from_pretrained(out_dir / "leyolo-nano-skimage")
    with torch.no_grad():
        reload_difference = (reloaded(batch["pixel_values"]).logits - model(batch["pixel_values"]).logits).abs().max()

    name, image, _ = samples[DETECTION_SET_NAMES.index("coffee")]
    detector = pipeline("object-detection", model=reloaded, image_processor=reloaded_processor)
    detections = detector(image_to_pil(image), threshold=0.3)
    draw_detections(image, detections, out_dir / "leyolo_detections.png",
                    f"LeYOLO-Nano after {TOUR_STEPS} steps on 6 photos: {name}")  # fmt: skip
    metrics = {
        "mAP50-95 before": round(before["map"], 3),
        "mAP50-95 after": round(after["map"], 3),
        "mAP50 after": round(after["map_50"], 3),
        "final loss": round(final_loss, 3),
        "train seconds": round(seconds, 1),
        "reload max |Δlogit|": float(reload_difference),
        "parameters": model.num_parameters(),
        "GFLOPs @640 (official count)": round(count_gflops(model.fuse("ultralytics"), 640), 3),
        "detections on the photo": ", ".join(f"{d['label']} {d['score']:.2f}" for d in detections) or "none",
    }
    return StageResult(
        title="LeYOLO: object detection",
        metrics=metrics,
        figures=["leyolo_detections.png"],
        summary=(f"LeYOLO-Nano trained from scratch for {TOUR_STEPS} full-batch steps on scikit-image's photos "
                 f"(memorization check, no held-out split): mAP50-95 {before['map']:.3f} -> {after['map']:.3f}."),
    )  # fmt: skip


DETECTION_SET_NAMES = tuple(DETECTION_SET)


def image_to_pil(image):
    from PIL import Image

    return Image.fromarray(image)
