"""Streamed training on 2 gloo processes that records which rows each rank trained on (launched by test_streaming)."""

import json
import os
import sys

from mu0.training.pretrain import load_recipe, load_samples, make_trainer

repo_id, output_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
samples, statistics = load_samples(repo_id)
recipe = load_recipe("tiny-cpu")
recipe["collator"].update(min_queries=4, max_queries=8)
recipe["training"].update(per_device_train_batch_size=2, logging_steps=1, save_steps=1000, ddp_backend="gloo",
                          use_cpu=True)
trainer = make_trainer(recipe, samples, statistics, output_dir, max_steps=steps)
collate, rows = trainer.data_collator, []


def collate_and_record(batch):
    rows.extend([str(row["episode_id"]), int(row["frame_index"])] for row in batch)
    return collate(batch)


trainer.data_collator = collate_and_record
trainer.train()
with open(os.path.join(output_dir, f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"rows": rows, "steps": trainer.state.global_step}, handle)
