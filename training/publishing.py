"""Publishing to the Hub: μ0 checkpoints, action adapters and TraceExtract datasets, with cards rendered from
`model_cards/` so every repository states what it holds, how it was made and how to load it."""

import math
from importlib import resources

from huggingface_hub import HfApi

from .. import Mu0ForTracePrediction, Mu0Processor


def _template(name: str) -> str:
    return resources.files("mu0.model_cards").joinpath(name).read_text(encoding="utf-8")


def _metrics_table(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "No evaluation was run for this checkpoint."
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())]
    return "\n".join(lines)


def _datasets_yaml(datasets: list[str]) -> str:
    return "\n".join(f"- {name}" for name in datasets) or "[]"


def _datasets_text(datasets: list[str]) -> str:
    return ", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in datasets) or "not recorded"


def _training_domain(processor: Mu0Processor) -> str:
    """The depth and frame ranges the processor checks inputs against, in words."""
    lines = []
    if processor.depth_log_range is not None:
        low, high = (math.exp(value) for value in processor.depth_log_range)
        lines.append(f"- Depth: {low:.2f}–{high:.2f} m (1st–99th percentile of the training depth maps)")
    ranges = processor.image_ranges
    if ranges is not None:
        lines.append(f"- Frames: {ranges['width'][0]}–{ranges['width'][1]} × {ranges['height'][0]}–{ranges['height'][1]} "
                     "pixels (width × height)")
        lines.append(f"- Mean intensity: {ranges['mean_intensity'][0]:.2f}–{ranges['mean_intensity'][1]:.2f} "
                     "(0 black, 1 white; 1st–99th percentile of the frames)")
    return "\n".join(lines) or "- Not recorded: the processor was built without depth or frame ranges."


def render_model_card(
    model: Mu0ForTracePrediction,
    processor: Mu0Processor,
    repo_id: str,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str = "custom",
    license: str = "apache-2.0",
) -> str:
    """The card text: architecture and sizes read from the model, statistics from the processor."""
    config = model.config
    datasets = datasets or []
    return _template("model_card.md").format(
        license=license,
        datasets_yaml=_datasets_yaml(datasets),
        base_model=config.backbone_checkpoint or "none",
        model_name=repo_id.split("/")[-1],
        backbone=config.backbone_checkpoint or f"random {config.vlm_config.model_type}",
        num_vlm_layers=config.num_vlm_layers,
        dino=config.dino_checkpoint or ("random" if config.use_dino else "disabled"),
        expert_layers=len(model.model.expert_layers),
        expert_width=config.expert_hidden_size,
        horizon=config.horizon,
        history=config.history_length,
        control_points=config.num_control_points,
        total_parameters=model.num_parameters(),
        trainable_parameters=model.num_parameters(only_trainable=True),
        datasets_text=_datasets_text(datasets),
        recipe=recipe,
        delta_scale=[round(value, 5) for value in processor.delta_scale],
        depth_log_range=processor.depth_log_range,
        training_domain=_training_domain(processor),
        metrics_table=_metrics_table(metrics),
        repo_id=repo_id,
    )


def render_adapter_card(
    base_model: str,
    repo_id: str,
    action_dim: int,
    state_dim: int,
    target_modules: str | list[str] | None,
    modules_to_save: list[str],
    trainable_parameters: int,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    license: str = "apache-2.0",
) -> str:
    """The card of an action adapter: its base μ0 (so the Hub links them), what the LoRA touches and what trains in
    full, and how to rebuild the policy with `load_adapter`. `target_modules` None means no LoRA on μ0."""
    datasets = datasets or []
    if target_modules is None:
        lora = "none (μ0 frozen)"
    elif isinstance(target_modules, str):
        lora = f"`{target_modules}`"
    else:
        lora = ", ".join(f"`{name}`" for name in target_modules)
    return _template("adapter_card.md").format(
        base_model=base_model,
        license=license,
        datasets_yaml=_datasets_yaml(datasets),
        model_name=repo_id.split("/")[-1],
        action_dim=action_dim,
        state_dim=state_dim,
        target_modules=lora.replace("|", "\\|"),  # a regex alternation would split the Markdown table cell
        modules_to_save=", ".join(f"`{name}`" for name in modules_to_save) or "none",
        trainable_parameters=trainable_parameters,
        datasets_text=_datasets_text(datasets),
        metrics_table=_metrics_table(metrics),
        repo_id=repo_id,
    )


def _rounded(values) -> str:
    return "not recorded" if values is None else str([round(float(value), 5) for value in values])


def render_dataset_card(
    repo_id: str,
    settings_summary: dict,
    statistics: dict,
    num_episodes: int,
    num_samples: int,
    license: str = "apache-2.0",
) -> str:
    """The card of a TraceExtract dataset: counts, normalisation statistics and the extraction settings (source and
    stage backends, `settings_summary`), so users know which traces are measured and which are estimated."""
    if settings_summary:
        rows = [f"| {key} | {value} |" for key, value in sorted(settings_summary.items())]
        settings_table = "\n".join(["| setting | value |", "|---|---|", *rows])
    else:
        settings_table = "The extraction settings were not recorded."
    name = repo_id.split("/")[-1]
    return _template("dataset_card.md").format(
        license=license,
        pretty_name=name,
        num_episodes=num_episodes,
        num_samples=num_samples,
        delta_scale=_rounded(statistics.get("delta_scale")),
        depth_log_range=_rounded(statistics.get("depth_log_range")),
        settings_table=settings_table,
        repo_id=repo_id,
    )


def push_mu0_to_hub(
    model: Mu0ForTracePrediction,
    processor: Mu0Processor,
    repo_id: str,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str = "custom",
    private: bool = False,
) -> str:
    """Push model (with its code), processor and card in one go; refuses a processor without statistics."""
    processor.require_delta_scale()  # a checkpoint without its normalisation cannot produce metric traces
    card = render_model_card(model, processor, repo_id, datasets, metrics, recipe)
    model.push_to_hub(repo_id, private=private)
    processor.push_to_hub(repo_id, private=private)
    HfApi().upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id,
                        commit_message="Add model card")
    return repo_id


__all__ = ["push_mu0_to_hub", "render_adapter_card", "render_dataset_card", "render_model_card"]
