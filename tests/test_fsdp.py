"""FSDP2 training with the shipped accelerate configuration, launched by `accelerate launch` on 2 CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from safetensors.torch import load_file
from test_pretrain import samples_folder, small_recipe  # noqa: F401  (the module-scoped samples fixture)
from transformers import set_seed

from mu0 import Mu0ForTracePrediction
from mu0.presets import preset_config
from mu0.dataset_builders.statistics import load_statistics
from mu0.training.pretrain import build_model_and_processor

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "training" / "accelerate" / "fsdp2.yaml"
CPU_FSDP_LAUNCHER = Path(__file__).parent / "scripts" / "fsdp_cpu_train.py"
STEPS = 4


def launch(command: list[str]) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def train_with_fsdp(recipe: Path, dataset: str, output_dir: Path, *extra: str, mixed_precision: str = "no") -> None:
    """`mu0 train` under the package's FSDP2 configuration on 2 processes (fp32 unless `mixed_precision`)."""
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--mixed_precision", mixed_precision, "--main_process_ip", "127.0.0.1",
            "--main_process_port", "0", str(CPU_FSDP_LAUNCHER),
            "train", "--recipe", str(recipe), "--dataset", dataset, "--max-steps", str(STEPS), "--eval-samples", "0",
            "--output-dir", str(output_dir), *extra])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_with_ddp(recipe: Path, dataset: str, output_dir: Path) -> None:
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "mu0.training.cli",
            "train", "--recipe", str(recipe), "--dataset", dataset, "--max-steps", str(STEPS), "--eval-samples", "0",
            "--output-dir", str(output_dir)])


def write_recipe(path: Path, **training) -> Path:
    path.write_text(json.dumps(small_recipe(per_device_train_batch_size=2, logging_steps=1, save_steps=2, **training)))
    return path


def test_fsdp2_wraps_the_expert_and_backbone_layers_the_model_declares():
    """The configuration names no layer classes (a backbone lacking one used to fail the launch): the wrap units
    are the model's `_no_split_modules` that it has."""
    fsdp_config = load_config_from_file(str(FSDP_CONFIG)).fsdp_config
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp_config
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=fsdp_config["fsdp_auto_wrap_policy"])
    model = Mu0ForTracePrediction(preset_config("tiny"))
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {type(module).__name__ for module in model.modules() if wraps(module)}
    assert {"Mu0ExpertLayer", "LlamaDecoderLayer", "Dinov2Layer"} <= wrapped
    assert len([module for module in model.modules() if wraps(module)]) >= len(model.model.expert_layers) + len(
        model.model.text_model.layers)


def test_fsdp2_trains_like_ddp_and_resumes_from_its_sharded_checkpoint(samples_folder, tmp_path):  # noqa: F811
    recipe = write_recipe(tmp_path / "recipe.json")
    ddp_recipe = write_recipe(tmp_path / "ddp.json", use_cpu=True, ddp_backend="gloo")
    train_with_fsdp(recipe, samples_folder, tmp_path / "fsdp")
    train_with_fsdp(recipe, samples_folder, tmp_path / "resumed", "--resume", str(tmp_path / "fsdp" / "checkpoint-2"))
    train_with_ddp(ddp_recipe, samples_folder, tmp_path / "ddp")

    # the checkpoint is sharded: one file of weights per rank, no gathered copy
    shards = sorted(path.name for path in (tmp_path / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0").iterdir())
    assert [name for name in shards if name.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((tmp_path / "fsdp" / "checkpoint-2").glob("*.safetensors"))
    # both ranks trained together: 4 steps x 2 ranks x 2 rows
    state = json.loads((tmp_path / "fsdp" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and state["train_batch_size"] == 2
    assert state["log_history"][0]["epoch"] == pytest.approx(1 / -(-21 // 4))  # 21 rows, 4 per global step

    # the final model is saved as itself, loadable like any other
    config = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mu0.Mu0ForTracePrediction"
    assert not list((tmp_path / "fsdp").glob("_fsdp*.py"))
    trained = Mu0ForTracePrediction.from_pretrained(str(tmp_path / "fsdp"))

    fsdp, resumed, ddp = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("fsdp", "resumed", "ddp"))
    assert set(fsdp) == set(ddp) == set(resumed)
    for name in fsdp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(resumed[name], fsdp[name], rtol=1e-6, atol=1e-6, msg=name)

    # the frozen backbone left as initialised; the expert trained
    set_seed(0)
    initial, _ = build_model_and_processor(json.loads(recipe.read_text()), load_statistics(samples_folder))
    initial_weights = dict(initial.named_parameters())
    frozen = [name for name, parameter in trained.named_parameters() if not parameter.requires_grad]
    assert any(name.startswith("model.vlm.text_model.layers") for name in frozen)
    for name, parameter in trained.named_parameters():
        if name in frozen:
            torch.testing.assert_close(parameter, initial_weights[name], rtol=0, atol=0, msg=name)
    name = "model.expert_layers.0.mlp.up_proj.weight"
    assert not torch.equal(dict(trained.named_parameters())[name], initial_weights[name])


def test_fsdp2_trains_a_bf16_backbone_beside_an_fp32_expert(samples_folder, tmp_path):  # noqa: F811
    """The paper recipe's dtypes under the configuration's bf16 mixed precision (FSDP2 refuses mixed dtypes without)."""
    recipe = small_recipe(per_device_train_batch_size=2, logging_steps=1, save_steps=2)
    recipe["model"]["backbone_dtype"] = "bfloat16"
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    train_with_fsdp(tmp_path / "recipe.json", samples_folder, tmp_path / "run", mixed_precision="bf16")
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    set_seed(0)
    initial, _ = build_model_and_processor(recipe, load_statistics(samples_folder))
    initial_weights = dict(initial.named_parameters())
    trained = dict(Mu0ForTracePrediction.from_pretrained(str(tmp_path / "run")).named_parameters())
    backbone, expert = "model.vlm.text_model.layers.0.self_attn.k_proj.weight", "model.expert_layers.0.mlp.up_proj.weight"
    assert (weights[backbone].dtype, weights[expert].dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(trained[backbone], initial_weights[backbone])
    assert torch.isfinite(trained[expert]).all() and not torch.equal(trained[expert], initial_weights[expert])


def test_a_launch_that_would_not_distribute_is_refused(samples_folder, tmp_path):  # noqa: F811
    """Without GPUs and without `use_cpu`, the 2 launched processes used to train alone, into the same folder."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "mu0.training.cli", "train", "--recipe",
         str(write_recipe(tmp_path / "recipe.json")), "--dataset", samples_folder, "--max-steps", "1",
         "--eval-samples", "0", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode != 0
    assert "Launched as 2 processes, but training would run as 1" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
