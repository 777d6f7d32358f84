"""The pretraining recipe: TraceExtract `samples` (local or streamed from the Hub) -> `Mu0Trainer` -> checkpoint.

Recipes are JSON files in `mu0/training/recipes/` (or any path): the model (a preset or the full config, optionally
with pretrained backbones), the collator's sampling and augmentation, evaluation, and `TrainingArguments` fields.
"""

import json
import logging
import os
from importlib import resources

import torch

from transformers import TrainingArguments, set_seed

from .. import Mu0Config, Mu0ForTracePrediction, Mu0ImageProcessor, Mu0Processor, build_character_tokenizer
from ..dataset_builders.statistics import STATISTICS_FILE, load_statistics, save_statistics
from ..presets import preset_config
from .collator import Mu0TraceCollator
from .trainer import Mu0Trainer, WeightAverage

logger = logging.getLogger(__name__)


def available_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("mu0.training").joinpath("recipes").iterdir()
                  if p.name.endswith(".json"))


def load_recipe(name_or_path: str) -> dict:
    """A named recipe (`tiny-cpu`, `mu0-smolvlm2-2.2b`) or a path to a recipe JSON file."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as handle:
            try:
                return json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"Recipe {name_or_path!r} is not valid JSON: {error}") from None
    if name_or_path not in available_recipes():
        raise ValueError(f"Unknown recipe {name_or_path!r}: choose from {available_recipes()} or give a JSON path.")
    return json.loads(resources.files("mu0.training").joinpath("recipes", f"{name_or_path}.json").read_text())


def load_samples(dataset: str, split: str = "train"):
    """A `samples` dataset and its statistics: a folder from `save_samples` or a Hub dataset repo (streamed)."""
    statistics = load_statistics(dataset)
    if os.path.isdir(dataset):
        from datasets import load_from_disk

        return load_from_disk(dataset), statistics
    from datasets import load_dataset

    return load_dataset(dataset, "samples", split=split, streaming=True), statistics


def load_episodes(dataset: str):
    """An `episodes` dataset: a folder saved with `save_to_disk` or a Hub dataset repo."""
    if os.path.isdir(dataset):
        from datasets import load_from_disk

        return load_from_disk(dataset)
    from datasets import load_dataset

    return load_dataset(dataset, "episodes", split="train")


def hold_out_episodes(samples, num_episodes: int):
    """Split a local `samples` dataset into (train, held-out) by whole episodes, the last `num_episodes` episode
    ids in sorted order held out, so no evaluation row shares an episode with a training row."""
    episode_of_row = samples["episode_id"]
    episode_ids = sorted(set(episode_of_row))
    if not 0 < num_episodes < len(episode_ids):
        raise ValueError(f"Cannot hold out {num_episodes} of {len(episode_ids)} episodes: at least one must be held "
                         "out and one left for training.")
    held_out = set(episode_ids[-num_episodes:])
    rows = {True: [], False: []}
    for index, episode_id in enumerate(episode_of_row):
        rows[episode_id in held_out].append(index)
    return samples.select(rows[False]), samples.select(rows[True])


def save_samples(samples, statistics: dict, path: str) -> None:
    """Save a `samples` dataset with its statistics, the folder layout `load_samples` reads."""
    samples.save_to_disk(path)
    save_statistics(statistics, path)


def push_samples_to_hub(
    samples, statistics: dict, repo_id: str, settings_summary: dict | None = None, license: str = "apache-2.0"
) -> None:
    """Publish a `samples` dataset (parquet, streamable) with the statistics file `load_samples` reads back and a
    dataset card. `settings_summary` (source and stage backends) goes into the card. The card keeps the `configs`
    that `push_to_hub` wrote, so it lists only data the repository holds."""
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    from .publishing import render_dataset_card

    samples.push_to_hub(repo_id, config_name="samples")
    card = DatasetCard(render_dataset_card(repo_id, settings_summary or {}, statistics,
                                           len(samples.unique("episode_id")), len(samples), license))
    pushed = DatasetCard.load(repo_id, repo_type="dataset").data
    for key in ("configs", "dataset_info"):
        if pushed.get(key) is not None:
            card.data[key] = pushed.get(key)
    HfApi().create_commit(
        repo_id,
        [CommitOperationAdd(STATISTICS_FILE, json.dumps(statistics, indent=2).encode()),
         CommitOperationAdd("README.md", str(card).encode())],
        repo_type="dataset",
        commit_message="Add trace statistics and dataset card",
    )


def build_model_and_processor(recipe: dict, statistics: dict) -> tuple[Mu0ForTracePrediction, Mu0Processor]:
    """The recipe's model (random preset, or the full config with pretrained backbones) and a processor with stats."""
    model_recipe = recipe["model"]
    if model_recipe.get("preset"):
        config = preset_config(model_recipe["preset"], **model_recipe.get("overrides", {}))
        model = Mu0ForTracePrediction(config)
        tokenizer = build_character_tokenizer()
    else:
        from transformers import AutoTokenizer

        config = Mu0Config(**model_recipe.get("overrides", {}))
        model = Mu0ForTracePrediction.from_backbones(config) if model_recipe.get("from_backbones") else Mu0ForTracePrediction(config)
        tokenizer = AutoTokenizer.from_pretrained(config.backbone_checkpoint)
    if model_recipe.get("backbone_dtype"):  # e.g. the released bf16 frozen backbone beside an fp32 expert
        model.set_backbone_dtype(getattr(torch, model_recipe["backbone_dtype"]))
    processor = Mu0Processor(
        Mu0ImageProcessor(image_size=config.image_size, dino_image_size=config.dino_image_size),
        tokenizer,
        **statistics,
        history_length=config.history_length,
        horizon=config.horizon,
        max_prompt_length=config.max_prompt_length,
        max_queries=config.max_queries,
    )
    return model, processor


def make_trainer(
    recipe: dict,
    train_dataset,
    statistics: dict,
    output_dir: str,
    eval_dataset=None,
    max_steps: int | None = None,
    model: Mu0ForTracePrediction | None = None,
    processor: Mu0Processor | None = None,
) -> Mu0Trainer:
    arguments = dict(recipe["training"])
    if model is None or processor is None:
        set_seed(arguments.get("seed", 42))  # the same recipe builds the same initial model
        model, processor = build_model_and_processor(recipe, statistics)
    if max_steps is not None:
        arguments["max_steps"] = max_steps
    streamed = not hasattr(train_dataset, "select")
    if streamed:
        # Each process streams its own shards: accelerate splits the stream by shard (`IterableDataset.shard`, the
        # split `split_dataset_by_node` makes) instead of process 0 reading every row and sending each its batch.
        # A stream split beforehand would be split a second time, so it is left whole here.
        arguments["accelerator_config"] = {**arguments.get("accelerator_config", {}), "dispatch_batches": False}
    gradient_checkpointing = arguments.pop("gradient_checkpointing", False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    args = TrainingArguments(
        output_dir=output_dir,
        remove_unused_columns=False,  # the collator needs the raw TraceExtract columns
        report_to=[],
        eval_strategy="no",
        **arguments,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size != launched:  # e.g. a GPU accelerate config on a machine without GPUs
        raise RuntimeError(f"Launched as {launched} processes, but training would run as {args.world_size}: each "
                           "process would train alone and write the same output folder. On CPUs set \"use_cpu\": true "
                           "in the recipe's training arguments (gloo); with GPUs check that torch sees them.")
    if streamed and train_dataset.num_shards < args.world_size:
        logger.warning("The stream has %d shards for %d processes: every process reads all of it and keeps its "
                       "part of each batch. Push the dataset with num_shards >= the number of processes.",
                       train_dataset.num_shards, args.world_size)
    collator_settings = recipe.get("collator", {})
    evaluation = recipe.get("evaluation", {})
    config = model.config
    trainer = Mu0Trainer(
        model=model,
        args=args,
        # numpy rows decode per-query arrays without Python lists (an order of magnitude faster)
        train_dataset=train_dataset.with_format("numpy"),
        eval_dataset=None if eval_dataset is None else eval_dataset.with_format("numpy"),
        processing_class=processor,
        data_collator=Mu0TraceCollator(processor, horizon=config.horizon, use_depth=config.use_depth, seed=args.seed,
                                       **collator_settings),
        eval_collator=Mu0TraceCollator(processor, horizon=config.horizon, use_depth=False, training=False,
                                       max_queries=evaluation.get("max_queries", 16)),
        num_eval_samples=evaluation.get("num_samples", 5),
        eval_seed=args.seed,
    )
    if recipe.get("ema_decay") is not None:
        trainer.add_callback(WeightAverage(recipe["ema_decay"]))
    return trainer


__all__ = [
    "available_recipes",
    "build_model_and_processor",
    "hold_out_episodes",
    "load_recipe",
    "load_episodes",
    "load_samples",
    "make_trainer",
    "push_samples_to_hub",
    "save_samples",
]
