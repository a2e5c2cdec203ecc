"""LeYOLO image processor and box operations: letterbox, annotations, bad images, NMS against brute force."""

import numpy as np
import pytest
import torch
from PIL import Image

from peft_ext.models.leyolo import LeYoloImageProcessor
from peft_ext.models.leyolo.box_ops import (
    batched_nms,
    complete_iou,
    cxcywh_to_xyxy,
    pairwise_iou,
    xyxy_to_cxcywh,
)


def brute_force_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def brute_force_nms(boxes, scores, classes, threshold):
    kept = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(classes[j] != classes[i] or brute_force_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def random_boxes(count, seed):
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(count, 2, generator=generator) * 100
    return torch.cat((top_left, top_left + torch.rand(count, 2, generator=generator) * 50 + 1), 1)


def test_box_conversions_round_trip_and_pairwise_iou_against_brute_force():
    boxes = random_boxes(30, seed=0)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    torch.testing.assert_close(xyxy_to_cxcywh(torch.tensor([[1.0, 2.0, 5.0, 10.0]])), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    iou = pairwise_iou(boxes[:10], boxes)
    expected = torch.tensor([[brute_force_iou(a.tolist(), b.tolist()) for b in boxes] for a in boxes[:10]])
    torch.testing.assert_close(iou, expected, atol=1e-6, rtol=1e-5)


def test_complete_iou_by_hand():
    # [0,0,2,2] vs [1,0,3,2]: IoU 2/6; centres 1 apart, enclosing box 3x2 (c^2 = 13); same aspect ratio (v = 0)
    ciou = complete_iou(torch.tensor([0.0, 0, 2, 2]), torch.tensor([1.0, 0, 3, 2]))
    assert ciou.item() == pytest.approx(2 / 6 - 1 / 13, abs=1e-6)
    assert complete_iou(torch.tensor([1.0, 1, 4, 3]), torch.tensor([1.0, 1, 4, 3])).item() == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_batched_nms_equals_brute_force(seed, threshold):
    boxes = random_boxes(200, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    scores = torch.rand(200, generator=generator)
    classes = torch.randint(0, 3, (200,), generator=generator)
    kept = batched_nms(boxes, scores, classes, threshold)
    assert kept.tolist() == brute_force_nms(boxes.tolist(), scores.tolist(), classes.tolist(), threshold)


def test_batched_nms_chains_and_classes():
    # a chain: b suppresses nothing once a has suppressed it, so c survives (greedy NMS, not "fast NMS")
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.4).tolist() == [0, 2, 3]
    assert batched_nms(boxes[:0], scores[:0], torch.zeros(0, dtype=torch.long), 0.5).tolist() == []


def test_letterbox_places_the_image_and_pads_with_114():
    processor = LeYoloImageProcessor(size=64)
    image = np.full((20, 40, 3), 200, dtype=np.uint8)  # wide: scaled x1.6 to 64x32, 16 rows of padding above/below
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    assert torch.allclose(pixel_values[0, :, :16], torch.tensor(114 / 255))
    assert torch.allclose(pixel_values[0, :, 48:], torch.tensor(114 / 255))
    assert torch.allclose(pixel_values[0, :, 16:48], torch.tensor(200 / 255))
    assert processor.letterbox_geometry(20, 40) == (1.6, 32, 64, 16, 0)
    # odd padding: the extra row goes to the bottom, as in Ultralytics
    assert processor.letterbox_geometry(33, 64)[3] == 15


@pytest.mark.parametrize(
    "image",
    [
        np.full((37, 23), 90, dtype=np.uint8),  # grayscale, odd size
        np.full((37, 23, 1), 90, dtype=np.uint8),
        np.full((3, 37, 23), 90, dtype=np.uint8),  # channels first
        np.full((37, 23, 4), 90, dtype=np.uint8),  # RGBA: alpha dropped
        np.full((37, 23, 3), 90 / 255, dtype=np.float32),  # float in [0, 1]
        Image.new("L", (23, 37), 90),
        Image.new("RGBA", (23, 37), (90, 90, 90, 0)),
    ],
)
def test_grayscale_rgba_and_odd_sizes_become_the_same_rgb_input(image):
    reference = LeYoloImageProcessor(size=64)(np.full((37, 23, 3), 90, dtype=np.uint8), return_tensors="pt")
    pixel_values = LeYoloImageProcessor(size=64)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, reference["pixel_values"], atol=1e-6, rtol=0)


def test_bad_images_and_sizes_give_clear_errors():
    processor = LeYoloImageProcessor(size=64)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        processor(np.zeros((10, 10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="values outside"):
        processor(np.full((10, 10, 3), 7.0, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        processor(np.zeros((10, 10, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        processor(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        LeYoloImageProcessor(size=100)
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_object_detection(
            {"logits": torch.zeros(2, 84, 3), "pred_boxes": torch.zeros(2, 84, 4)}, target_sizes=[(10, 10)]
        )


def test_annotations_become_normalized_letterboxed_labels():
    processor = LeYoloImageProcessor(size=64)
    annotation = {"image_id": 7, "annotations": [
        {"bbox": [10, 5, 20, 10], "category_id": 2},
        {"bbox": [30, 0, 30, 30], "category_id": 1},  # sticks out to the right and bottom: clipped to 40x20
        {"bbox": [50, 50, 5, 5], "category_id": 0},  # entirely outside: dropped
        {"bbox": [0, 0, 40, 20], "category_id": 0, "iscrowd": 1},  # crowd: skipped
    ]}  # fmt: skip
    labels = processor(np.zeros((20, 40, 3), dtype=np.uint8), annotations=annotation, return_tensors="pt")["labels"]
    # scale 1.6, 16 rows of padding on top: [10,5,30,15] -> [16,24,48,40]; [30,0,40,20] -> [48,16,64,48]
    assert labels[0]["class_labels"].tolist() == [2, 1]
    expected = xyxy_to_cxcywh(torch.tensor([[16.0, 24, 48, 40], [48, 16, 64, 48]]) / 64)
    torch.testing.assert_close(labels[0]["boxes"], expected)
    empty = processor(np.zeros((20, 40, 3), dtype=np.uint8), annotations={"annotations": []})["labels"][0]
    assert empty["boxes"].shape == (0, 4) and empty["class_labels"].shape == (0,)
    with pytest.raises(ValueError, match="COCO detection format"):
        processor(np.zeros((20, 40, 3), dtype=np.uint8), annotations={"boxes": []})


def test_post_processing_maps_boxes_back_to_the_original_image():
    processor = LeYoloImageProcessor(size=64)
    # two cells: a confident class-1 box at [16,24,48,40] of the 64x64 canvas and a weak one
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 0, 1], logits[0, 1, 0] = 3.0, -3.0
    pred_boxes = xyxy_to_cxcywh(torch.tensor([[[16.0, 24, 48, 40], [0, 0, 8, 8]]]) / 64)
    outputs = {"logits": logits, "pred_boxes": pred_boxes}
    (result,) = processor.post_process_object_detection(outputs, threshold=0.25, target_sizes=[(20, 40)])
    assert result["labels"].tolist() == [1]
    assert result["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    torch.testing.assert_close(result["boxes"], torch.tensor([[10.0, 5, 30, 15]]))
    (canvas,) = processor.post_process_object_detection(outputs, threshold=0.01)
    assert len(canvas["labels"]) == 2 and canvas["boxes"][0].tolist() == [16, 24, 48, 40]


def test_post_processing_caps_detections_and_suppresses_duplicates():
    processor = LeYoloImageProcessor(size=64)
    boxes = xyxy_to_cxcywh(random_boxes(50, seed=3) / 160)
    logits = torch.randn(1, 50, 2, generator=torch.Generator().manual_seed(0))
    outputs = {"logits": logits, "pred_boxes": boxes[None]}
    (result,) = processor.post_process_object_detection(outputs, threshold=0.0, max_detections=5)
    assert len(result["scores"]) == 5
    assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
    (all_kept,) = processor.post_process_object_detection(outputs, threshold=0.0, iou_threshold=0.7)
    scores, classes = logits[0].sigmoid().max(-1)
    expected = brute_force_nms((cxcywh_to_xyxy(boxes) * 64).tolist(), scores.tolist(), classes.tolist(), 0.7)
    assert len(all_kept["scores"]) == len(expected)


def test_save_and_load_processor(tmp_path):
    from transformers import AutoImageProcessor

    from peft_ext.models.leyolo import LeYoloConfig

    LeYoloConfig.from_variant("nano").save_pretrained(tmp_path)
    LeYoloImageProcessor(size={"height": 96, "width": 128}, pad_value=0).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LeYoloImageProcessor
    assert loaded.size == {"height": 96, "width": 128} and loaded.pad_value == 0
