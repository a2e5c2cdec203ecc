"""Configuration of LeYOLO object detectors."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

# The two layer tables of the official code (modeling_leyolo.LAYER_TABLES): Small is the Nano table at width
# 1.33, Large is the Medium model evaluated at 768 pixels.
ARCHITECTURES = ("nano", "medium")
VARIANTS = {
    "nano": {"architecture": "nano", "width_multiple": 1.0, "image_size": 640},
    "small": {"architecture": "nano", "width_multiple": 1.33, "image_size": 640},
    "medium": {"architecture": "medium", "width_multiple": 1.33, "image_size": 640},
    "large": {"architecture": "medium", "width_multiple": 1.33, "image_size": 768},
}

COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@strict
class LeYoloConfig(PreTrainedConfig):
    r"""Configuration of a LeYOLO detector: "LeYOLO, New Scalable and Efficient CNN Architecture for Object
    Detection" (Hollard, Mohimont, Gaveau, Steffenel, 2024, https://arxiv.org/abs/2406.14239).

    LeYOLO keeps YOLOv8's anchor-free detection (one prediction per cell of the stride-8, 16 and 32 feature maps,
    each box a distance (l, t, r, b) from the cell centre read as the expectation of a `reg_max`-bin softmax,
    the Distribution Focal Loss parametrization) and replaces the network: a stem and a MobileNet-style
    inverted-bottleneck backbone (paper Sec. 3.1), a Fast Pyramidal Architecture Network neck (FPAN, Sec. 3.2)
    and a Decoupled Network-in-Network head (DNiN, Sec. 3.3). Use `LeYoloConfig.from_variant("nano")` for the
    published sizes.

    Args:
        architecture (`str`): the official layer table, "nano" (also used by Small) or "medium" (also Large).
        width_multiple (`float`): channel multiplier; every channel count c becomes ceil(min(c, max_channels) *
            width_multiple / 8) * 8, as in the official model builder. 1.0 for Nano, 1.33 for the others.
        max_channels (`int`): cap applied before the width multiplier (576 in every official variant).
        reg_max (`int`): bins of the box-side distribution (16).
        image_size (`int`): the square input size the variant is evaluated at (640, Large 768); the image
            processor's default size.
        batch_norm_eps (`float`), batch_norm_momentum (`float`): every BatchNorm's (1e-3 and 0.03, as trained).
        assigner_topk (`int`), assigner_alpha (`float`), assigner_beta (`float`): task-aligned assigner (Feng et
            al., TOOD): each object takes the `topk` cells inside it with the highest t = s^alpha * u^beta
            (s: predicted score of the object's class, u: CIoU of the predicted box with the object).
        box_loss_gain (`float`), cls_loss_gain (`float`), dfl_loss_gain (`float`): weights of the CIoU, BCE and
            DFL terms (7.5, 0.5, 1.5).
        id2label / label2id / num_labels: the classes; the 80 COCO names when none of them is given.
    """

    model_type = "leyolo"

    architecture: str = "nano"
    width_multiple: float = 1.0
    max_channels: int = 576
    reg_max: int = 16
    image_size: int = 640
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.03
    assigner_topk: int = 10
    assigner_alpha: float = 0.5
    assigner_beta: float = 6.0
    box_loss_gain: float = 7.5
    cls_loss_gain: float = 0.5
    dfl_loss_gain: float = 1.5

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") in (None, len(COCO_LABELS)):
            self.id2label = dict(enumerate(COCO_LABELS))
            self.label2id = {name: index for index, name in self.id2label.items()}
        self._validate_leyolo_fields()
        super().__post_init__(**kwargs)
        if self.num_labels < 1:
            raise ValueError(f"`num_labels` must be at least 1, got {self.num_labels}.")

    def _validate_leyolo_fields(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        if not _is_number(self.width_multiple) or self.width_multiple <= 0:
            raise ValueError(f"`width_multiple` must be a positive number, got {self.width_multiple!r}.")
        for name in ("max_channels", "reg_max", "image_size", "assigner_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.reg_max < 2:
            raise ValueError(f"`reg_max` must be at least 2 (the box distribution needs two bins), got {self.reg_max}.")
        if self.image_size % 32:
            raise ValueError(f"`image_size` must be a multiple of the largest stride 32, got {self.image_size}.")
        if not 0 < self.batch_norm_eps < 1 or not 0 < self.batch_norm_momentum <= 1:
            raise ValueError(
                "`batch_norm_eps` must be in (0, 1) and `batch_norm_momentum` in (0, 1], got "
                f"{self.batch_norm_eps!r} and {self.batch_norm_momentum!r}."
            )
        for name in ("assigner_alpha", "assigner_beta", "box_loss_gain", "cls_loss_gain", "dfl_loss_gain"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> LeYoloConfig:
        """The configuration of a published variant ("nano", "small", "medium", "large"); `kwargs` override it
        (e.g. `num_labels=3` or `id2label={...}` for another label set)."""
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {tuple(VARIANTS)}, got {variant!r}.")
        return cls(**{**VARIANTS[variant], **kwargs})
