"""Adapting μ0 to a robot: a flow-matching action expert on a frozen μ0, optionally with LoRA on μ0's trace expert.

Only what the adaptation adds is saved and pushed — the action expert, and the LoRA weights when μ0 is adapted —
beside the policy config (which names and fingerprints its base μ0) and the processor with the robot statistics.
`load_adapter` rebuilds the policy on top of the base μ0 and refuses an adapter trained on a different base.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from huggingface_hub import HfApi, snapshot_download
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from .. import Mu0ActionConfig, Mu0ForActionPrediction, Mu0ForTracePrediction
from ..modeling_mu0 import legacy_key_mapping
from ..modeling_mu0_action import trace_fingerprint
from ..processing.processing_mu0_action import Mu0ActionProcessor

# LoRA on the trace expert's attention and MLP projections; the frozen backbone and DINOv2 are left alone.
DEFAULT_LORA_TARGETS = (
    r"trace_model\.model\.expert_layers\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
# The target of adapters saved before μ0's trace expert moved under `Mu0Model` (`trace_model.expert_layers`).
LEGACY_LORA_TARGET = r"trace_model\.expert_layers"
# Trained in full and saved beside the LoRA weights (peft matches this name as a module-path suffix).
NEW_MODULES = ["action_expert"]
ACTION_EXPERT_WEIGHTS = "action_expert.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def add_trace_lora(
    policy: Mu0ForActionPrediction,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS,
) -> PeftModel:
    """Wrap the policy with PEFT: LoRA on μ0's trace expert, the action expert trained in full (`modules_to_save`)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, modules_to_save=NEW_MODULES
    )
    return get_peft_model(policy, config)


def _policy(model: Mu0ForActionPrediction | PeftModel) -> Mu0ForActionPrediction:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_adapter(
    model: Mu0ForActionPrediction | PeftModel,
    directory: str,
    processor: Mu0ActionProcessor | None = None,
    card: str | None = None,
) -> str:
    """Write the adapter folder atomically: config, new weights (and LoRA), processor, card."""
    policy = _policy(model)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".adapter.", dir=parent)
    try:
        if isinstance(model, PeftModel):
            model.save_pretrained(staging)
        else:
            state = {name: tensor.contiguous() for name, tensor in policy.action_expert.state_dict().items()}
            save_file(state, os.path.join(staging, ACTION_EXPERT_WEIGHTS), metadata={"format": "pt"})
        policy.config.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        if card is not None:
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def render_card(model: Mu0ForActionPrediction | PeftModel, repo_id: str, metrics: dict[str, float] | None = None,
                datasets: list[str] | None = None) -> str:
    from .publishing import render_adapter_card

    policy = _policy(model)
    peft_config = model.peft_config["default"] if isinstance(model, PeftModel) else None
    target_modules = None if peft_config is None else peft_config.target_modules
    if isinstance(target_modules, set):
        target_modules = sorted(target_modules)
    return render_adapter_card(
        base_model=policy.config.trace_checkpoint or "unrecorded",
        repo_id=repo_id,
        action_dim=policy.config.action_dim,
        state_dim=policy.config.state_dim,
        target_modules=target_modules,
        modules_to_save=NEW_MODULES,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        datasets=datasets,
        metrics=metrics,
    )


def push_adapter_to_hub(
    model: Mu0ForActionPrediction | PeftModel,
    repo_id: str,
    processor: Mu0ActionProcessor | None = None,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    private: bool = False,
) -> str:
    """Push only the adapter (new modules, LoRA, config, processor and a rendered card) to a Hub model repo."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        folder = save_adapter(model, os.path.join(workdir, "adapter"), processor, render_card(model, repo_id, metrics, datasets))
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload μ0 action adapter")
    return repo_id


def load_adapter(
    adapter: str,
    base: str | Mu0ForTracePrediction | None = None,
) -> Mu0ForActionPrediction | PeftModel:
    """The policy of an adapter folder or Hub repo, rebuilt on its base μ0 (`base`, or the one the adapter names).

    Returns a `PeftModel` when the adapter carries LoRA weights, else the plain policy; both have `predict_actions`.
    """
    directory = adapter if os.path.isdir(adapter) else snapshot_download(adapter)
    config = Mu0ActionConfig.from_pretrained(directory)
    base = base if base is not None else config.trace_checkpoint
    if base is None:
        raise ValueError(f"Adapter {adapter!r} does not name its base μ0: pass `base=` (a Hub id, path or model).")
    trace_model = Mu0ForTracePrediction.from_pretrained(base) if isinstance(base, str) else base
    fingerprint = trace_fingerprint(trace_model)
    if config.trace_fingerprint is not None and fingerprint != config.trace_fingerprint:
        raise ValueError(
            f"Adapter {adapter!r} was trained on a different μ0 than {base if isinstance(base, str) else 'the given model'} "
            f"(weights fingerprint {fingerprint[:12]} ≠ {config.trace_fingerprint[:12]}); load it on the base it names: "
            f"{config.trace_checkpoint!r}."
        )
    policy = Mu0ForActionPrediction(config)
    policy.trace_model.load_state_dict(trace_model.state_dict())
    policy.eval()
    if os.path.exists(os.path.join(directory, ADAPTER_CONFIG)):
        return _load_lora(policy, directory).eval()
    weights = os.path.join(directory, ACTION_EXPERT_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"Adapter {adapter!r} has neither {ADAPTER_CONFIG} nor {ACTION_EXPERT_WEIGHTS}.")
    policy.action_expert.load_state_dict(load_file(weights))
    return policy


def _load_lora(policy: Mu0ForActionPrediction, directory: str) -> PeftModel:
    """The LoRA adapter of `directory` on `policy`; one saved before the `Mu0Model` split (its target regex and weight
    keys name `trace_model.expert_layers`) is renamed to today's `trace_model.model.expert_layers` as it loads."""
    config = PeftConfig.from_pretrained(directory)
    targets = config.target_modules
    if isinstance(targets, str) and LEGACY_LORA_TARGET in targets:
        config.target_modules = targets.replace(LEGACY_LORA_TARGET, r"trace_model\.model\.expert_layers")
    return PeftModel.from_pretrained(policy, directory, config=config, key_mapping=legacy_key_mapping("trace_model."))


# ------------------------------------------------------------------------------------------------ training data
@dataclass
class RobotEpisode:
    """One demonstration: frames (T, H, W, 3) uint8, states (T, S), actions (T, A) and the task text."""

    frames: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    task: str

    def __post_init__(self):
        lengths = {len(self.frames), len(self.states), len(self.actions)}
        if len(lengths) != 1:
            raise ValueError(
                f"Episode {self.task!r}: frames, states and actions differ in length "
                f"({len(self.frames)}, {len(self.states)}, {len(self.actions)})."
            )
        if self.states.ndim != 2 or self.actions.ndim != 2:
            raise ValueError("states and actions must be (T, dim) arrays.")


def lerobot_robot_episodes(root: str, camera_key: str | None = None) -> list[RobotEpisode]:
    """Every episode of a LeRobotDataset (v3.0 or v2.1; local folder or Hub repo id) with its camera frames, states,
    actions and task text."""
    from ..dataset_builders.robot_sources import lerobot_refs, load_lerobot

    episodes = []
    for ref in lerobot_refs(root, camera_key):
        raw = load_lerobot(ref, camera_key)
        missing = [name for name in ("states", "actions") if name not in raw.metadata]
        if missing:
            raise ValueError(f"LeRobot dataset {root!r} has no {missing} for episode {ref.episode_id}; policies need both.")
        episodes.append(
            RobotEpisode(raw.frames, np.asarray(raw.metadata["states"]), np.asarray(raw.metadata["actions"]), raw.task or "")
        )
    return episodes


def action_samples(episodes: list[RobotEpisode], chunk_size: int, stride: int = 1) -> list[dict]:
    """One training row per (episode, step): the frame, the state and the next `chunk_size` actions with a mask.

    Chunks that run past an episode's end are padded with its last action and masked out, as in π0.
    """
    rows = []
    for episode in episodes:
        if len(episode.actions) < chunk_size:
            raise ValueError(
                f"An episode of {episode.task!r} has {len(episode.actions)} steps, fewer than one action chunk "
                f"({chunk_size}); drop it or lower chunk_size."
            )
        for step in range(0, len(episode.actions), stride):
            chunk = episode.actions[step : step + chunk_size]
            valid = np.zeros(chunk_size, dtype=bool)
            valid[: len(chunk)] = True
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - len(chunk), axis=0)])
            rows.append(
                {"image": episode.frames[step], "task": episode.task, "state": episode.states[step],
                 "actions": padded, "actions_mask": valid}
            )
    return rows


class Mu0ActionCollator:
    """Turns `action_samples` rows into a processed batch for `Mu0ForActionPrediction`."""

    def __init__(self, processor: Mu0ActionProcessor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            images=[row["image"] for row in rows],
            text=[row["task"] for row in rows],
            state=np.stack([row["state"] for row in rows]),
            actions=np.stack([row["actions"] for row in rows]),
            actions_mask=np.stack([row["actions_mask"] for row in rows]),
        )
        return dict(batch)


def train_policy(
    model: Mu0ForActionPrediction | PeftModel,
    processor: Mu0ActionProcessor,
    rows: list[dict],
    output_dir: str,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    gate_learning_rate_scale: float = 30.0,
    seed: int = 0,
    **training_kwargs,
):
    """Train the new modules (and LoRA) with the `transformers` Trainer; μ0's own weights stay frozen.

    The motion gates are single scalars that start closed; Adam moves a parameter by about the learning rate per
    step, so at the base rate a short run could never open them. They learn `gate_learning_rate_scale` times faster.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(seed)
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(50, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=seed,
        disable_tqdm=training_kwargs.pop("disable_tqdm", None),
        **training_kwargs,
    )
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gates = [p for name, p in trainable if name.endswith("motion_gate")]
    others = [p for name, p in trainable if not name.endswith("motion_gate")]
    groups = [{"params": others, "lr": learning_rate}]
    if gates:
        groups.append({"params": gates, "lr": learning_rate * gate_learning_rate_scale})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=Mu0ActionCollator(processor),
                      optimizers=(optimizer, None))
    trainer.train()
    return trainer


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "Mu0ActionCollator",
    "RobotEpisode",
    "action_samples",
    "add_trace_lora",
    "lerobot_robot_episodes",
    "load_adapter",
    "push_adapter_to_hub",
    "save_adapter",
    "train_policy",
]
