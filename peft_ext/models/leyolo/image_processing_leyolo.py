"""Image processor of LeYOLO: letterbox to a fixed size, rescale to [0, 1], and detection post-processing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .box_ops import batched_nms, cxcywh_to_xyxy, xyxy_to_cxcywh


def _to_float_rgb(image, index: int) -> torch.Tensor:
    """(3, H, W) float32 in [0, 255] from a PIL image, or an array / tensor HW, HWC or CHW with 1, 3 or 4 channels
    (uint8 in [0, 255], or float in [0, 1]). Grayscale is repeated to RGB; an alpha channel is dropped."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL: its own conversion handles L, P, RGBA, ...
        image = np.asarray(image.convert("RGB"))
    array = torch.from_numpy(np.array(image))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"images[{index}] must be 2-D (grayscale) or 3-D, got shape {tuple(array.shape)}.")
    if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.permute(1, 2, 0)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images[{index}] must have 1, 3 or 4 channels, got shape {tuple(array.shape)}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"images[{index}] is empty (shape {tuple(array.shape)}).")
    if array.dtype == torch.uint8:
        array = array.float()
    elif array.is_floating_point():
        if array.numel() and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"images[{index}] is a float image with values outside [0, 1]; pass uint8 or [0, 1].")
        array = array.float() * 255
    else:
        raise ValueError(f"images[{index}] has dtype {array.dtype}; use uint8 (0-255) or float (0-1).")
    array = array[..., :3] if array.shape[-1] == 4 else array.expand(-1, -1, 3)
    return array.permute(2, 0, 1).contiguous()


class LeYoloImageProcessor(BaseImageProcessor):
    r"""Preprocessing and post-processing for LeYOLO, as the official (Ultralytics) pipeline does them.

    `preprocess` letterboxes each image: it scales it by r = min(H / h, W / w) keeping its aspect ratio (bilinear,
    up or down), centres it on an H x W canvas filled with `pad_value` (114, grey), and rescales to [0, 1]. Any
    image size works; grayscale images are repeated to RGB and alpha channels are dropped. With `annotations`
    (COCO detection format: per image, a dict whose "annotations" list holds {"bbox": [x, y, w, h] in pixels,
    "category_id": class index}), it also returns `labels` as the model takes them: per image "class_labels" and
    normalized (cx, cy, w, h) "boxes" in the letterboxed tensor. Crowd annotations ("iscrowd": 1) are skipped,
    boxes are clipped to the image and those with no area left are dropped.

    `post_process_object_detection` keeps, per cell, its best class if its sigmoid score passes `threshold`,
    applies class-aware greedy NMS (IoU 0.7), keeps the `max_detections` (300) best, and maps the boxes back through
    the letterbox to (x1, y1, x2, y2) pixels of the original image, which requires `target_sizes` and that the
    outputs come from images this processor (with this `size`) prepared.

    Args:
        size (`int` or `dict`): the canvas, an int for a square or {"height": H, "width": W}; multiples of 32.
        pad_value (`int`): the letterbox fill value (0-255).
        rescale_factor (`float`): the factor from 0-255 values to the model's input range.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: int | dict = 640, pad_value: int = 114, rescale_factor: float = 1 / 255, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"`size` must be an int or a dict with 'height' and 'width', got {size!r}.")
        for side in ("height", "width"):
            if not isinstance(size[side], int) or size[side] < 32 or size[side] % 32:
                raise ValueError(f"`size['{side}']` must be a positive multiple of 32, got {size[side]!r}.")
        if not 0 <= pad_value <= 255:
            raise ValueError(f"`pad_value` must be in [0, 255], got {pad_value!r}.")
        self.size = dict(size)
        self.pad_value = pad_value
        self.rescale_factor = rescale_factor

    def letterbox_geometry(self, height: int, width: int) -> tuple[float, int, int, int, int]:
        """(scale r, resized height, resized width, top padding, left padding) for an image of that size."""
        canvas_height, canvas_width = self.size["height"], self.size["width"]
        ratio = min(canvas_height / height, canvas_width / width)
        new_height, new_width = max(round(height * ratio), 1), max(round(width * ratio), 1)
        # Ultralytics rounds the two halves of an odd padding this way (the extra pixel goes bottom / right)
        top, left = round((canvas_height - new_height) / 2 - 0.1), round((canvas_width - new_width) / 2 - 0.1)
        return ratio, new_height, new_width, top, left

    def letterbox(self, image: torch.Tensor) -> torch.Tensor:
        """(3, h, w) in [0, 255] -> (3, H, W) letterboxed canvas in [0, 255]."""
        _, new_height, new_width, top, left = self.letterbox_geometry(*image.shape[-2:])
        resized = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear", align_corners=False)[0]
        canvas = torch.full((3, self.size["height"], self.size["width"]), float(self.pad_value))
        canvas[:, top : top + new_height, left : left + new_width] = resized
        return canvas

    def _annotation_to_labels(self, annotation: dict, height: int, width: int, index: int) -> dict:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("annotations"), list):
            raise ValueError(f"annotations[{index}] must be a dict with an 'annotations' list (COCO detection format).")
        objects = [obj for obj in annotation["annotations"] if not obj.get("iscrowd", 0)]
        boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([obj["category_id"] for obj in objects], dtype=torch.long)
        corners = torch.cat((boxes[:, :2], boxes[:, :2] + boxes[:, 2:]), dim=1)
        corners = torch.minimum(corners.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
        keep = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
        ratio, _, _, top, left = self.letterbox_geometry(height, width)
        canvas = torch.tensor([self.size["width"], self.size["height"]] * 2, dtype=torch.float32)
        letterboxed = (corners[keep] * ratio + torch.tensor([left, top, left, top])) / canvas
        return {
            "class_labels": classes[keep],
            "boxes": xyxy_to_cxcywh(letterboxed),
            "orig_size": torch.tensor([height, width]),
            **({"image_id": torch.tensor([annotation["image_id"]])} if "image_id" in annotation else {}),
        }

    def preprocess(self, images, annotations=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Letterbox and rescale `images` (one image or a list) into `pixel_values` (B, 3, H, W); with
        `annotations` (one per image, COCO detection format), also `labels` for the model's loss."""
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; LeYoloImageProcessor takes `annotations`.")
        if not isinstance(images, (list, tuple)):
            images = [images]
            annotations = None if annotations is None else [annotations]
        if len(images) == 0:
            raise ValueError("`images` is empty.")
        tensors = [_to_float_rgb(image, index) for index, image in enumerate(images)]
        pixel_values = torch.stack([self.letterbox(image) for image in tensors]) * self.rescale_factor
        encoded = BatchFeature(data={"pixel_values": pixel_values.numpy()}, tensor_type=return_tensors)
        if annotations is not None:
            if len(annotations) != len(images):
                raise ValueError(f"Got {len(annotations)} annotations for {len(images)} images.")
            encoded["labels"] = [
                self._annotation_to_labels(annotation, *image.shape[-2:], index)
                for index, (annotation, image) in enumerate(zip(annotations, tensors))
            ]
        return encoded

    def __call__(self, images, annotations=None, return_tensors=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, annotations=annotations, return_tensors=return_tensors, **kwargs)

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.25,
        target_sizes=None,
        iou_threshold: float = 0.7,
        max_detections: int = 300,
        max_candidates: int = 30000,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image, {"scores", "labels", "boxes"}: boxes (x1, y1, x2, y2) in pixels of the original image when
        `target_sizes` (one (height, width) per image) is given, else of the model's input tensor."""
        logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {logits.shape[0]} images.")
        canvas = torch.tensor([self.size["width"], self.size["height"]] * 2, dtype=torch.float32)
        results = []
        for index in range(logits.shape[0]):
            scores, labels = logits[index].float().sigmoid().max(dim=-1)
            keep = (scores > threshold).nonzero()[:, 0]
            keep = keep[scores[keep].argsort(descending=True)[:max_candidates]]
            boxes = cxcywh_to_xyxy(pred_boxes[index, keep].float().cpu()) * canvas
            scores, labels = scores[keep].cpu(), labels[keep].cpu()
            kept = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
            if target_sizes is not None:
                height, width = (int(value) for value in target_sizes[index])
                ratio, _, _, top, left = self.letterbox_geometry(height, width)
                boxes = (boxes - torch.tensor([left, top, left, top])) / ratio
                boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
            results.append({"scores": scores, "labels": labels, "boxes": boxes})
        return results
