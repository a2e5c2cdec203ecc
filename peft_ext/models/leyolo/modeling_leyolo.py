"""LeYOLO (Hollard et al., 2024, https://arxiv.org/abs/2406.14239) as a transformers object-detection model.

The network follows the official code (LilianHollard/LeYOLO, an Ultralytics 8.1.4 fork) layer for layer, with
the official layer numbering kept in `LeYoloModel.layers`, so that the released weights load unchanged:

* every convolution unit is conv -> BatchNorm -> SiLU (`LeYoloConvNormAct`); the stem, the stride-2 convs of
  the neck and the inverted bottlenecks use convs with a bias, SPPF and the head use bias-free ones;
* an inverted bottleneck (paper Sec. 3.1, MobileNetV2/V3-style, `LeYoloInvertedBottleneck`) is an optional 1x1
  expansion, a depthwise kxk conv (stride 1 or 2) and a 1x1 projection with BatchNorm and no activation, with a
  residual connection when the channels and the resolution are unchanged. The official YAMLs carry a
  squeeze-excite flag, but the official block ignores it and the released weights have no SE: there is none;
* the FPAN neck (Sec. 3.2) is nearest upsampling + concatenation + bottleneck stacks going up, and plain 3x3
  stride-2 convs + concatenation + stacks going down;
* the DNiN head (Sec. 3.3, `LeYoloDetectionHead`) has, per level, a box branch and a class branch, each
  1x1 conv -> depthwise 3x3 -> depthwise 3x3 -> 1x1 output conv;
* decoding is YOLOv8's: each cell of the stride-8/16/32 maps predicts (l, t, r, b) distances from its centre as
  the expectation of a softmax over `reg_max` bins (DFL parametrization, Li et al., GFL, Eq. 5), and one logit
  per class.

Medium's head reads layers 27, 32 and 37, so its layers 38-41 feed nothing. The released Medium/Large weights
have them, so they are built and loaded (and counted in parameters and GFLOPs, as officially), but `forward`
skips them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_leyolo import LeYoloConfig
from .loss_leyolo import LeYoloDetectionLoss

STRIDES = (8, 16, 32)


# -- the official layer tables ----------------------------------------------------------------------------------
# Rows in the official order, channel counts before the width multiplier. Kinds:
#   ("conv", out, kernel, stride)                          biased conv + BN + SiLU
#   ("block", out, kernel, expansion, stride, expand)      inverted bottleneck; expansion None = input channels,
#                                                          expand False = no 1x1 expansion conv
#   ("sppf", out, kernel)    ("upsample",)    ("concat", other_layer)  (concatenates the previous layer and that one)
def _repeat(row, times):
    return [row] * times


_NANO_LAYERS = [
    ("conv", 16, 3, 2), ("conv", 16, 1, 1), ("block", 16, 3, 16, 2, False), ("block", 32, 3, 96, 2, True),
    ("block", 32, 3, 96, 1, True), ("block", 64, 5, 96, 2, True), *_repeat(("block", 64, 5, 192, 1, True), 4),
    ("block", 96, 5, 576, 2, True), *_repeat(("block", 96, 5, 576, 1, True), 3), ("sppf", 96, 5),
    ("upsample",), ("concat", 9), *_repeat(("block", 64, 5, 128, 1, True), 3),
    ("upsample",), ("concat", 4), ("block", 32, 3, None, 1, False), *_repeat(("block", 32, 3, 64, 1, True), 2),
    ("conv", 64, 3, 2), ("concat", 19), *_repeat(("block", 64, 5, 128, 1, True), 3),
    ("conv", 96, 3, 2), ("concat", 14), *_repeat(("block", 96, 5, 192, 1, True), 3),
]  # fmt: skip
_MEDIUM_LAYERS = [
    ("conv", 16, 3, 2), ("conv", 16, 1, 1), ("block", 16, 3, 16, 2, False), ("block", 32, 3, 96, 2, True),
    *_repeat(("block", 32, 3, 96, 1, True), 2), ("block", 64, 5, 96, 2, True),
    *_repeat(("block", 64, 5, 192, 1, True), 5), ("block", 96, 5, 576, 2, True),
    *_repeat(("block", 96, 5, 576, 1, True), 4), ("sppf", 96, 5),
    ("upsample",), ("concat", 11), *_repeat(("block", 64, 5, 128, 1, True), 4),
    ("upsample",), ("concat", 5), ("block", 32, 3, None, 1, False), *_repeat(("block", 32, 3, 64, 1, True), 2),
    ("block", 64, 5, 128, 1, True),
    ("conv", 64, 3, 2), ("concat", 23), *_repeat(("block", 64, 5, 128, 1, True), 4),
    ("conv", 96, 3, 2), ("concat", 17), *_repeat(("block", 96, 5, 192, 1, True), 3), ("block", 64, 5, 128, 1, True),
]  # fmt: skip
# architecture -> (layer rows, the layers the head reads at strides 8, 16, 32)
LAYER_TABLES = {"nano": (_NANO_LAYERS, (24, 29, 34)), "medium": (_MEDIUM_LAYERS, (27, 32, 37))}


def scale_channels(channels: int, config: LeYoloConfig) -> int:
    """The official width rule: ceil(min(c, max_channels) * width_multiple / 8) * 8."""
    return math.ceil(min(channels, config.max_channels) * config.width_multiple / 8) * 8


# -- building blocks ---------------------------------------------------------------------------------------------
class LeYoloConvNormAct(nn.Module):
    """conv -> BatchNorm -> SiLU, "same" padding. After `fuse()`, the BatchNorm is folded into the conv."""

    def __init__(self, config, in_channels, out_channels, kernel_size=1, stride=1, groups=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        self.act = nn.SiLU()

    def forward(self, hidden_states):
        return self.act(self.norm(self.conv(hidden_states)))


class LeYoloInvertedBottleneck(nn.Module):
    """[1x1 expansion conv-BN-SiLU] -> depthwise kxk conv-BN-SiLU -> 1x1 projection conv -> BN (linear bottleneck,
    no activation), plus the input when the shape is unchanged (paper Sec. 3.1)."""

    def __init__(self, config, in_channels, out_channels, kernel_size, hidden_channels, stride, expand):
        super().__init__()
        self.expand = LeYoloConvNormAct(config, in_channels, hidden_channels) if expand else None
        self.depthwise = LeYoloConvNormAct(
            config, hidden_channels, hidden_channels, kernel_size, stride, groups=hidden_channels
        )
        self.project = nn.Conv2d(hidden_channels, out_channels, 1)
        self.project_norm = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        self.has_residual = in_channels == out_channels and stride == 1

    def forward(self, hidden_states):
        output = hidden_states if self.expand is None else self.expand(hidden_states)
        output = self.project_norm(self.project(self.depthwise(output)))
        return hidden_states + output if self.has_residual else output


class LeYoloSPPF(nn.Module):
    """Spatial pyramid pooling, fast (YOLOv5/v8): 1x1 reduce to half the channels, three chained 5x5 max-pools,
    concatenation of the four maps, 1x1 conv to the output channels. Bias-free convs."""

    def __init__(self, config, in_channels, out_channels, kernel_size):
        super().__init__()
        hidden = in_channels // 2
        self.reduce = LeYoloConvNormAct(config, in_channels, hidden, bias=False)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.expand = LeYoloConvNormAct(config, 4 * hidden, out_channels, bias=False)

    def forward(self, hidden_states):
        pyramid = [self.reduce(hidden_states)]
        for _ in range(3):
            pyramid.append(self.pool(pyramid[-1]))
        return self.expand(torch.cat(pyramid, dim=1))


class LeYoloConcat(nn.Module):
    def forward(self, *feature_maps):
        return torch.cat(feature_maps, dim=1)


class LeYoloHeadBranch(nn.Module):
    """One DNiN branch (paper Sec. 3.3): 1x1 conv, two depthwise 3x3 convs (bias-free, BN, SiLU), 1x1 output conv."""

    def __init__(self, config, in_channels, hidden_channels, out_channels):
        super().__init__()
        self.pointwise = LeYoloConvNormAct(config, in_channels, hidden_channels, bias=False)
        self.depthwise1 = LeYoloConvNormAct(config, hidden_channels, hidden_channels, 3, groups=hidden_channels, bias=False)
        self.depthwise2 = LeYoloConvNormAct(config, hidden_channels, hidden_channels, 3, groups=hidden_channels, bias=False)
        self.output = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, hidden_states):
        return self.output(self.depthwise2(self.depthwise1(self.pointwise(hidden_states))))


class LeYoloDetectionHead(nn.Module):
    """Decoupled box / class branches per level, and the fixed DFL bin values 0..reg_max-1.

    The bins are a frozen parameter (as the official DFL 1x1 conv holds them), so that parameter counts match the
    official ones; they are never trained."""

    def __init__(self, config: LeYoloConfig, in_channels: list[int]):
        super().__init__()
        box_hidden = max(16, in_channels[0] // 4, 4 * config.reg_max)
        class_hidden = max(in_channels[0], min(config.num_labels, 100))
        self.box_branches = nn.ModuleList(LeYoloHeadBranch(config, c, box_hidden, 4 * config.reg_max) for c in in_channels)
        self.class_branches = nn.ModuleList(LeYoloHeadBranch(config, c, class_hidden, config.num_labels) for c in in_channels)
        self.distribution_bins = nn.Parameter(torch.arange(config.reg_max, dtype=torch.float32), requires_grad=False)
        self.reg_max = config.reg_max

    def forward(self, feature_maps):
        """(B, N, 4, reg_max) box-distribution logits and (B, N, num_labels) class logits, cells row-major per
        level, levels in stride order."""
        batch = feature_maps[0].shape[0]
        distributions = [branch(x).flatten(2) for branch, x in zip(self.box_branches, feature_maps)]
        logits = [branch(x).flatten(2) for branch, x in zip(self.class_branches, feature_maps)]
        distribution = torch.cat(distributions, dim=2).transpose(1, 2).reshape(batch, -1, 4, self.reg_max)
        return distribution, torch.cat(logits, dim=2).transpose(1, 2)


def make_anchors(feature_maps, strides=STRIDES):
    """Cell centres (N, 2) in units of each level's stride, and the stride of each cell (N, 1), row-major."""
    points, point_strides = [], []
    for feature_map, stride in zip(feature_maps, strides):
        height, width = feature_map.shape[-2:]
        ys = torch.arange(height, device=feature_map.device, dtype=feature_map.dtype) + 0.5
        xs = torch.arange(width, device=feature_map.device, dtype=feature_map.dtype) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))
        point_strides.append(torch.full((height * width, 1), stride, device=feature_map.device, dtype=feature_map.dtype))
    return torch.cat(points), torch.cat(point_strides)


def distances_to_boxes(distances: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """(l, t, r, b) distances from the anchor points to corner boxes (x1, y1, x2, y2), same units."""
    return torch.cat((anchor_points - distances[..., :2], anchor_points + distances[..., 2:]), dim=-1)


# -- outputs -----------------------------------------------------------------------------------------------------
@dataclass
class LeYoloModelOutput(ModelOutput):
    """feature_maps: the neck's three outputs at strides 8, 16 and 32 (B, C_i, H/s, W/s)."""

    feature_maps: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LeYoloObjectDetectionOutput(ModelOutput):
    """
    loss: the training loss (CIoU, BCE and DFL terms with their gains), when `labels` are given.
    loss_dict: the three weighted terms, "loss_box", "loss_cls", "loss_dfl".
    logits: (B, N, num_labels) class logits (apply a sigmoid for scores), N = sum over strides of (H/s)(W/s).
    pred_boxes: (B, N, 4) boxes (cx, cy, w, h), normalized by the input tensor's width and height.
    pred_box_distribution: (B, N, 4, reg_max) logits of the (l, t, r, b) distance distributions.
    feature_maps: the neck's outputs.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_box_distribution: torch.FloatTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None


# -- models ------------------------------------------------------------------------------------------------------
class LeYoloPreTrainedModel(PreTrainedModel):
    config: LeYoloConfig
    config_class = LeYoloConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default conv init and unit BatchNorms (as the official model), the fixed DFL bins, and the
        YOLOv8 head biases: box outputs 1.0, class outputs log(5 / num_labels / (640 / stride)^2), i.e. a prior of
        about 5 objects per 640x640 image spread over the classes."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, LeYoloDetectionHead):
            init.copy_(module.distribution_bins, torch.arange(len(module.distribution_bins), dtype=torch.float32))
            num_labels = module.class_branches[0].output.out_channels
            for box_branch, class_branch, stride in zip(module.box_branches, module.class_branches, STRIDES):
                init.constant_(box_branch.output.bias, 1.0)
                init.constant_(class_branch.output.bias, math.log(5 / num_labels / (640 / stride) ** 2))

    def _write_model_card(self, save_directory, repo_id: str | None = None) -> None:
        from peft_ext.hub import render_model_card, save_model_card

        save_model_card(render_model_card("leyolo", pipeline_tag="object-detection", repo_id=repo_id), save_directory)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the LeYOLO model card (README.md) beside the weights."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use `model.push_to_hub(repo_id)` to upload a LeYOLO model (with its model card).")
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            self._write_model_card(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the saved folder (weights, config, model card naming `repo_id`) as one commit."""
        from peft_ext.hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)

    def fuse(self, scope: str = "all"):
        """Fold every BatchNorm into the conv before it, for inference (returns `self`, now in eval mode).

        `scope="ultralytics"` folds only the bias-free conv units (SPPF and head), which is what Ultralytics'
        `fuse()` does to this network, and what the official fused parameter counts and GFLOPs are measured on.
        The model keeps its weights' names, with each folded BatchNorm replaced by an identity: a fused model is
        for inference and export, not for training or `save_pretrained`.
        """
        if scope not in ("all", "ultralytics"):
            raise ValueError(f"`scope` must be 'all' or 'ultralytics', got {scope!r}.")
        self.eval()
        for module in self.modules():
            if isinstance(module, LeYoloConvNormAct) and isinstance(module.norm, nn.BatchNorm2d):
                if scope == "all" or module.conv.bias is None:
                    module.conv = _fold_batch_norm(module.conv, module.norm)
                    module.norm = nn.Identity()
            elif scope == "all" and isinstance(module, LeYoloInvertedBottleneck):
                if isinstance(module.project_norm, nn.BatchNorm2d):
                    module.project = _fold_batch_norm(module.project, module.project_norm)
                    module.project_norm = nn.Identity()
        return self


@torch.no_grad()
def _fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """BN(conv(x)) = gamma (W x + b - mu) / sqrt(var + eps) + beta, as one conv."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups, bias=True
    ).to(conv.weight.device, conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    return fused


class LeYoloModel(LeYoloPreTrainedModel):
    """Backbone and FPAN neck in the official layer order; returns the three maps the head reads."""

    def __init__(self, config: LeYoloConfig):
        super().__init__(config)
        rows, self.output_layers = LAYER_TABLES[config.architecture]
        self.layers = nn.ModuleList()
        self.concat_sources: dict[int, int] = {}
        channels = []
        in_channels = 3
        for index, (kind, *args) in enumerate(rows):
            if kind == "conv":
                out_channels, kernel, stride = scale_channels(args[0], config), args[1], args[2]
                layer = LeYoloConvNormAct(config, in_channels, out_channels, kernel, stride)
            elif kind == "block":
                out_channels, kernel, expansion, stride, expand = args
                out_channels = scale_channels(out_channels, config)
                hidden = in_channels if expansion is None else scale_channels(expansion, config)
                if not expand and hidden != in_channels:
                    raise ValueError(f"Layer {index}: a block without expansion needs {in_channels} hidden channels.")
                layer = LeYoloInvertedBottleneck(config, in_channels, out_channels, kernel, hidden, stride, expand)
            elif kind == "sppf":
                out_channels = scale_channels(args[0], config)
                layer = LeYoloSPPF(config, in_channels, out_channels, args[1])
            elif kind == "upsample":
                out_channels, layer = in_channels, nn.Upsample(scale_factor=2, mode="nearest")
            else:
                self.concat_sources[index] = args[0]
                out_channels, layer = in_channels + channels[args[0]], LeYoloConcat()
            self.layers.append(layer)
            channels.append(out_channels)
            in_channels = out_channels
        self.output_channels = [channels[index] for index in self.output_layers]
        # Layers after the last one the head reads feed nothing (Medium's 38-41): skipped in `forward`.
        self.num_used_layers = max(self.output_layers) + 1
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, run_unused_layers: bool = False, **kwargs) -> LeYoloModelOutput:
        """`pixel_values`: (B, 3, H, W), RGB in [0, 1], H and W multiples of 32. `run_unused_layers` also runs the
        layers that feed nothing (only useful to measure the official GFLOPs)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"`pixel_values` must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}.")
        if pixel_values.shape[-2] % 32 or pixel_values.shape[-1] % 32:
            raise ValueError(
                f"The input height and width must be multiples of 32 (the largest stride), got "
                f"{tuple(pixel_values.shape[-2:])}; LeYoloImageProcessor letterboxes images to such a size."
            )
        outputs = []
        hidden_states = pixel_values
        num_layers = len(self.layers) if run_unused_layers else self.num_used_layers
        for index, layer in enumerate(self.layers[:num_layers]):
            if index in self.concat_sources:
                hidden_states = layer(hidden_states, outputs[self.concat_sources[index]])
            else:
                hidden_states = layer(hidden_states)
            outputs.append(hidden_states)
        return LeYoloModelOutput(feature_maps=tuple(outputs[index] for index in self.output_layers))


class LeYoloForObjectDetection(LeYoloPreTrainedModel):
    """LeYOLO detector: `LeYoloModel` + DNiN head + YOLOv8 decoding (and loss when `labels` are given)."""

    def __init__(self, config: LeYoloConfig):
        super().__init__(config)
        self.model = LeYoloModel(config)
        self.head = LeYoloDetectionHead(config, self.model.output_channels)
        self.loss_function = LeYoloDetectionLoss(config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: list[dict] | None = None, run_unused_layers: bool = False, **kwargs
    ) -> LeYoloObjectDetectionOutput:
        """
        pixel_values: (B, 3, H, W) RGB in [0, 1] (see `LeYoloImageProcessor`).
        labels: optional, one dict per image with "class_labels" (M,) and "boxes" (M, 4), normalized (cx, cy, w, h)
            relative to `pixel_values`, as DETR and YOLOS take them. An image may have no objects. Boxes are
            clipped to the image; boxes with nothing left inside it are ignored.
        """
        feature_maps = self.model(pixel_values, run_unused_layers=run_unused_layers).feature_maps
        distribution, logits = self.head(feature_maps)
        anchor_points, anchor_strides = make_anchors(feature_maps)
        # DFL decoding: each side is the expectation of its bin distribution, in units of the cell's stride.
        distances = F.softmax(distribution, dim=-1) @ self.head.distribution_bins.to(distribution.dtype)
        boxes_in_strides = distances_to_boxes(distances, anchor_points)
        height, width = pixel_values.shape[-2:]
        scale = boxes_in_strides.new_tensor([width, height, width, height])
        corners = boxes_in_strides * anchor_strides / scale
        pred_boxes = torch.cat(((corners[..., :2] + corners[..., 2:]) / 2, corners[..., 2:] - corners[..., :2]), -1)

        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = self.loss_function(
                logits, distribution, boxes_in_strides, anchor_points, anchor_strides, (height, width), labels
            )
        return LeYoloObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            pred_box_distribution=distribution,
            feature_maps=feature_maps,
        )



@torch.no_grad()
def count_gflops(model: LeYoloForObjectDetection, height: int, width: int | None = None) -> float:
    """GFLOPs of one (height x width) image, counted as the official repository reports them (Ultralytics'
    `get_flops` through thop): 2 x (conv multiply-accumulates + 4 per BatchNorm output element + 1 per upsampled
    output element + the DFL expectation's reg_max per box side), all layers included (Medium's unused ones too).

    The official numbers are taken after Ultralytics' `fuse()`, so call this on `model.fuse("ultralytics")` to
    compare with them, or on `model.fuse()` for the cost of the fully fused inference model.
    """
    width = height if width is None else width
    operations = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight[0, 0].numel()
            operations.append(output[0].numel() * kernel)
        elif isinstance(module, nn.BatchNorm2d):
            operations.append(4 * output[0].numel())
        elif isinstance(module, nn.Upsample):
            operations.append(output[0].numel())

    hooks = [module.register_forward_hook(count) for module in model.modules()
             if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Upsample))]  # fmt: skip
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        outputs = model(torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device), run_unused_layers=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    operations.append(outputs.pred_box_distribution[0].numel())  # the DFL expectation
    return 2 * sum(operations) / 1e9
