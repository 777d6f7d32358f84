"""Publishing a trained μ0: model, processor with its statistics, and a model card rendered from `model_cards/`."""

from importlib import resources

from huggingface_hub import HfApi

from .. import Mu0ForTracePrediction, Mu0Processor


def _metrics_table(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "No evaluation was run for this checkpoint."
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())]
    return "\n".join(lines)


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
    template = resources.files("mu0.model_cards").joinpath("model_card.md").read_text()
    return template.format(
        license=license,
        datasets_yaml="\n".join(f"- {name}" for name in datasets) or "[]",
        base_model=config.backbone_checkpoint or "none",
        model_name=repo_id.split("/")[-1],
        backbone=config.backbone_checkpoint or f"random {config.vlm_config.model_type}",
        num_vlm_layers=config.num_vlm_layers,
        dino=config.dino_checkpoint or ("random" if config.use_dino else "disabled"),
        expert_layers=len(model.expert_layers),
        expert_width=config.expert_hidden_size,
        horizon=config.horizon,
        history=config.history_length,
        control_points=config.num_control_points,
        total_parameters=model.num_parameters(),
        trainable_parameters=model.num_parameters(only_trainable=True),
        datasets_text=", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in datasets) or "not recorded",
        recipe=recipe,
        delta_scale=[round(value, 5) for value in processor.delta_scale],
        depth_log_range=processor.depth_log_range,
        metrics_table=_metrics_table(metrics),
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


__all__ = ["push_mu0_to_hub", "render_model_card"]
