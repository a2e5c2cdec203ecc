"""examples/leyolo_train.py on 1 process with the loss that N-process data parallelism optimizes.

    python tests/scripts/leyolo_loss_per_process.py N EXAMPLE_ARGS...

LeYOLO's loss is normalized by the sum of the batch's target scores (YOLOv8's choice), so it is not a mean over
images: N processes average N losses, each normalized by its own images' sum, which is not the loss of their
images taken together. This runs the example unchanged except that the loss of a batch is that average over its
N consecutive shares (the shares the processes get), while every BatchNorm still sees the whole batch: the
1-process reference for N-process training with synchronized BatchNorm, for tests/test_scale_out.py.
"""

import importlib.util
import sys
from pathlib import Path

from peft_ext.models.leyolo.loss_leyolo import LeYoloDetectionLoss

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "leyolo_train.py"
batch_loss = LeYoloDetectionLoss.__call__


def mean_of_per_process_losses(processes: int):
    def loss(self, logits, distribution, boxes_in_strides, anchor_points, anchor_strides, image_size, labels):
        if len(labels) % processes:
            raise ValueError(f"A batch of {len(labels)} images does not split into {processes} equal shares.")
        share = len(labels) // processes
        parts = [batch_loss(self, logits[i : i + share], distribution[i : i + share], boxes_in_strides[i : i + share],
                            anchor_points, anchor_strides, image_size, labels[i : i + share])
                 for i in range(0, len(labels), share)]  # fmt: skip
        terms = {name: sum(part[1][name] for part in parts) / processes for name in parts[0][1]}
        return sum(part[0] for part in parts) / processes, terms

    return loss


def main() -> None:
    LeYoloDetectionLoss.__call__ = mean_of_per_process_losses(int(sys.argv[1]))
    spec = importlib.util.spec_from_file_location("leyolo_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    example.main(sys.argv[2:])


if __name__ == "__main__":
    main()
