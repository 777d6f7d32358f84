"""The pretraining recipe on Trainer: recipes, loss going down, exact resume, the non-finite guard, accelerate configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from transformers import TrainerCallback

from mu0.dataset_builders.extraction import SYNTHETIC_RETARGET_STEP
from mu0.dataset_builders.trace_extract import TraceExtract
from mu0.training.pretrain import available_recipes, load_recipe, load_samples, make_trainer, save_samples

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "training" / "accelerate"


@pytest.fixture(scope="module")
def samples_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=3, num_frames=30, image_size=64,
                           cache_dir=str(root / "cache"), work_dir=str(root / "work"),
                           settings={"frame_stride": 3, "retarget_step": SYNTHETIC_RETARGET_STEP})
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(root / "samples"))
    return str(root / "samples")


def small_recipe(**training):
    recipe = load_recipe("tiny-cpu")
    recipe["collator"].update(min_queries=4, max_queries=8)
    recipe["training"].update({"per_device_train_batch_size": 4, "logging_steps": 5, "save_steps": 1000, **training})
    return recipe


def fixed_loss(model, batch) -> float:
    generator = torch.Generator().manual_seed(0)
    shape = (*batch["query_points"].shape[:2], model.config.num_control_points, 3)
    noise, time = torch.randn(shape, generator=generator), torch.full((shape[0],), 0.5)
    with torch.no_grad():
        return model.eval()(**batch, noise=noise, time=time).loss.item()


def test_recipes_are_listed_and_validated():
    assert {"tiny-cpu", "mu0-smolvlm2-2.2b"} <= set(available_recipes())
    paper = load_recipe("mu0-smolvlm2-2.2b")["training"]
    assert paper["max_steps"] == 200000 and paper["learning_rate"] == 1e-4 and paper["max_grad_norm"] == 10.0
    assert (paper["adam_beta1"], paper["adam_beta2"]) == (0.9, 0.95) and paper["per_device_train_batch_size"] * 4 == 16
    with pytest.raises(ValueError, match="Unknown recipe"):
        load_recipe("no-such-recipe")


def test_thirty_trainer_steps_lower_the_loss(samples_folder, tmp_path):
    samples, statistics = load_samples(samples_folder)
    trainer = make_trainer(small_recipe(), samples, statistics, str(tmp_path), max_steps=30)
    evaluation = trainer.eval_collator([samples[i] for i in range(4)])
    before = fixed_loss(trainer.model, evaluation)
    trainer.train()
    assert fixed_loss(trainer.model, evaluation) < 0.95 * before
    metrics = trainer.evaluate(samples.select(range(4)))
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert {"eval_uv/min_ade@32", "eval_uvz/fde@8", "eval_depth/min_frechet@16"} <= set(metrics)


def recording(trainer):
    """Wrap the trainer's collator to record which rows each training batch holds."""
    seen, collate = [], trainer.data_collator

    def collate_and_record(rows):
        seen.append([(row["episode_id"], int(row["frame_index"])) for row in rows])
        return collate(rows)

    trainer.data_collator = collate_and_record
    return seen


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(samples_folder, tmp_path):
    samples, statistics = load_samples(samples_folder)
    steps_per_epoch = -(-len(samples) // 4)
    checkpoint, end = steps_per_epoch + 2, steps_per_epoch + 5  # resume in the middle of the second epoch
    straight = make_trainer(small_recipe(logging_steps=1), samples, statistics, str(tmp_path / "straight"), max_steps=end)
    straight_batches, straight_losses = recording(straight), LossLog()
    straight.add_callback(straight_losses)
    straight.train()
    first = make_trainer(small_recipe(save_steps=checkpoint, logging_steps=1), samples, statistics,
                         str(tmp_path / "resumed"), max_steps=checkpoint)
    first.train()
    second = make_trainer(small_recipe(save_steps=checkpoint, logging_steps=1), samples, statistics,
                          str(tmp_path / "resumed"), max_steps=end)
    resumed_batches, resumed_losses = recording(second), LossLog()
    second.add_callback(resumed_losses)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{checkpoint}"))
    assert second.state.global_step == end
    assert resumed_batches[-3:] == straight_batches[-3:]
    # the same queries, augmentation, noise and weights: the same losses to float precision
    assert resumed_losses.losses == pytest.approx(straight_losses.losses[checkpoint:], rel=1e-5)
    for name, parameter in second.model.named_parameters():
        torch.testing.assert_close(parameter, dict(straight.model.named_parameters())[name], msg=name)


def test_ranks_agree_to_skip_a_step_that_is_non_finite_on_one_rank(samples_folder, tmp_path):
    """DDP (gloo, 2 CPU processes): rank 1 alone sees a NaN loss; both ranks must skip that step and finish."""
    script = Path(__file__).parent / "scripts" / "ddp_nonfinite.py"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as probe:  # a free port: a fixed one may be held by another test's service
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script),
         samples_folder, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1] and [r["steps"] for r in ranks] == [4, 4]
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # the replicas stayed identical


def test_non_finite_loss_skips_the_update(samples_folder, tmp_path, monkeypatch):
    samples, statistics = load_samples(samples_folder)
    trainer = make_trainer(small_recipe(), samples, statistics, str(tmp_path), max_steps=2)
    forward = type(trainer.model).forward

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 2
    for name, parameter in trainer.model.named_parameters():
        torch.testing.assert_close(parameter, before[name], msg=name)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == 4
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # units: _no_split_modules
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


def test_baseline_predictors_by_hand():
    from mu0.training.trainer import constant_velocity, zero_motion

    batch = {
        "labels": torch.zeros(1, 2, 4, 3),
        "history": torch.tensor([[[[0.1, -0.2, 0.0]] * 8, [[0.3, 0.0, 0.1]] * 8]]),  # oldest first, unscaled
        "history_mask": torch.tensor([[[True] * 8, [False] * 8]]),
    }
    assert zero_motion(batch).shape == (1, 1, 2, 4, 3) and not zero_motion(batch).any()
    moving = constant_velocity(torch.tensor([0.5, 0.5, 1.0]))(batch)
    # the previous position was 0.1 left and 0.2 below (0.2 and 0.4 in delta units of 0.5): keep going the other
    # way, one step per step
    torch.testing.assert_close(moving[0, 0, 0, 2], torch.tensor([-0.6, 1.2, 0.0]))
    assert not moving[0, 0, 1].any()  # no history: no motion


def test_training_streams_samples_from_the_hub(hub, samples_folder, tmp_path):
    from mu0.training.pretrain import push_samples_to_hub

    samples, statistics = load_samples(samples_folder)
    push_samples_to_hub(samples, statistics, "user/traces")
    streamed, streamed_statistics = load_samples("user/traces")
    assert streamed_statistics == statistics and not hasattr(streamed, "select")  # an IterableDataset
    trainer = make_trainer(small_recipe(), streamed, streamed_statistics, str(tmp_path), max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3


def test_trained_tiny_model_beats_zero_motion_on_its_training_episodes(tmp_path):
    from mu0.training.trainer import constant_velocity, evaluate_predictors, sampler, zero_motion

    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=2, num_frames=30, image_size=64,
                           cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"),
                           settings={"frame_stride": 2, "retarget_step": SYNTHETIC_RETARGET_STEP})
    builder.download_and_prepare()
    samples = builder.as_dataset(split="train")
    recipe = load_recipe("tiny-cpu")
    recipe["collator"].update(min_queries=8, max_queries=16)
    trainer = make_trainer(recipe, samples, builder.compute_statistics(), str(tmp_path / "out"), max_steps=300)
    trainer.train()
    results = evaluate_predictors(
        {"mu0": sampler(trainer.model.eval(), 5, 0), "zero": zero_motion,
         "constant_velocity": constant_velocity(trainer.processing_class.require_delta_scale())},
        samples.with_format("numpy"), trainer.eval_collator, trainer.processing_class.require_delta_scale(),
    )
    # measured: min-ADE 0.052 vs 0.082 and min-FDE 0.068 vs 0.135 (best of 5, normalised u, v)
    assert results["mu0"]["uv/min_ade@32"] < 0.85 * results["zero"]["uv/min_ade@32"]
    assert results["mu0"]["uv/min_fde@32"] < 0.75 * results["zero"]["uv/min_fde@32"]
    assert results["mu0"]["uv/min_fde@32"] < results["constant_velocity"]["uv/min_fde@32"]


def test_a_recipe_can_keep_the_backbone_in_bf16_beside_an_fp32_expert():
    from mu0.training.pretrain import build_model_and_processor

    recipe = load_recipe("tiny-cpu")
    recipe["model"]["backbone_dtype"] = "bfloat16"
    model, _ = build_model_and_processor(recipe, {"delta_scale": [0.1, 0.1, 0.05], "depth_log_range": [-1.0, 1.5]})
    assert model.backbone_dtype == torch.bfloat16 and model.model.dino.dtype == torch.bfloat16
    assert model.expert_dtype == torch.float32 and model.model.depth_lora_layers[0].lora_A.weight.dtype == torch.float32
    assert load_recipe("mu0-smolvlm2-2.2b")["model"]["backbone_dtype"] == "bfloat16"
    from conftest import inference_inputs, make_processor, random_batch

    batch = random_batch(make_processor(model.config))
    output = model.train()(**batch)
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.trace_velocity_head.weight.grad is not None
    assert torch.isfinite(model.eval().predict_traces(**inference_inputs(batch)).traces).all()


def test_weight_average_follows_the_recurrence_and_is_loaded_at_the_end():
    from types import SimpleNamespace

    from mu0.training.trainer import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(decay=0.5)
    state = SimpleNamespace(global_step=0)
    average.on_train_begin(None, state, None, model=model)
    for value in (4.0, 8.0):  # shadow: 0 -> 0.5 * 0 + 0.5 * 4 = 2 -> 0.5 * 2 + 0.5 * 8 = 5
        with torch.no_grad():
            model.weight.fill_(value)
        average.on_step_end(None, state, None, model=model)
    with average.averaged_weights(model):
        assert model.weight.item() == pytest.approx(5.0)
    assert model.weight.item() == pytest.approx(8.0)  # the trained weights come back after an evaluation
    average.on_train_end(None, state, None, model=model)
    assert model.weight.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="cannot resume"):
        average.on_train_begin(None, SimpleNamespace(global_step=10), None, model=model)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(decay=1.0)
