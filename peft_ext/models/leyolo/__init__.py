"""LeYOLO (Hollard et al., 2024) as a registered transformers architecture, model_type "leyolo":
`AutoModelForObjectDetection.from_config(LeYoloConfig.from_variant("nano"))`, `pipeline("object-detection", ...)`."""

from peft_ext.registry import register_auto_classes

from .configuration_leyolo import COCO_LABELS, LeYoloConfig
from .image_processing_leyolo import LeYoloImageProcessor
from .modeling_leyolo import (
    LeYoloForObjectDetection,
    LeYoloModel,
    LeYoloObjectDetectionOutput,
    LeYoloPreTrainedModel,
    count_gflops,
)
from .sync_batch_norm import DistributedBatchNorm2d, convert_sync_batch_norm

__all__ = [
    "COCO_LABELS",
    "DistributedBatchNorm2d",
    "LeYoloConfig",
    "LeYoloForObjectDetection",
    "LeYoloImageProcessor",
    "LeYoloModel",
    "LeYoloObjectDetectionOutput",
    "LeYoloPreTrainedModel",
    "convert_sync_batch_norm",
    "count_gflops",
]

register_auto_classes(
    "leyolo",
    LeYoloConfig,
    {"AutoModel": LeYoloModel, "AutoModelForObjectDetection": LeYoloForObjectDetection},
    image_processor_cls=LeYoloImageProcessor,
)
