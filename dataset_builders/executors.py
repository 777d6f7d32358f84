"""Who runs TraceExtract's per-episode work: this machine (`LocalExecutor`) or a Ray cluster (`RayExecutor`).

Both executors only fill the builder's per-episode cache (one atomic `.npz` per episode, its statistic reservoir, and
a `failures.jsonl` line for an episode that fails): the local one through `TraceExtract.extracted_episode`, the Ray
one through a Ray Data pipeline of the same stages (`extraction.STAGES`) that commits each episode the same way.
The `episodes` and `samples` datasets are then written from that cache in one process. So a Ray run and a local run
of the same settings give identical rows and statistics, and a killed run of either resumes where it stopped.

`extract_to_folder` is what `mu0 extract` runs: settings in, an output folder with both datasets, the statistics and
`failures.jsonl` out.
"""

import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets

from .extraction import (
    LEARNED_BACKENDS,
    STAGES,
    EpisodeRejected,
    EpisodeState,
    ExtractionSettings,
    finish_episode,
    learned_stages,
    stage_model,
)
from .sources import EpisodeRef
from .statistics import save_statistics
from .trace_extract import GENERATED_SOURCES, REF_LISTERS, TraceExtract, TraceExtractConfig

logger = logging.getLogger(__name__)

# Errors every later episode would meet too: no space left, disk quota exceeded, read-only file system.
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
SETTINGS_FILE = "extract_settings.json"
MAX_ATTEMPTS = 3  # on Ray, an episode that takes its worker down this often (a crash, the OOM killer) is skipped


def load_learned_models(settings: ExtractionSettings) -> None:
    """Load the learned stages' models into this process's model cache before the first episode, so a missing
    checkpoint stops the run once instead of failing every episode, and each worker loads them exactly once."""
    for stage in learned_stages(settings):
        stage_model(stage, settings)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TraceExtractConfig) if f.name not in
                      {f.name for f in dataclasses.fields(datasets.BuilderConfig)} | {"settings", "work_dir", "episode_ids"})
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(ExtractionSettings))
# what may differ between runs sharing a work folder: which episodes, not how each is extracted
NOT_RECORDED = ("num_episodes", "episodes", "shard_index", "num_shards")
GENERATION_FIELDS = ("num_episodes", "seed", "num_frames", "image_size", "moving_camera")  # procedural/mujoco only


def read_options(path: str) -> tuple[dict, dict]:
    """A YAML or JSON settings file holding TraceExtract's keywords: source fields at the top, stage backends and
    trace lengths under `settings` (as in `TraceExtract(source=..., settings={...})`)."""
    import yaml

    with open(path) as handle:
        try:
            if path.endswith((".yaml", ".yml")):
                options = yaml.safe_load(handle) or {}  # safe: a python tag is refused, never run
            elif path.endswith(".json"):
                options = json.load(handle)
            else:
                raise ValueError(f"Settings file {path!r}: use a .yaml, .yml or .json file.")
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise ValueError(f"Settings file {path!r} cannot be read: {' '.join(str(error).split())}") from None
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
    worker: str  # host:pid[@Ray node id] that extracted (or found) it
    # on Ray: seconds spent in each stage ("decode", the `STAGES`, "write"), for sizing the pools (bench_extract_ray)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def make_builder(work_dir: str, config: dict, settings: dict, config_name: str = "episodes") -> TraceExtract:
    return TraceExtract(config_name=config_name, cache_dir=os.path.join(work_dir, "datasets"), work_dir=work_dir,
                        settings=settings, **config)


def _worker() -> str:
    """host:pid, and in a Ray process also @ its node's id: Ray nodes in containers or on one machine share host names."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        worker += f"@{ray.get_runtime_context().get_node_id()}"
    return worker


def record_failure(builder: TraceExtract, episode_id: str, error: Exception) -> EpisodeOutcome:
    """Log `error` as the episode's failure in failures.jsonl, worded as the builder words its own (rejections and
    bad input by their message, anything else with its type too), so both executors log the same lines. A full
    disk or a read-only file system is the machine's failure, not the episode's: it is raised and stops the run."""
    if isinstance(error, OSError) and error.errno in MACHINE_ERRNOS:
        raise error
    kind = "rejected" if isinstance(error, EpisodeRejected) else "failed"
    reason = str(error) if isinstance(error, (ValueError, EpisodeRejected)) else f"{type(error).__name__}: {error}"
    builder._record_failure(episode_id, kind, reason)
    return EpisodeOutcome(episode_id, 0, True, _worker())


def extract_one(builder: TraceExtract, ref: EpisodeRef) -> EpisodeOutcome:
    """One episode through the builder's cache. Any error is the episode's failure (logged with its reason in
    failures.jsonl), never the run's: a corrupt video among millions must not stop the other workers."""
    try:
        episode = builder.extracted_episode(ref)  # records bad input and rejections itself, returning None
    except Exception as error:
        return record_failure(builder, ref.episode_id, error)
    return EpisodeOutcome(ref.episode_id, 0 if episode is None else len(episode.frames), episode is None, _worker())


class LocalExecutor:
    """Episodes one after another in this process (the models of learned stages loaded once)."""

    def run(self, work_dir: str, config: dict, settings: dict, refs: list[EpisodeRef]) -> Iterator[EpisodeOutcome]:
        builder = make_builder(work_dir, config, settings)
        load_learned_models(builder.config.extraction)
        for ref in refs:
            yield extract_one(builder, ref)


@dataclass
class EpisodeInFlight:
    """One episode between the steps of the Ray pipeline (a row): its reference, the stages' state so far and,
    once it is done (found in the cache, failed, or written), its outcome, which later steps pass on untouched."""

    ref: EpisodeRef
    state: EpisodeState | None = None
    outcome: EpisodeOutcome | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def pipeline_steps(settings: ExtractionSettings) -> list[tuple[str, ...]]:
    """The Ray pipeline's steps: "decode", the stages of `STAGES` in order, then "write", grouped so that each
    learned stage is a step of its own (an actor pool) and the classical stages between them share one (a task)."""
    learned = learned_stages(settings)
    steps, classical = [], ["decode"]
    for stage in STAGES:
        if stage in learned:
            steps += [tuple(classical)] if classical else []
            steps.append((stage,))
            classical = []
        else:
            classical.append(stage)
    return steps + [(*classical, "write")]


def advance(row: dict, stages: tuple[str, ...], work_dir: str, config: dict, settings: dict) -> dict:
    """Run the pipeline steps `stages` on the row's episode. An error is that episode's failure, logged in
    failures.jsonl as the local executor logs it; the episode then passes through the remaining steps as done."""
    # the first step gets the reference's fields (plain columns), the later ones the episode in flight
    flight = row["episode"] if "episode" in row else EpisodeInFlight(EpisodeRef(**row))
    row = {"episode": flight}
    if flight.outcome is not None:
        return row
    builder = make_builder(work_dir, config, settings)
    try:
        for stage in stages:
            if flight.outcome is not None:  # found in the cache
                break
            start = time.perf_counter()
            try:
                if stage == "decode":  # a previous run may have finished it
                    cached = builder.cached_episode(flight.ref)
                    if cached is None:
                        flight.state = EpisodeState(builder._load_raw(flight.ref))
                    else:
                        flight.outcome = EpisodeOutcome(flight.ref.episode_id, len(cached.frames), False, _worker())
                elif stage == "write":
                    episode = builder.commit_episode(finish_episode(flight.state, builder.config.extraction))
                    flight.state = None
                    flight.outcome = EpisodeOutcome(episode.episode_id, len(episode.frames), False, _worker())
                else:
                    STAGES[stage](flight.state, builder.config.extraction)
            finally:  # a stage that rejects its episode took its time too
                flight.stage_seconds[stage] = time.perf_counter() - start
    except Exception as error:
        flight.state, flight.outcome = None, record_failure(builder, flight.ref.episode_id, error)
    return row


class LearnedStageActor:
    """An actor of one learned stage's pool: loads that stage's model once, then runs the stage on episode after
    episode (the model stays in the process's model cache, where the stage finds it)."""

    def __init__(self, stage: str, num_gpus: float, work_dir: str, config: dict, settings: dict, torch_threads: int):
        import torch

        if num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"The {stage} actor holds {num_gpus} GPU(s) but torch sees no CUDA device here; install "
                               "a CUDA build of torch on the workers, or give the stage no GPUs.")
        # Ray starts workers with one thread; the driver's count keeps the models' floating-point sums, and so the
        # rows, identical to a local run on the same machine.
        torch.set_num_threads(torch_threads)
        self.step = functools.partial(advance, stages=(stage,), work_dir=work_dir, config=config, settings=settings)
        stage_model(stage, ExtractionSettings(**settings))

    def __call__(self, row: dict) -> dict:
        return self.step(row)


@dataclass
class RayExecutor:
    """Episode references as a Ray dataset, one row per episode, through a Ray Data pipeline on a Ray cluster.

    Decoding and the classical stages run as Ray tasks (`num_workers` at a time, `cpus_per_worker` CPUs each).
    Each learned stage of the settings (depth_anything, dino, cotracker, vlm) runs in an actor pool of its own
    whose actors load the stage's model once: `stage_concurrency[stage]` actors (default `num_actors`) holding
    `stage_gpus[stage]` GPUs each (default `gpus_per_actor`). `address` joins a running cluster ("auto",
    "ray://head:10001", ...); without one a local Ray instance starts (and stops at the end).
    """

    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    stage_concurrency: dict[str, int] = field(default_factory=dict)
    stage_gpus: dict[str, float] = field(default_factory=dict)
    num_cpus: int | None = None  # for a local instance only

    def __post_init__(self):
        for name in ("num_workers", "num_actors", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if self.gpus_per_actor < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_actor must be >= 0 and cpus_per_worker > 0.")
        for name, smallest in (("stage_concurrency", 1), ("stage_gpus", 0)):
            for stage, value in getattr(self, name).items():
                if stage not in LEARNED_BACKENDS:
                    raise ValueError(f"{name}: unknown stage {stage!r}; the learned stages are {list(LEARNED_BACKENDS)}.")
                if value < smallest:
                    raise ValueError(f"{name}[{stage!r}] must be at least {smallest}, got {value}.")

    def _check_stages(self, settings: ExtractionSettings) -> None:
        """A pool setting for a stage that runs a classical backend would be silently unused: refuse it."""
        unused = sorted((set(self.stage_concurrency) | set(self.stage_gpus)) - set(learned_stages(settings)))
        if unused:
            raise ValueError(f"Actor pool settings for {unused}, but under these settings those stages run classical "
                             f"backends (no model, so no actor pool); the learned stages are {learned_stages(settings)}.")

    def pool_size(self, stage: str) -> int:
        return self.stage_concurrency.get(stage, self.num_actors)

    def pool_gpus(self, stage: str) -> float:
        """GPUs each actor of `stage`'s pool holds."""
        return self.stage_gpus.get(stage, self.gpus_per_actor)

    def _check_resources(self, ray, stages: list[str]) -> None:
        """Actor pools hold their CPUs and GPUs for the whole run. Asking more than the cluster has, or all of its
        CPUs (leaving none to the tasks that decode the episodes for them), would make Ray Data wait forever."""
        cluster = ray.cluster_resources()
        cpus = sum(self.pool_size(stage) for stage in stages) * self.cpus_per_worker
        gpus = sum(self.pool_size(stage) * self.pool_gpus(stage) for stage in stages)
        pools = ", ".join(f"{stage}: {self.pool_size(stage)} x {self.pool_gpus(stage)} GPUs" for stage in stages)
        if cpus + self.cpus_per_worker > cluster.get("CPU", 0):
            raise ValueError(
                f"The actor pools ({pools}) hold {cpus:g} CPUs at {self.cpus_per_worker:g} each, and the tasks need "
                f"{self.cpus_per_worker:g} more, but the Ray cluster has {cluster.get('CPU', 0):g}: lower "
                "--ray-cpus-per-worker or --ray-stage-concurrency, or add nodes.")
        if gpus > cluster.get("GPU", 0):
            raise ValueError(f"The actor pools ({pools}) hold {gpus:g} GPUs but the Ray cluster has "
                             f"{cluster.get('GPU', 0):g}: lower --ray-stage-gpus or --ray-stage-concurrency.")

    def run(self, work_dir: str, config: dict, settings: dict, refs: list[EpisodeRef]) -> Iterator[EpisodeOutcome]:
        self._check_stages(ExtractionSettings(**settings))
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
        import torch

        episodes = ray.data.from_items([dataclasses.asdict(ref) for ref in refs], override_num_blocks=len(refs))
        arguments = dict(work_dir=work_dir, config=config, settings=settings)
        extraction = ExtractionSettings(**settings)
        self._check_resources(ray, learned_stages(extraction))
        with warnings.catch_warnings():  # Ray has no named parameter for retries yet, only the deprecated kwargs
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            for step in pipeline_steps(extraction):
                if step[0] in learned_stages(extraction):
                    stage = step[0]
                    episodes = episodes.map(
                        LearnedStageActor, num_cpus=self.cpus_per_worker, num_gpus=self.pool_gpus(stage),
                        fn_constructor_kwargs=dict(arguments, stage=stage, num_gpus=self.pool_gpus(stage),
                                                   torch_threads=torch.get_num_threads()),
                        compute=ray.data.ActorPoolStrategy(size=self.pool_size(stage)), max_task_retries=MAX_ATTEMPTS - 1,
                    )
                else:
                    episodes = episodes.map(
                        advance, fn_kwargs=dict(arguments, stages=step), num_cpus=self.cpus_per_worker,
                        compute=ray.data.TaskPoolStrategy(size=self.num_workers), max_retries=MAX_ATTEMPTS - 1,
                    )
        done = set()
        for row in episodes.iter_rows():
            outcome = row["episode"].outcome
            outcome.stage_seconds = row["episode"].stage_seconds
            done.add(outcome.episode_id)
            yield outcome
        lost = [ref for ref in refs if ref.episode_id not in done]
        if lost:  # errors inside an episode are caught by `advance`: these took their worker process down
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
    # only the fields this source reads: a video run's file holds no procedural num_frames or image_size
    unused = () if builder.config.source in GENERATED_SOURCES else GENERATION_FIELDS
    recorded = {key: value for key, value in resolved.items() if key not in unused and value is not None}
    _write_atomically(os.path.join(output_dir, SETTINGS_FILE), json.dumps(recorded, indent=2, sort_keys=True))
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


__all__ = ["EpisodeOutcome", "LocalExecutor", "RayExecutor", "extract_to_folder", "learned_stages", "pipeline_steps", "read_options"]
