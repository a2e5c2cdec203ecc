"""Box operations and non-maximum suppression in plain, vectorized torch (no torchvision).

Boxes are (..., 4) tensors, either corners (x1, y1, x2, y2) or centre form (cx, cy, w, h).
"""

from __future__ import annotations

import math

import torch

# Guards divisions by an empty union or a zero-height box, as in the YOLOv8 reference implementation.
_EPS = 1e-7


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every box of `boxes1` (N, 4) with every box of `boxes2` (M, 4), corners form: (N, M)."""
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return intersection / union.clamp(min=_EPS)


def complete_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Elementwise Complete IoU (Zheng et al., 2020, Eq. 9-11) of corner boxes of the same shape (..., 4):

        CIoU = IoU - rho^2(b1, b2) / c^2 - alpha * v,   v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / h1))^2,
        alpha = v / (1 - IoU + v)  (treated as a constant in the gradient, as in the paper and YOLOv8),

    with rho the distance between the centres and c the diagonal of the smallest enclosing box.
    """
    width1, height1 = boxes1[..., 2] - boxes1[..., 0], boxes1[..., 3] - boxes1[..., 1] + _EPS
    width2, height2 = boxes2[..., 2] - boxes2[..., 0], boxes2[..., 3] - boxes2[..., 1] + _EPS
    intersection = (torch.minimum(boxes1[..., 2], boxes2[..., 2]) - torch.maximum(boxes1[..., 0], boxes2[..., 0])).clamp(
        min=0
    ) * (torch.minimum(boxes1[..., 3], boxes2[..., 3]) - torch.maximum(boxes1[..., 1], boxes2[..., 1])).clamp(min=0)
    union = width1 * height1 + width2 * height2 - intersection + _EPS
    iou = intersection / union
    enclosing_width = torch.maximum(boxes1[..., 2], boxes2[..., 2]) - torch.minimum(boxes1[..., 0], boxes2[..., 0])
    enclosing_height = torch.maximum(boxes1[..., 3], boxes2[..., 3]) - torch.minimum(boxes1[..., 1], boxes2[..., 1])
    diagonal_squared = enclosing_width**2 + enclosing_height**2 + _EPS
    centre_distance_squared = (
        (boxes2[..., 0] + boxes2[..., 2] - boxes1[..., 0] - boxes1[..., 2]) ** 2
        + (boxes2[..., 1] + boxes2[..., 3] - boxes1[..., 1] - boxes1[..., 3]) ** 2
    ) / 4
    aspect_term = (4 / math.pi**2) * (torch.atan(width2 / height2) - torch.atan(width1 / height1)) ** 2
    with torch.no_grad():
        alpha = aspect_term / (aspect_term - iou + (1 + _EPS))
    return iou - (centre_distance_squared / diagonal_squared + aspect_term * alpha)


def _overlapping_pairs(boxes: torch.Tensor, classes: torch.Tensor, iou_threshold: float, chunk: int = 2048):
    """(row, column) index pairs with column < row, same class and IoU above the threshold, computed in row chunks
    so that memory stays O(chunk * N) however many candidates there are."""
    rows, columns = [], []
    for start in range(0, boxes.shape[0], chunk):
        block = pairwise_iou(boxes[start : start + chunk], boxes) > iou_threshold
        block &= classes[start : start + chunk, None] == classes[None, :]
        block &= torch.arange(start, start + block.shape[0])[:, None] > torch.arange(boxes.shape[0])[None, :]
        row, column = block.nonzero(as_tuple=True)
        rows.append(row + start)
        columns.append(column)
    return torch.cat(rows), torch.cat(columns)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy class-aware non-maximum suppression: the indices of the kept boxes, by decreasing score.

    Greedy NMS keeps box i (in score order) iff no kept box j before it of the same class overlaps it by more
    than `iou_threshold`. That rule defines `keep` recursively and has exactly one solution; it is found as the
    fixed point of keep <- not any_j(overlap[i, j] and keep[j]) started from "keep all", which settles position
    i by iteration i at the latest and in practice within a handful of sparse, vectorized passes.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    rows, columns = _overlapping_pairs(boxes[order].float(), classes[order], iou_threshold)
    keep = torch.ones(order.shape[0], dtype=torch.bool, device=boxes.device)
    while True:
        suppressed = torch.zeros_like(keep).index_put_((rows,), keep[columns], accumulate=True)
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return order[keep]
        keep = new_keep
