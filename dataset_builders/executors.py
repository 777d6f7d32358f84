"""Who runs TraceExtract's per-episode work: this machine (`LocalExecutor`) or a Ray cluster (`RayExecutor`).

Both executors only fill the builder's per-episode cache (`TraceExtract.extracted_episode`: one atomic `.npz` per
episode, its statistic reservoir, and a `failures.jsonl` line for an episode that fails), and the `episodes` and
`samples` datasets are then written from that cache in one process. So a Ray run and a local run of the same
settings give identical rows and statistics, and a killed run of either resumes where it stopped.

`extract_to_folder` is what `mu0 extract` runs: settings in, an output folder with both datasets, the statistics and
`failures.jsonl` out.
"""

import dataclasses
import json
import logging
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import datasets

from .extraction import ExtractionSettings, _pretrained
from .sources import EpisodeRef
from .statistics import save_statistics
from .trace_extract import REF_LISTERS, TraceExtract, TraceExtractConfig

logger = logging.getLogger(__name__)

# stage setting -> (its learned backend, the `_pretrained` kind, the setting naming the checkpoint)
LEARNED_BACKENDS = {
    "depth": ("depth_anything", "depth", "depth_model"),
    "keypoints": ("dino", "dino", "dino_model"),
    "tracker": ("cotracker", None, "cotracker_model"),  # torch.hub model, loaded by the tracking stage itself
    "captions": ("vlm", "vlm", "caption_model"),
}
SETTINGS_FILE = "extract_settings.json"
MAX_ATTEMPTS = 3  # on Ray, an episode that takes its worker down this often (a crash, the OOM killer) is skipped


def learned_stages(settings: ExtractionSettings) -> list[str]:
    """The stages whose backend is a learned model (these run where the GPUs are)."""
    return [stage for stage, (backend, _, _) in LEARNED_BACKENDS.items() if getattr(settings, stage) == backend]


def load_learned_models(settings: ExtractionSettings) -> None:
    """Load the learned stages' models into this process's model cache before the first episode, so a missing
    checkpoint stops the run once instead of failing every episode, and each worker loads them exactly once."""
    for stage in learned_stages(settings):
        _, kind, checkpoint = LEARNED_BACKENDS[stage]
        if kind is not None:
            _pretrained(kind, getattr(settings, checkpoint))


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TraceExtractConfig) if f.name not in
                      {f.name for f in dataclasses.fields(datasets.BuilderConfig)} | {"settings", "work_dir", "episode_ids"})
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(ExtractionSettings))
# what may differ between runs sharing a work folder: which episodes, not how each is extracted
NOT_RECORDED = ("num_episodes", "shard_index", "num_shards")


def read_options(path: str) -> tuple[dict, dict]:
    """A YAML or JSON settings file holding TraceExtract's keywords: source fields at the top, stage backends and
    trace lengths under `settings` (as in `TraceExtract(source=..., settings={...})`)."""
    with open(path) as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            options = yaml.safe_load(handle) or {}
        elif path.endswith(".json"):
            options = json.load(handle)
        else:
            raise ValueError(f"Settings file {path!r}: use a .yaml, .yml or .json file.")
    if not isinstance(options, dict) or not isinstance(options.get("settings", {}), dict):
        raise ValueError(f"Settings file {path!r} must hold a mapping, with the stage settings under 'settings'.")
    settings = options.pop("settings", {})
    check_options(options, settings, where=f"settings file {path!r}")
    return options, settings


def check_options(config: dict, settings: dict, where: str = "options") -> None:
    unknown = sorted(set(config) - set(CONFIG_FIELDS)) + sorted(f"settings.{key}" for key in set(settings) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"Unknown keys {unknown} in {where}; source keys: {list(CONFIG_FIELDS)}, "
                         f"settings keys: {list(SETTING_FIELDS)}.")


@dataclass
class EpisodeOutcome:
    episode_id: str
    num_frames: int  # 0 when the episode failed or was rejected
    failed: bool
    worker: str  # host:pid that extracted (or found) it


def make_builder(work_dir: str, config: dict, settings: dict, config_name: str = "episodes") -> TraceExtract:
    return TraceExtract(config_name=config_name, cache_dir=os.path.join(work_dir, "datasets"), work_dir=work_dir,
                        settings=settings, **config)


def extract_one(builder: TraceExtract, ref: EpisodeRef) -> EpisodeOutcome:
    """One episode through the builder's cache. Any error is the episode's failure (logged with its reason in
    failures.jsonl), never the run's: a corrupt video among millions must not stop the other workers."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        episode = builder.extracted_episode(ref)
    except Exception as error:  # the builder already records ValueError / EpisodeRejected itself
        logger.warning("Episode %s failed: %s: %s", ref.episode_id, type(error).__name__, error)
        builder._record_failure(ref.episode_id, "failed", f"{type(error).__name__}: {error}")
        episode = None
    return EpisodeOutcome(ref.episode_id, 0 if episode is None else len(episode.frames), episode is None, worker)


class LocalExecutor:
    """Episodes one after another in this process (the models of learned stages loaded once)."""

    def run(self, work_dir: str, config: dict, settings: dict, refs: list[EpisodeRef]) -> Iterator[EpisodeOutcome]:
        builder = make_builder(work_dir, config, settings)
        load_learned_models(builder.config.extraction)
        for ref in refs:
            yield extract_one(builder, ref)


def _batch_refs(batch: dict) -> list[EpisodeRef]:
    names = [f.name for f in dataclasses.fields(EpisodeRef)]
    return [EpisodeRef(**{name: value.item() if hasattr(value, "item") else value for name, value in zip(names, row)})
            for row in zip(*(batch[name] for name in names))]


def _outcome_batch(outcomes: list[EpisodeOutcome]) -> dict:
    return {f.name: [getattr(outcome, f.name) for outcome in outcomes] for f in dataclasses.fields(EpisodeOutcome)}


def _extract_batch(batch: dict, work_dir: str, config: dict, settings: dict) -> dict:
    """A Ray task: classical stages only, so no model to keep between episodes."""
    builder = make_builder(work_dir, config, settings)
    return _outcome_batch([extract_one(builder, ref) for ref in _batch_refs(batch)])


class _LearnedStageWorker:
    """A Ray actor of the learned-stage pool: loads the models once, then extracts episode after episode."""

    def __init__(self, work_dir: str, config: dict, settings: dict, torch_threads: int):
        import torch

        # Ray starts workers with one thread; the driver's count keeps the models' floating-point sums, and so the
        # rows, identical to a local run on the same machine.
        torch.set_num_threads(torch_threads)
        self.builder = make_builder(work_dir, config, settings)
        load_learned_models(self.builder.config.extraction)

    def __call__(self, batch: dict) -> dict:
        return _outcome_batch([extract_one(self.builder, ref) for ref in _batch_refs(batch)])


@dataclass
class RayExecutor:
    """Episode references as a Ray dataset, one block per episode, extracted in parallel on a Ray cluster.

    Settings whose stages are all classical run as Ray tasks (`num_workers` at a time, `cpus_per_worker` each);
    with a learned stage (depth_anything, dino, cotracker, vlm) the episodes go through an actor pool of
    `num_actors` actors holding `gpus_per_actor` GPUs each, which load the models once. `address` joins a running
    cluster ("auto", "ray://head:10001", ...); without one a local Ray instance starts (and stops at the end).
    """

    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    num_cpus: int | None = None  # for a local instance only

    def __post_init__(self):
        for name in ("num_workers", "num_actors", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if self.gpus_per_actor < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_actor must be >= 0 and cpus_per_worker > 0.")

    def run(self, work_dir: str, config: dict, settings: dict, refs: list[EpisodeRef]) -> Iterator[EpisodeOutcome]:
        try:
            import ray
        except ImportError as error:
            raise ImportError('The Ray executor needs Ray: pip install "mu0[scale]".') from error
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        previous = context.enable_progress_bars, context.max_errored_blocks
        try:
            context.enable_progress_bars = False  # the caller shows one bar instead
            context.max_errored_blocks = -1  # an episode whose worker keeps dying is dropped, and logged below
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines under the bar
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # nor "progress bars disabled"
            yield from self._run(ray, work_dir, config, settings, refs)
        finally:
            context.enable_progress_bars, context.max_errored_blocks = previous
            if started:
                ray.shutdown()

    def _run(self, ray, work_dir: str, config: dict, settings: dict, refs: list[EpisodeRef]) -> Iterator[EpisodeOutcome]:
        if not refs:
            return
        references = ray.data.from_items([dataclasses.asdict(ref) for ref in refs], override_num_blocks=len(refs))
        arguments = dict(work_dir=work_dir, config=config, settings=settings)
        with warnings.catch_warnings():  # Ray has no named parameter for retries yet, only the deprecated kwargs
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            if learned_stages(ExtractionSettings(**settings)):
                import torch

                outcomes = references.map_batches(
                    _LearnedStageWorker, fn_constructor_kwargs=dict(arguments, torch_threads=torch.get_num_threads()),
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(size=self.num_actors), num_gpus=self.gpus_per_actor,
                    num_cpus=self.cpus_per_worker, max_task_retries=MAX_ATTEMPTS - 1,
                )
            else:
                outcomes = references.map_batches(
                    _extract_batch, fn_kwargs=arguments, batch_size=1, num_cpus=self.cpus_per_worker,
                    compute=ray.data.TaskPoolStrategy(size=self.num_workers), max_retries=MAX_ATTEMPTS - 1,
                )
        done = set()
        for row in outcomes.iter_rows():
            outcome = EpisodeOutcome(**{key: value.item() if hasattr(value, "item") else value for key, value in row.items()})
            done.add(outcome.episode_id)
            yield outcome
        lost = [ref for ref in refs if ref.episode_id not in done]
        if lost:  # errors inside an episode are caught by extract_one: these took their worker process down
            builder = make_builder(work_dir, config, settings)
            for ref in lost:
                builder._record_failure(ref.episode_id, "failed", f"its Ray worker died {MAX_ATTEMPTS} times (see the Ray logs)")
                yield EpisodeOutcome(ref.episode_id, 0, True, "")


def _check_work_dir(work_dir: str, recorded: dict) -> None:
    """A work folder caches episodes by id only: refuse to mix episodes extracted with different settings."""
    path = os.path.join(work_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as handle:
            previous = json.load(handle)
        if previous != recorded:
            changed = sorted(key for key in previous.keys() | recorded.keys() if previous.get(key) != recorded.get(key))
            raise ValueError(f"Work folder {work_dir} holds episodes extracted with other settings (differing: "
                             f"{changed}); use another --work-dir or delete it.")
        return
    os.makedirs(work_dir, exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(recorded, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _save_dataset(dataset: datasets.Dataset, path: str, statistics: dict | None = None) -> None:
    """save_to_disk (and the statistics beside it) into a temp folder, then rename: a reader never sees a
    half-written dataset."""
    temporary = path + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    dataset.save_to_disk(temporary)
    if statistics is not None:
        save_statistics(statistics, temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def extract_to_folder(config: dict, settings: dict, output_dir: str, executor=None, work_dir: str | None = None,
                      push_to_hub: str | None = None, progress: bool = True) -> dict:
    """Extract every episode of `config` (TraceExtractConfig fields) with `settings` (ExtractionSettings fields) and
    write `output_dir/{episodes,samples}` (save_to_disk; samples carries trace_statistics.json for `mu0 train`),
    `trace_statistics.json`, `failures.jsonl` and `extract_settings.json`. Returns a summary."""
    from tqdm.auto import tqdm

    check_options(config, settings)
    work_dir = work_dir or os.path.join(output_dir, "work")
    builder = make_builder(work_dir, config, settings)
    builder.config.validate()  # bad options fail here, before any worker starts
    # every option with its default filled in: a settings file that reproduces this run
    resolved = {key: getattr(builder.config, key) for key in CONFIG_FIELDS}
    resolved["settings"] = dataclasses.asdict(builder.config.extraction)
    _check_work_dir(work_dir, {key: value for key, value in resolved.items() if key not in NOT_RECORDED})
    refs = REF_LISTERS[builder.config.source](builder.config)[builder.config.shard_index :: builder.config.num_shards]
    summary = {"episodes": 0, "frames": 0, "failures": 0}
    extracted, workers = [], set()
    with tqdm(total=len(refs), desc="mu0 extract", unit="episode", disable=not progress) as bar:
        for outcome in (executor or LocalExecutor()).run(work_dir, config, settings, refs):
            summary["failures" if outcome.failed else "episodes"] += 1
            summary["frames"] += outcome.num_frames
            if outcome.worker:  # empty for an episode whose Ray worker died
                workers.add(outcome.worker)
            if not outcome.failed:
                extracted.append(outcome.episode_id)
            bar.set_postfix(frames=summary["frames"], failures=summary["failures"], refresh=False)
            bar.update()
    if not extracted:
        raise RuntimeError(f"No episode of {len(refs)} could be extracted; the reasons are in "
                           f"{os.path.join(work_dir, 'failures.jsonl')}.")
    tables, statistics = _write_outputs(work_dir, {**config, "episode_ids": sorted(extracted)}, settings, output_dir)
    failures = _failures(work_dir, {ref.episode_id for ref in refs} - set(extracted))
    _write_atomically(os.path.join(output_dir, "failures.jsonl"), "".join(json.dumps(f) + "\n" for f in failures))
    _write_atomically(os.path.join(output_dir, SETTINGS_FILE), json.dumps(resolved, indent=2, sort_keys=True))
    summary.update(samples=len(tables["samples"]), statistics=statistics, workers=sorted(workers))
    if push_to_hub:
        from ..training.pretrain import push_samples_to_hub

        tables["episodes"].push_to_hub(push_to_hub, config_name="episodes")
        stages = ("depth", "camera", "keypoints", "tracker", "captions")
        push_samples_to_hub(tables["samples"], statistics, push_to_hub, settings_summary={
            "source": builder.config.source, **{stage: resolved["settings"][stage] for stage in stages}})
        summary["pushed_to"] = push_to_hub
    return summary


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _write_outputs(work_dir: str, config: dict, settings: dict, output_dir: str) -> tuple[dict, dict]:
    """Both datasets from the filled cache (no episode is extracted again) and the statistics of those episodes."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the extraction bar was the one to watch; writing the rows is quick
    try:
        tables = {}
        for name in ("episodes", "samples"):
            builder = make_builder(work_dir, config, settings, config_name=name)
            builder.download_and_prepare()
            tables[name] = builder.as_dataset(split="train")
        statistics = builder.compute_statistics(episode_ids=config["episode_ids"])
        os.makedirs(output_dir, exist_ok=True)
        _save_dataset(tables["episodes"], os.path.join(output_dir, "episodes"))
        _save_dataset(tables["samples"], os.path.join(output_dir, "samples"), statistics)  # what `mu0 train` reads
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    save_statistics(statistics, output_dir)
    return tables, statistics


def _failures(work_dir: str, episode_ids: set[str]) -> list[dict]:
    """The latest failure record of each of `episode_ids` (this run's failed episodes)."""
    path = os.path.join(work_dir, "failures.jsonl")
    if not os.path.exists(path):
        return []
    latest = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if record["episode_id"] in episode_ids:
                latest[record["episode_id"]] = record
    return [record for _, record in sorted(latest.items())]


__all__ = ["EpisodeOutcome", "LocalExecutor", "RayExecutor", "extract_to_folder", "learned_stages", "read_options"]
