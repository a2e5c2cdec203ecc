"""YOLOv8's detection loss and task-aligned assigner, as the official LeYOLO code trains with (Ultralytics 8.1).

For a batch, the task-aligned assigner (Feng et al., TOOD, ICCV 2021, Sec. 3.2.1) picks, for each object, the
`topk` cells whose centres lie inside its box and that have the largest alignment

    t = s^alpha * u^beta       s: predicted probability of the object's class,  u: CIoU(pred box, object box),

a cell claimed by several objects going to the one it overlaps most. Each positive cell's classification target
is its object's one-hot class scaled by t / max_t(object) * max_u(object) (TOOD Eq. 9, normalized t-hat); every
other cell's target is all zeros. With S the sum of all targets (at least 1), the loss is

    L = box_gain * sum_pos w (1 - CIoU) / S  +  cls_gain * sum_all BCE(logit, target) / S
        + dfl_gain * sum_pos w DFL / S,

w being the positive cell's summed target, and DFL (Li et al., GFL, NeurIPS 2020, Eq. 6) the cross-entropy of
each side's distribution with the two bins around the true distance, weighted by their linear-interpolation
weights, averaged over the four sides. Departure: Ultralytics returns L times the batch size (its learning rate is
tuned for that); this returns L, the usual per-batch scale for `Trainer` and any optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .box_ops import complete_iou, cxcywh_to_xyxy

_EPS = 1e-9


def labels_to_pixel_corners(labels: list[dict], height: int, width: int, device=None):
    """Per image, (class ids (M,), corner boxes (M, 4) in input pixels) from transformers detection labels
    (normalized cx, cy, w, h): boxes are clipped to the image, those with no area left inside it are dropped."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    targets = []
    for index, target in enumerate(labels):
        if not isinstance(target, dict) or "class_labels" not in target or "boxes" not in target:
            raise ValueError(f"labels[{index}] must be a dict with 'class_labels' and 'boxes'.")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        classes = torch.as_tensor(target["class_labels"], device=device).reshape(-1).long()
        if boxes.shape[0] != classes.shape[0]:
            raise ValueError(f"labels[{index}] has {classes.shape[0]} class labels but {boxes.shape[0]} boxes.")
        corners = torch.minimum((cxcywh_to_xyxy(boxes) * scale).clamp(min=0), scale)
        inside = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
        targets.append((classes[inside], corners[inside]))
    return targets


def pad_targets(targets, device):
    """Stack per-image targets into (B, M) classes, (B, M, 4) boxes and a (B, M) validity mask."""
    max_objects = max((classes.shape[0] for classes, _ in targets), default=0)
    batch = len(targets)
    classes = torch.zeros(batch, max_objects, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, max_objects, 4, device=device)
    valid = torch.zeros(batch, max_objects, dtype=torch.bool, device=device)
    for index, (image_classes, image_boxes) in enumerate(targets):
        count = image_classes.shape[0]
        classes[index, :count], boxes[index, :count], valid[index, :count] = image_classes, image_boxes, True
    return classes, boxes, valid


@torch.no_grad()
def task_aligned_assign(scores, pred_boxes, anchor_points, gt_classes, gt_boxes, gt_valid, topk, alpha, beta):
    """TOOD's assignment (module docstring). All boxes are corners in the same units.

    scores (B, N, C) probabilities, pred_boxes (B, N, 4), anchor_points (N, 2), gt_classes (B, M), gt_boxes
    (B, M, 4), gt_valid (B, M). Returns target boxes (B, N, 4), target scores (B, N, C), foreground mask (B, N)
    and the index of each cell's object (B, N).
    """
    batch, num_anchors, num_classes = scores.shape
    if gt_boxes.shape[1] == 0:
        return (torch.zeros_like(pred_boxes), torch.zeros_like(scores),
                torch.zeros(batch, num_anchors, dtype=torch.bool, device=scores.device),
                torch.zeros(batch, num_anchors, dtype=torch.long, device=scores.device))  # fmt: skip
    # cells whose centre is strictly inside the object (B, M, N)
    offsets = torch.cat(
        (anchor_points[None, None] - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - anchor_points[None, None]), -1
    )
    candidates = (offsets.amin(-1) > _EPS) & gt_valid[..., None]
    class_scores = scores.transpose(1, 2).gather(1, gt_classes[..., None].expand(-1, -1, num_anchors))
    overlaps = complete_iou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(min=0)
    class_scores, overlaps = class_scores * candidates, overlaps * candidates
    alignment = class_scores.pow(alpha) * overlaps.pow(beta)

    top_indices = alignment.topk(min(topk, num_anchors), dim=-1).indices
    in_topk = torch.zeros_like(candidates).scatter_(-1, top_indices, True)
    positive = in_topk & candidates  # (B, M, N)

    # a cell claimed by several objects goes to the one its predicted box overlaps most
    claimed_by_several = positive.sum(1, keepdim=True) > 1
    best_object = F.one_hot(overlaps.argmax(1), gt_boxes.shape[1]).transpose(1, 2).bool()
    positive = torch.where(claimed_by_several, best_object, positive)
    foreground = positive.any(1)
    object_index = positive.to(torch.uint8).argmax(1)  # (B, N)

    target_boxes = gt_boxes.gather(1, object_index[..., None].expand(-1, -1, 4))
    target_classes = gt_classes.gather(1, object_index)
    target_scores = F.one_hot(target_classes, num_classes).to(scores.dtype) * foreground[..., None]

    alignment = alignment * positive
    best_alignment = alignment.amax(-1, keepdim=True)
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)
    normalized = (alignment * best_overlap / (best_alignment + _EPS)).amax(1)  # (B, N)
    return target_boxes, target_scores * normalized[..., None], foreground, object_index


def distribution_focal_loss(distribution_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's DFL: for a target distance y between bins i = floor(y) and i + 1, (i + 1 - y) CE(p, i) +
    (y - i) CE(p, i + 1). `distribution_logits` (K, 4, R), `target` (K, 4) in bin units; returns (K,), the mean
    over the four sides."""
    left = target.long()
    left_weight = left + 1 - target
    log_probs = F.log_softmax(distribution_logits, dim=-1)
    left_nll = -log_probs.gather(-1, left[..., None])[..., 0]
    right_nll = -log_probs.gather(-1, (left + 1)[..., None])[..., 0]
    return (left_nll * left_weight + right_nll * (1 - left_weight)).mean(-1)


class LeYoloDetectionLoss:
    """The loss of the module docstring, from the head's outputs and transformers detection labels."""

    def __init__(self, config):
        self.reg_max = config.reg_max
        self.num_labels = config.num_labels
        self.topk, self.alpha, self.beta = config.assigner_topk, config.assigner_alpha, config.assigner_beta
        self.gains = {"loss_box": config.box_loss_gain, "loss_cls": config.cls_loss_gain, "loss_dfl": config.dfl_loss_gain}

    def __call__(self, logits, distribution, boxes_in_strides, anchor_points, anchor_strides, image_size, labels):
        """logits (B, N, C); distribution (B, N, 4, R) logits; boxes_in_strides (B, N, 4) predicted corners in units
        of each cell's stride; anchor_points (N, 2) cell centres in the same units; anchor_strides (N, 1);
        image_size (H, W) of the input tensor; labels as `LeYoloForObjectDetection.forward` takes them."""
        if len(labels) != logits.shape[0]:
            raise ValueError(f"Got {len(labels)} label dicts for a batch of {logits.shape[0]} images.")
        targets = labels_to_pixel_corners(labels, *image_size, device=logits.device)
        gt_classes, gt_boxes, gt_valid = pad_targets(targets, logits.device)
        if gt_valid.any() and (gt_classes[gt_valid].min() < 0 or gt_classes[gt_valid].max() >= self.num_labels):
            raise ValueError(
                f"`class_labels` must be in [0, {self.num_labels}) (num_labels), got values from "
                f"{gt_classes[gt_valid].min().item()} to {gt_classes[gt_valid].max().item()}."
            )
        target_boxes, target_scores, foreground, _ = task_aligned_assign(
            logits.detach().sigmoid(), boxes_in_strides.detach() * anchor_strides, anchor_points * anchor_strides,
            gt_classes, gt_boxes, gt_valid, self.topk, self.alpha, self.beta,
        )  # fmt: skip
        score_sum = target_scores.sum().clamp(min=1)
        terms = {"loss_cls": F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum") / score_sum}
        if foreground.any():
            weight = target_scores.sum(-1)[foreground]
            target_in_strides = target_boxes / anchor_strides
            ciou = complete_iou(boxes_in_strides[foreground], target_in_strides[foreground])
            terms["loss_box"] = ((1 - ciou) * weight).sum() / score_sum
            anchors = anchor_points.expand_as(boxes_in_strides[..., :2])[foreground]
            target_box = target_in_strides[foreground]
            target_distances = torch.cat((anchors - target_box[:, :2], target_box[:, 2:] - anchors), -1)
            target_distances = target_distances.clamp(0, self.reg_max - 1 - 0.01)
            terms["loss_dfl"] = (distribution_focal_loss(distribution[foreground], target_distances) * weight).sum() / score_sum
        else:
            # keep the graph connected (zero gradient) so that every parameter gets a gradient in every step
            terms["loss_box"] = terms["loss_dfl"] = (boxes_in_strides.sum() + distribution.sum()) * 0.0
        weighted = {name: terms[name] * gain for name, gain in self.gains.items()}
        return sum(weighted.values()), {name: value.detach() for name, value in weighted.items()}
