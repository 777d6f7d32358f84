"""`mu0 train` under accelerate's FSDP on CPU processes (gloo), launched by tests with `accelerate launch`.

accelerate turns FSDP on only for accelerator devices (its MULTI_GPU family); on CPU it would silently run plain
DDP instead. Here the CPU ranks are declared as a multi-device run, with the gloo backend and the CPU as device, so
the FSDP2 path itself (fully_shard units, DTensor parameters, sharded checkpoints) is what runs.
"""

import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

prepare_backend = PartialState._prepare_backend


def prepare_cpu_backend_as_multi_device(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = prepare_backend(self, True, sagemaker_dp, backend)
    if distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"Expected several CPU processes, accelerate sees {distributed_type}.")
    return backend, DistributedType.MULTI_GPU


def set_cpu_device(self):
    self.device = torch.device("cpu")


PartialState._prepare_backend = prepare_cpu_backend_as_multi_device
PartialState.set_device = set_cpu_device

from mu0.training.cli import main  # noqa: E402  (after the patch: TrainingArguments builds the state)

sys.exit(main(sys.argv[1:]))
