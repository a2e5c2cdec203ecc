"""LeYOLO loss: the task-aligned assigner and the three loss terms against a hand computation, label handling."""

import math

import pytest
import torch

from peft_ext.models.leyolo import LeYoloConfig, LeYoloForObjectDetection
from peft_ext.models.leyolo.loss_leyolo import (
    LeYoloDetectionLoss,
    distribution_focal_loss,
    task_aligned_assign,
)

# Four cells of stride 1 with centres (0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5); one object of class 1 with
# box [0, 0, 2, 1], so only the first two cells are inside it.
ANCHORS = torch.tensor([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5]])
GT_BOX = [0.0, 0.0, 2.0, 1.0]
# cell 0 predicts the object exactly, cell 1 predicts [0, 0, 1, 1], cells 2 and 3 predict boxes elsewhere
PRED_BOXES = torch.tensor([[[0.0, 0, 2, 1], [0, 0, 1, 1], [0, 1, 1, 2], [1, 1, 2, 2]]])


def hand_ciou_cell1():
    """CIoU([0,0,1,1], [0,0,2,1]) from the CIoU definition: IoU 1/2, centre distance^2 1/4, enclosing diagonal^2 5,
    v = 4/pi^2 (atan 2 - atan 1)^2, alpha = v / (1 - IoU + v)."""
    iou = 0.5
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    return iou - (0.25 / 5 + v * v / (1 - iou + v))


def test_assigner_matches_the_hand_computation():
    scores = torch.full((1, 4, 2), 0.5)
    target_boxes, target_scores, foreground, _ = task_aligned_assign(
        scores, PRED_BOXES, ANCHORS, torch.tensor([[1]]), torch.tensor([[GT_BOX]]), torch.tensor([[True]]),
        topk=2, alpha=0.5, beta=6.0,
    )  # fmt: skip
    assert foreground.tolist() == [[True, True, False, False]]
    # t = s^0.5 u^6: t0 = sqrt(.5) * 1, t1 = sqrt(.5) * u1^6; normalized t_hat = t / max t * max u = (1, u1^6)
    u1 = hand_ciou_cell1()
    expected = torch.tensor([[[0, 1.0], [0, u1**6], [0, 0], [0, 0]]])
    torch.testing.assert_close(target_scores, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(target_boxes[0, :2], torch.tensor([GT_BOX, GT_BOX]))


def test_assigner_topk_and_shared_cells():
    scores = torch.full((1, 4, 2), 0.5)
    # topk=1: only the best-aligned cell (0) is positive
    _, _, foreground, _ = task_aligned_assign(
        scores, PRED_BOXES, ANCHORS, torch.tensor([[1]]), torch.tensor([[GT_BOX]]), torch.tensor([[True]]),
        topk=1, alpha=0.5, beta=6.0,
    )  # fmt: skip
    assert foreground.tolist() == [[True, False, False, False]]
    # two objects containing cell 0: it goes to the one its predicted box overlaps most ([0,0,2,1] itself)
    gt_boxes = torch.tensor([[GT_BOX, [0.0, 0.0, 1.0, 2.0]]])
    _, target_scores, foreground, object_index = task_aligned_assign(
        scores, PRED_BOXES, ANCHORS, torch.tensor([[1, 0]]), gt_boxes, torch.tensor([[True, True]]),
        topk=2, alpha=0.5, beta=6.0,
    )  # fmt: skip
    assert object_index[0, 0].item() == 0 and target_scores[0, 0, 1] > 0 and target_scores[0, 0, 0] == 0
    assert object_index[0, 2].item() == 1 and foreground[0, 2]


def test_loss_matches_the_hand_computation():
    config = LeYoloConfig(num_labels=2, reg_max=4, assigner_topk=2)
    loss_function = LeYoloDetectionLoss(config)
    logits = torch.zeros(1, 4, 2, requires_grad=True)  # every score 0.5: BCE(0, y) = log 2 for any y
    distribution = torch.zeros(1, 4, 4, 4, requires_grad=True)  # uniform bins: each DFL side costs log 4
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.25, 1.0, 0.5]])}]  # [0,0,2,1]
    loss, terms = loss_function(
        logits, distribution, PRED_BOXES, ANCHORS, torch.ones(4, 1), (2, 2), labels
    )
    u1 = hand_ciou_cell1()
    score_sum = 1 + u1**6  # the two positive cells' targets
    hand = {
        "loss_cls": 0.5 * 8 * math.log(2) / score_sum,
        "loss_box": 7.5 * ((1 - 1) * 1 + (1 - u1) * u1**6) / score_sum,
        "loss_dfl": 1.5 * (1 * math.log(4) + u1**6 * math.log(4)) / score_sum,
    }
    for name, value in hand.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert loss.item() == pytest.approx(sum(hand.values()), rel=1e-4)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and distribution.grad.abs().sum() > 0


def test_distribution_focal_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 4]))
    target = torch.tensor([[1.25, 0.0, 2.5, 2.99]])
    # 1.25: .75 CE(bin 1) + .25 CE(bin 2), etc.
    sides = [
        0.75 * -math.log(0.2) + 0.25 * -math.log(0.3),
        -math.log(0.1),
        0.5 * -math.log(0.3) + 0.5 * -math.log(0.4),
        0.01 * -math.log(0.3) + 0.99 * -math.log(0.4),
    ]
    assert distribution_focal_loss(logits, target).item() == pytest.approx(sum(sides) / 4, rel=1e-5)


def tiny_model():
    torch.manual_seed(0)
    return LeYoloForObjectDetection(LeYoloConfig.from_variant("nano", num_labels=3))


def test_empty_labels_give_a_classification_only_loss_with_gradients():
    model = tiny_model()
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    outputs = model(torch.rand(2, 3, 64, 64), labels=[empty, empty])
    assert outputs.loss_dict["loss_box"] == 0 and outputs.loss_dict["loss_dfl"] == 0
    assert outputs.loss > 0 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_boxes_outside_the_image_are_clipped_or_dropped():
    model = tiny_model().eval()
    pixel_values = torch.rand(1, 3, 64, 64)
    inside = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0]])}]
    # the same object drawn twice as wide to the left (clipped back to [0, 0.5]) plus one entirely outside
    sticking_out = [{"class_labels": torch.tensor([1, 2]),
                     "boxes": torch.tensor([[0.0, 0.5, 1.0, 1.0], [1.5, 1.5, 0.2, 0.2]])}]  # fmt: skip
    with torch.no_grad():
        reference, clipped = model(pixel_values, labels=inside), model(pixel_values, labels=sticking_out)
    assert clipped.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)


def test_label_errors_name_the_problem():
    model = tiny_model()
    pixel_values = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"`class_labels` must be in \[0, 3\)"):
        model(pixel_values, labels=[{"class_labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    with pytest.raises(ValueError, match="1 class labels but 2 boxes"):
        model(pixel_values, labels=[{"class_labels": torch.tensor([0]), "boxes": torch.rand(2, 4)}])
    with pytest.raises(ValueError, match="'class_labels' and 'boxes'"):
        model(pixel_values, labels=[{"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="2 label dicts for a batch of 1"):
        model(pixel_values, labels=[{"class_labels": [], "boxes": []}] * 2)


@pytest.mark.slow
def test_nano_overfits_a_few_labelled_photos():
    pytest.importorskip("skimage")
    pytest.importorskip("pycocotools")
    from peft_ext.models.leyolo import LeYoloImageProcessor
    from peft_ext.models.leyolo.tour import (
        DETECTION_CLASSES,
        detection_map,
        skimage_detection_set,
        train_detector,
    )

    samples = skimage_detection_set()
    processor = LeYoloImageProcessor(size=160)
    batch = processor([image for _, image, _ in samples], annotations=[a for _, _, a in samples], return_tensors="pt")
    torch.manual_seed(0)
    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("nano", id2label=dict(enumerate(DETECTION_CLASSES))))
    before = detection_map(model.eval(), processor, samples)["map_50"]  # large objects match by chance
    train_detector(model, batch["pixel_values"], batch["labels"], steps=300, learning_rate=5e-3, mirror=False)
    after = detection_map(model, processor, samples)["map_50"]
    assert before < 0.5 and after >= 0.9, (before, after)
