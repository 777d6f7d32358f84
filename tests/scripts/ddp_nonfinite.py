"""Two-process gloo run in which only rank 1 sees a NaN loss at its second step (launched by test_pretrain)."""

import json
import os
import sys

import torch

from mu0.training.pretrain import load_recipe, load_samples, make_trainer

samples_folder, output_dir = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
samples, statistics = load_samples(samples_folder)
recipe = load_recipe("tiny-cpu")
recipe["collator"].update(min_queries=4, max_queries=8)
recipe["training"].update(per_device_train_batch_size=2, logging_steps=1, save_steps=1000, ddp_backend="gloo",
                          use_cpu=True)
trainer = make_trainer(recipe, samples, statistics, output_dir, max_steps=4)
forward, calls = type(trainer.model).forward, []


def poisoned(self, *args, **kwargs):
    output = forward(self, *args, **kwargs)
    calls.append(None)
    if rank == 1 and len(calls) == 2:
        output.loss = output.loss * float("nan")
    return output


type(trainer.model).forward = poisoned
trainer.train()
checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
    json.dump({"skipped": trainer.skipped_nonfinite_steps, "steps": trainer.state.global_step, "checksum": checksum,
               "finite": all(torch.isfinite(p).all().item() for p in trainer.model.parameters())}, handle)
