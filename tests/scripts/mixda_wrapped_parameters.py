"""examples/mixda_two_stage.py, unchanged, reporting what stage 2's `Trainer` wrapped for data parallelism.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/mixda_wrapped_parameters.py EXAMPLE_ARGS...

After training, the main process writes `<output_dir>/wrapped.json`: the wrapper's class, the parameters that
DistributedDataParallel synchronizes (those that require grad and are not in `parameters_to_ignore`), every
parameter's name, and the buffers' names. For tests/test_scale_out.py.
"""

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mixda_two_stage.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("mixda_two_stage", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)

    class ReportingTrainer(example.Trainer):
        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            wrapped = self.model_wrapped
            module = getattr(wrapped, "module", wrapped)
            ignored = getattr(wrapped, "parameters_to_ignore", set())
            report = {
                "wrapper": type(wrapped).__name__,
                "synchronized": [n for n, p in module.named_parameters() if p.requires_grad and n not in ignored],
                "parameters": [n for n, _ in module.named_parameters()],
                "buffers": [n for n, _ in module.named_buffers()],
            }
            if self.is_world_process_zero():
                Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(self.args.output_dir) / "wrapped.json").write_text(json.dumps(report, indent=1))
            return result

    example.Trainer = ReportingTrainer  # stage 2's Trainer; stage 1 uses MixDADomainTrainer
    example.main()


if __name__ == "__main__":
    main()
