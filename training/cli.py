"""The `mu0` command line."""

import argparse
import contextlib
import copy
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .. import __version__

EXAMPLES = """examples:
  mu0 demo                      synthetic data -> train a small μ0 -> evaluate -> save (no downloads)
  mu0 demo --quick --output-dir /tmp/mu0-demo
  mu0 evaluate --model outputs/demo/model --dataset outputs/demo/eval --output-dir outputs/eval
  mu0 view outputs/demo/episodes --episode 1
  mu0 predict --model outputs/demo/model --image outputs/demo/frames/frame_0.png --prompt "push the red block" --grid 8
  mu0 app --model outputs/demo/model    a browser demo at http://127.0.0.1:7860
  mu0 extract --source video_folder --source-path my_videos --depth depth_anything --camera estimated \
      --keypoints grid --tracker lk --field-of-view 60 --output-dir data/my-traces
  mu0 extract --config extract.yaml --executor ray --ray-address auto --push-to-hub me/my-traces
  mu0 train --recipe tiny-cpu --dataset data/samples --output-dir outputs/tiny
  mu0 train --recipe mu0-smolvlm2-2.2b --dataset me/my-traces --push-to-hub me/mu0-run1
  mu0 evaluate --model outputs/tiny --dataset data/test-samples --output-dir outputs/eval
  mu0 convert mu0_rollout/final_ckpt outputs/mu0-released --push-to-hub me/mu0-released
  mu0 adapt --base outputs/demo/model --dataset data/robot-lerobot --lora-rank 8 --output-dir outputs/adapter
"""


@dataclass(frozen=True)
class Number:
    """A numeric option's type and range, checked once before any work: as argparse `type=` it parses a flag (argparse
    then names the flag), and `check` takes a value from a settings file (any YAML/JSON type)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_excluded: bool = False
    high_excluded: bool = False
    odd: bool = False

    @property
    def wanted(self) -> str:
        noun = ("an odd integer" if self.odd else "an integer") if self.kind is int else "a finite number"
        if self.kind is int and self.low == 1 and self.high is None:
            return "a positive integer"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_excluded else '['}{self.low:g}, {self.high:.15g}"
                    f"{')' if self.high_excluded else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_excluded else '>='} {self.low:g}"
        return noun

    def check(self, value):
        """`value` itself if it is of this kind and in range, else a ValueError saying what is wanted."""
        kinds = (int, float) if self.kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"must be {self.wanted}, got {value!r}")
        below = self.low is not None and (value <= self.low if self.low_excluded else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_excluded else value > self.high)
        if below or above or (self.odd and value % 2 == 0):
            raise ValueError(f"must be {self.wanted}, got {value}")
        return self.kind(value)

    def __call__(self, text: str):
        try:
            return self.check(self.kind(text))
        except (ValueError, OverflowError) as error:
            message = str(error) if str(error).startswith("must be") else f"must be {self.wanted}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None


positive_int = Number(int, 1)
non_negative_int = Number(int, 0)
seed_int = Number(int, 0, 2**32 - 1)  # what numpy, torch and random all accept
positive_float = Number(float, 0, low_excluded=True)


def require_writable_folder(path: str, flag: str) -> None:
    """Write a probe file into `path` (or, when it does not exist yet, into its nearest existing parent) now, so a
    read-only or full output folder fails before any work (it used to fail only at the first checkpoint). Nothing is
    created: a command refused later leaves no empty folder behind."""
    import tempfile

    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"{existing!r} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"{flag} {path!r} is not a writable folder: {error.strerror or error}.") from error


def require_path_or_repo_id(value: str, flag: str) -> None:
    """A local path that does not exist is reported as such, not as a malformed Hub repo id. Hub ids are `name` or
    `namespace/name`, so anything absolute, relative to `.`/`~`, or with more than one `/` is meant as a path."""
    if os.path.exists(os.path.expanduser(value)):
        return
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value):
        raise FileNotFoundError(f"{flag} {value!r}: no such file or folder.")


NO_ROWS = ("--dataset {!r} has no rows: every episode failed or was rejected at extraction (see failures.jsonl in "
           "its work folder).")


def require_rows(dataset: str) -> None:
    """A dataset saved without rows has no data files, on which `load_from_disk` fails with a raw IndexError."""
    state = os.path.join(dataset, "state.json")
    if os.path.isfile(state):
        with open(state) as handle:
            if json.load(handle).get("_data_files") == []:
                raise ValueError(NO_ROWS.format(dataset))


# what training and evaluation read from each `samples` row
SAMPLE_COLUMNS = ("episode_id", "frame_index", "image", "depth_mm", "query_uv", "query_z", "history", "history_valid",
                  "future", "future_valid", "future_raw", "future_raw_valid", "cluster_ids", "moving", "task", "captions")


def require_samples_dataset(dataset: str) -> None:
    """A local `episodes` folder given as `--dataset` is named as such (it was reported as lacking statistics)."""
    if not os.path.isdir(dataset) or os.path.exists(os.path.join(dataset, "trace_statistics.json")):
        return
    with contextlib.suppress(OSError):
        with open(os.path.join(dataset, "dataset_info.json")) as handle:
            features = json.load(handle).get("features", {})
        if "tracks_world" in features:
            raise ValueError(f"--dataset {dataset!r} is an episodes dataset (one row per episode); give the samples "
                             "dataset beside it (e.g. the samples/ folder `mu0 extract` wrote).")


def require_sample_columns(samples, dataset: str) -> None:
    """A samples dataset missing a column fails here, naming it, not with a KeyError mid-run."""
    columns = samples.column_names
    missing = [name for name in SAMPLE_COLUMNS if columns is not None and name not in columns]
    if missing:
        raise ValueError(f"--dataset {dataset!r} lacks the samples column(s) {missing}; it has {sorted(columns)}.")


def require_readable_checkpoint(folder: str) -> None:
    """A `--resume` folder cut short by a kill (truncated weights, no trainer state: the Trainer writes that last)
    is named here, not by a raw SafetensorError after the model is built."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--resume {folder!r}: no such checkpoint folder.")
    weights = [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    # FSDP sharded weights: torch.distributed.checkpoint writes `.metadata` once every rank's shard is written
    fsdp_shards = os.path.isfile(os.path.join(folder, "pytorch_model_fsdp_0", ".metadata"))
    if not weights and not fsdp_shards:
        raise FileNotFoundError(f"--resume {folder!r} holds no weights (.safetensors, or FSDP's pytorch_model_fsdp_0/): "
                                "not a checkpoint folder.")
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):  # checks the header covers the file
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"--resume {folder!r}: {name} is truncated or corrupt ({error}); resume from an earlier checkpoint."
            ) from error
    for name in sorted(os.listdir(folder)):
        if name.endswith((".pt", ".pth", ".bin")):  # optimizer, scheduler, RNG state: torch's zip format
            try:
                with zipfile.ZipFile(os.path.join(folder, name)) as archive:
                    broken = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                broken = str(error)
            if broken is not None:
                raise ValueError(f"--resume {folder!r}: {name} is truncated or corrupt ({broken}); resume from an "
                                 "earlier checkpoint.")
    try:
        with open(os.path.join(folder, "trainer_state.json")) as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume {folder!r} has no readable trainer_state.json: the save was interrupted; "
                         "resume from an earlier checkpoint.") from error


def require_empty_output_folder(path: str, overwrite: bool) -> None:
    """A new run into a folder that holds files (another model, another run's checkpoints) would mix its files with
    them: refused, unless `--overwrite-output-dir` says to delete them first."""
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FileExistsError(f"--output-dir {path!r} is not empty ({shown}): choose a new folder, continue its run "
                              "with --resume last, or pass --overwrite-output-dir to delete its contents first.")
    for name in entries:
        entry = os.path.join(path, name)
        shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) else os.remove(entry)


def last_complete_checkpoint(output_dir: str) -> str:
    """`--resume last`: the newest `checkpoint-N` in the output folder that a kill did not cut short."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(name.split("-")[1]) for name in names if re.fullmatch(r"checkpoint-\d+", name)), reverse=True)
    for step in steps:
        folder = os.path.join(output_dir, f"checkpoint-{step}")
        try:
            require_readable_checkpoint(folder)
        except (ValueError, FileNotFoundError) as error:
            logging.getLogger(__name__).warning("Skipping an incomplete checkpoint: %s", error)
            continue
        return folder
    raise FileNotFoundError(f"--resume last: no complete checkpoint in {output_dir!r}.")


def demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .demo import QUICK, DemoSettings, format_table, run_demo
    from .instruction import format_instruction_table

    settings = QUICK if args.quick else DemoSettings()
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    settings = replace(settings, seed=args.seed)
    require_writable_folder(args.output_dir, "--output-dir")
    summary = run_demo(args.output_dir, settings)
    print(f"\nHeld-out metrics ({summary['scored_samples']} samples under the `mu0 evaluate` protocol; u, v in [-1, 1], "
          f"z in metres; min = best of {settings.num_samples}, mean = mean of them):")
    print(format_table(summary["metrics"]))
    for note in summary["notes"]:
        print(note)
    print(f"\nInstruction following (held-out frames before the block moves):\n{format_instruction_table(summary['instruction_following'])}")
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; wall time {summary['wall_time_s']:.0f} s")
    output = args.output_dir
    print(f"wrote {output} ({summary['output_bytes'] / 1e6:.0f} MB): model/ (load with from_pretrained), eval/ (held-out "
          "samples), episodes/ (held-out episodes), frames/, overlays, traces_3d.png, metrics.json\nnext:\n"
          f"  mu0 evaluate --model {output}/model --dataset {output}/eval --output-dir outputs/eval\n"
          f"  mu0 view {output}/episodes --episode 0\n"
          f"  mu0 predict --model {output}/model --image {output}/{summary['frames'][0]} --grid 8")


def train(args: argparse.Namespace) -> None:
    from collections import Counter

    from .pretrain import hold_out_episodes, load_recipe, load_samples, make_trainer

    require_path_or_repo_id(args.dataset, "--dataset")
    if args.resume == "last":
        args.resume = last_complete_checkpoint(args.output_dir)
    elif args.resume is not None:
        require_readable_checkpoint(args.resume)
    require_writable_folder(args.output_dir, "--output-dir")
    if args.resume is None:
        require_empty_output_folder(args.output_dir, args.overwrite_output_dir)
    recipe = load_recipe(args.recipe)
    require_rows(args.dataset)
    require_samples_dataset(args.dataset)
    samples, statistics = load_samples(args.dataset)
    require_sample_columns(samples, args.dataset)
    evaluation = None
    streamed = not hasattr(samples, "select")
    if not streamed and len(samples) == 0:
        raise ValueError(NO_ROWS.format(args.dataset))
    eval_samples = (0 if streamed else 32) if args.eval_samples is None else args.eval_samples
    if eval_samples:
        if streamed:
            raise ValueError("--eval-samples needs a local dataset (a streamed Hub dataset has no random access).")
        rows_per_episode = Counter(samples["episode_id"])
        held_out, rows = 0, 0
        for episode_id in sorted(rows_per_episode, reverse=True):  # the fewest last episodes with enough rows
            held_out, rows = held_out + 1, rows + rows_per_episode[episode_id]
            if rows >= eval_samples:
                break
        if held_out >= len(rows_per_episode):
            raise ValueError(f"--eval-samples {eval_samples}: evaluation rows come from episodes held out of training, "
                             f"and {eval_samples} rows would take all {len(rows_per_episode)} episodes; lower "
                             "--eval-samples or pass --eval-samples 0.")
        samples, evaluation = hold_out_episodes(samples, held_out)
        evaluation = evaluation.select(range(min(eval_samples, len(evaluation))))
    trainer = make_trainer(recipe, samples, statistics, args.output_dir, eval_dataset=evaluation, max_steps=args.max_steps)
    if args.resume is not None and resumes_a_finished_run(args.resume, trainer.args.max_steps):
        # the Trainer would run one step past the end from the final checkpoint; its weights are the result
        trainer._load_from_checkpoint(args.resume)
    else:
        trainer.train(resume_from_checkpoint=args.resume)
    save_final_model(trainer, args.output_dir)
    metrics = None
    if evaluation is not None:
        metrics = trainer.evaluate()
        print("| metric | value |\n|---|---|")
        for key in sorted(metrics):
            if key.endswith("@32") and key.split("/")[1].split("@")[0] in ("ade", "fde", "min_ade", "min_fde"):
                print(f"| {key.removeprefix('eval_')} | {metrics[key]:.4f} |")
    if trainer.skipped_nonfinite_steps:
        print(f"skipped {trainer.skipped_nonfinite_steps} steps with a non-finite loss or gradient norm")
    if args.push_to_hub:
        from .publishing import push_mu0_to_hub

        push_mu0_to_hub(trainer.model, trainer.processing_class, args.push_to_hub,
                        datasets=None if os.path.isdir(args.dataset) else [args.dataset],
                        metrics=None if metrics is None else {k.removeprefix("eval_"): v for k, v in metrics.items()},
                        recipe=args.recipe)
    print(f"model and processor saved to {args.output_dir}")


def evaluate(args: argparse.Namespace) -> None:
    """The authors' protocol on a samples dataset: a table of metrics, metrics.json and worst/best overlays."""
    from .. import Mu0Processor
    from ..dataset_builders.released_test_set import is_trace_extract_tree, released_test_samples
    from .baselines import load_trace_model
    from .evaluation import EvaluationProtocol, evaluate_models, format_metrics_table, model_label
    from .pretrain import load_samples

    protocol = EvaluationProtocol(
        frame_offsets=tuple(args.frame_offsets), num_queries=args.num_queries, num_samples=args.samples,
        seed=args.seed, use_depth=args.use_depth, use_history=args.use_history, batch_size=args.batch_size,
    )
    require_path_or_repo_id(args.dataset, "--dataset")
    require_path_or_repo_id(args.model, "--model")
    require_writable_folder(args.output_dir, "--output-dir")
    if is_trace_extract_tree(args.dataset):  # TraceExtract output, e.g. the authors' released test_set/
        samples = released_test_samples(args.dataset)
    else:
        require_samples_dataset(args.dataset)
        samples, _ = load_samples(args.dataset, split=args.split)
        require_sample_columns(samples, args.dataset)
    model = load_trace_model(args.model)
    processor = Mu0Processor.from_pretrained(args.model)
    summary = evaluate_models({model_label(model): model}, processor, samples, protocol,
                              heuristics=tuple(args.heuristics), output_dir=args.output_dir, num_overlays=args.overlays)
    inputs = f"depth {'on' if args.use_depth else 'off'}, history {'on' if args.use_history else 'off'}"
    print(f"{summary['num_samples']} samples from {summary['episodes']} episodes, {summary['num_queries']} queries "
          f"({inputs}; u, v in [-1, 1], z in metres; min = best of {args.samples}, seed {args.seed}):")
    latency = {name: f"{seconds * 1000:.1f}" for name, seconds in summary["seconds_per_sample"].items()}
    print(format_metrics_table(summary["metrics"], extra_rows={"ms per sample": latency}))
    for note in summary["notes"]:
        print(note)
    if summary["missing_offsets"]:
        print(f"{len(summary['missing_offsets'])} episodes lack some frame offsets (listed in metrics.json)")
    print(f"wrote {os.path.join(args.output_dir, 'metrics.json')} and {len(summary['overlays'])} overlays")


def adapt(args: argparse.Namespace) -> None:
    """Train an action expert on a frozen μ0 from a LeRobot v3 folder and save (or push) only the adapter."""
    import numpy as np

    from .. import Mu0ActionConfig, Mu0ActionProcessor, Mu0ForActionPrediction, Mu0Processor
    from ..processing import robot_statistics
    from .adaptation import (
        action_samples,
        add_trace_lora,
        lerobot_robot_episodes,
        push_adapter_to_hub,
        render_card,
        save_adapter,
        train_policy,
    )

    require_path_or_repo_id(args.base, "--base")
    require_writable_folder(args.output_dir, "--output-dir")
    episodes = lerobot_robot_episodes(args.dataset, args.camera_key)
    shortest = min(len(episode.actions) for episode in episodes)
    if shortest < args.chunk_size:  # checked before the base model loads
        raise ValueError(f"--chunk-size {args.chunk_size}: the shortest episode of {args.dataset!r} has {shortest} "
                         f"steps, fewer than one action chunk; pass --chunk-size {shortest} or less, or drop the short "
                         "episodes.")
    actions = np.concatenate([episode.actions for episode in episodes])
    states = np.concatenate([episode.states for episode in episodes])
    policy = Mu0ForActionPrediction.from_trace_model(
        args.base, action_dim=actions.shape[1], state_dim=states.shape[1], use_trace=not args.no_trace,
        trace_grid_size=args.grid_size, chunk_size=args.chunk_size,
        num_execute_steps=min(args.chunk_size, Mu0ActionConfig.num_execute_steps),
    )
    processor = Mu0ActionProcessor.from_trace_processor(
        Mu0Processor.from_pretrained(args.base), robot_statistics(actions, states), chunk_size=policy.config.chunk_size
    )
    model = add_trace_lora(policy, rank=args.lora_rank) if args.lora_rank else policy
    rows = action_samples(episodes, policy.config.chunk_size)
    train_policy(model, processor, rows, os.path.join(args.output_dir, "run"), steps=args.steps,
                 batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)
    model.eval()
    name = args.push_to_hub or os.path.basename(os.path.abspath(args.output_dir))
    save_adapter(model, args.output_dir, processor, render_card(model, name))
    print(f"{len(episodes)} episodes, {len(rows)} training rows; adapter saved to {args.output_dir} "
          "(load with mu0.training.adaptation.load_adapter)")
    if args.push_to_hub:
        push_adapter_to_hub(model, args.push_to_hub, processor)
        print(f"pushed to {args.push_to_hub}")


def app(args: argparse.Namespace) -> None:
    """The browser demo: a Gradio app around one checkpoint."""
    try:
        from .app import launch
    except ImportError as error:
        raise ImportError('mu0 app needs Gradio: pip install "mu0[app]"') from error
    launch(args.model, host=args.host, port=args.port, share=args.share)


def grid_points(size: int, height: int, width: int) -> list[tuple[float, float]]:
    """A size x size grid of pixel positions at cell centres."""
    xs = (np.arange(size) + 0.5) * width / size - 0.5
    ys = (np.arange(size) + 0.5) * height / size - 0.5
    return [(float(x), float(y)) for y in ys for x in xs]


def load_depth_map(path: str, height: int, width: int, name: str = "--depth") -> np.ndarray:
    """`--depth`: an (H, W) metric map aligned with the image; 0 or NaN mark missing depth, negatives are refused.
    `name` is how messages call the input (the flag here, a form field in `mu0 app`)."""
    try:
        depth = np.load(path)  # allow_pickle=False: a pickled object is refused, never run
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{name} {path!r} is not a readable .npy file ({error}).") from None
    if not isinstance(depth, np.ndarray) or depth.shape != (height, width) or not np.issubdtype(depth.dtype, np.number):
        raise ValueError(f"{name} {path!r} holds {describe_array(depth)}; it must be a numeric (H, W) = ({height}, "
                         f"{width}) map aligned with the image.")
    depth = depth.astype(np.float32)
    if (depth < 0).any():
        raise ValueError(f"{name} {path!r} has negative values (min {np.nanmin(depth):.3g}): depth is metres in front of "
                         "the camera.")
    return depth


def describe_array(value) -> str:
    return f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def load_intrinsics(path: str, name: str = "--intrinsics") -> np.ndarray:
    """`--intrinsics`: a JSON 3x3 pixel matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with positive focal lengths."""
    try:
        with open(path) as handle:
            matrix = np.asarray(json.load(handle), dtype=np.float64)
    except OSError as error:
        raise FileNotFoundError(f"{name} {path!r}: {error.strerror}.") from None
    except (ValueError, TypeError) as error:  # JSON syntax, or entries that are not numbers
        raise ValueError(f"{name} {path!r} is not a JSON 3x3 matrix of numbers ({error}).") from None
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"{name} {path!r} must hold a finite 3x3 matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], "
                         f"got shape {matrix.shape}.")
    if not (matrix[0, 0] > 0 and matrix[1, 1] > 0):
        raise ValueError(f"{name} {path!r}: the focal lengths fx = {matrix[0, 0]:g} and fy = {matrix[1, 1]:g} "
                         "must be positive (pixels).")
    return matrix


def depth_at(depth: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each query pixel's depth (nearest pixel); a query on missing depth is refused rather than given z <= 0."""
    height, width = depth.shape
    rows = np.clip(np.round(query[:, 1]).astype(int), 0, height - 1)
    columns = np.clip(np.round(query[:, 0]).astype(int), 0, width - 1)
    values = depth[rows, columns]
    missing = ~(np.isfinite(values) & (values > 0))
    if missing.any():
        first = int(np.argmax(missing))
        raise ValueError(f"--depth has no depth at query point {query[first].tolist()}: move the point or fill the map.")
    return values


def predict(args: argparse.Namespace) -> None:
    import math

    import torch
    from PIL import Image

    from .. import Mu0ForTracePrediction, Mu0Processor
    from ..processing.image_processing_mu0 import to_float_image
    from ..processing.visualization import draw_traces, plot_traces_3d

    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"No image at {args.image!r}.")
    require_path_or_repo_id(args.model, "--model")
    require_writable_folder(args.output_dir, "--output-dir")
    with Image.open(args.image) as opened:
        # 16-bit PNGs keep their range (convert("RGB") would saturate them to white)
        image = (to_float_image(opened) * 255).round().astype(np.uint8)
    height, width = image.shape[:2]
    if args.points:
        try:
            points = [tuple(float(v) for v in point.split(",")) for point in args.points]
        except ValueError:
            points = []
        if not points or any(len(point) != 2 for point in points):
            raise ValueError("--points takes x,y pairs in pixels, e.g. --points 120,80 200,150")
    else:
        points = grid_points(args.grid, height, width)
    depth = intrinsics = None
    if (args.depth is None) != (args.intrinsics is None):
        raise ValueError("--depth and --intrinsics go together (metric traces need both).")
    query = np.array(points, dtype=np.float64)
    if args.depth is not None:
        depth = load_depth_map(args.depth, height, width)
        intrinsics = torch.tensor(load_intrinsics(args.intrinsics), dtype=torch.float32)[None]
        query = np.column_stack([query, depth_at(depth, query)])
    processor = Mu0Processor.from_pretrained(args.model)
    if len(points) > processor.max_queries:
        largest_grid = math.isqrt(processor.max_queries)
        raise ValueError(f"{len(points)} query points, but this model takes at most {processor.max_queries} per image: "
                         f"use --grid {largest_grid} or less, or at most {processor.max_queries} --points.")
    model = Mu0ForTracePrediction.from_pretrained(args.model).eval()
    inputs = processor(images=image, text=args.prompt, query_points=query,
                       depth=None if depth is None or not model.config.use_depth else depth)
    prediction = model.predict_traces(**inputs, num_samples=args.samples,
                                      generator=torch.Generator().manual_seed(args.seed))
    traces = processor.post_process_traces(prediction.traces, inputs["query_points"], inputs["image_sizes"],
                                            inputs.get("query_depth"), intrinsics)
    os.makedirs(args.output_dir, exist_ok=True)
    overlay = os.path.join(args.output_dir, "overlay.png")
    draw_traces(image, traces["pixels"][0, 0].numpy(), prediction.alive_mask[0, 0].numpy(),
                anchors=np.array(points)).save(overlay)
    result = {"prompt": args.prompt, "query_points": points, "pixels": traces["pixels"][0].tolist(),
              "alive": prediction.alive_mask[0].tolist()}
    written = [overlay]
    if "xyz" in traces:
        result["xyz_m"] = traces["xyz"][0].tolist()
        written.append(plot_traces_3d({f"sample {s}": traces["xyz"][0, s].numpy() for s in range(args.samples)},
                                      os.path.join(args.output_dir, "traces_3d.png"), title=args.prompt))
    if args.rerun:
        from ..processing.visualization import to_rerun

        first = traces["pixels"][0, 0].numpy()
        if "xyz" in traces:  # pixel position plus metric depth: the recording gets 3D traces too
            first = np.concatenate([first, traces["xyz"][0, 0, ..., 2:].numpy()], axis=-1)
        written.append(to_rerun(image, first, os.path.join(args.output_dir, "scene.rrd"),
                                alive=prediction.alive_mask[0, 0].numpy(), depth=depth,
                                intrinsics=None if intrinsics is None else intrinsics[0].numpy(), anchors=query))
    path = os.path.join(args.output_dir, "traces.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(path + ".tmp", path)
    print("\n".join(["wrote", *written, path]))


def view(args: argparse.Namespace) -> None:
    """Render one extracted episode's tracks (in each frame's own camera) over its frames to an MP4."""
    from ..dataset_builders.trace_ops import project_to_camera
    from ..processing.visualization import draw_traces, visible_trails, write_video
    from .pretrain import load_episodes

    require_path_or_repo_id(args.dataset, "dataset")
    require_writable_folder(args.output_dir, "--output-dir")
    episodes = load_episodes(args.dataset)
    if "tracks_world" not in episodes.column_names:
        raise ValueError(f"{args.dataset} is not an `episodes` dataset (it has no tracks_world column; a `samples` "
                         "dataset holds one frame per row): give a folder saved from TraceExtract(config_name="
                         "'episodes'), such as the demo's outputs/demo/episodes.")
    if not 0 <= args.episode < len(episodes):
        raise ValueError(f"--episode {args.episode} is out of range: the dataset has {len(episodes)} episodes.")
    row = episodes[args.episode]
    world = np.asarray(row["tracks_world"], dtype=np.float64)
    visible = np.asarray(row["visible"], dtype=bool)
    extrinsics, intrinsics = np.asarray(row["extrinsics"]), np.asarray(row["intrinsics"])
    frames, drawn = [], []
    for t, image in enumerate(row["frames"]):
        start = max(0, t - args.trail)
        pixels, in_front = project_to_camera(world[start : t + 1], visible[start : t + 1], extrinsics[t], intrinsics)
        trails, shown = visible_trails(pixels[..., :2], in_front)
        drawn.append(int(shown.sum()))
        frames.append(draw_traces(np.asarray(image), trails, scale=args.scale, legend=False))
    path = os.path.join(args.output_dir, f"episode_{args.episode}.mp4")
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"wrote {write_video(frames, path, fps=row['fps'] or 10.0)} ({len(frames)} frames, {world.shape[1]} tracks, "
          f"{min(drawn)}–{max(drawn)} visible and drawn per frame)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line, unless the help text already states it; options defaulting to
    None, False or "" say in words what they do."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and not any(action.default is value for value in (None, False, argparse.SUPPRESS)) \
            and action.default != "" and "default" not in (action.help or "")

    def _get_help_string(self, action: argparse.Action) -> str:
        return super()._get_help_string(action) if self._shows_default(action) else action.help or ""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def episode_indices(text: str) -> list[int]:
    """argparse type for `--episodes 0,3,10-19`: indices and inclusive ranges."""
    indices = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last == "" or last.isdigit()) or (last and int(last) < int(first)):
            raise argparse.ArgumentTypeError(f"must be episode indices or ranges like 0,3,10-19, got {part!r}")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices


# the flags of `mu0 extract`: TraceExtractConfig fields, then ExtractionSettings fields, each with its type and range
# (upper bounds are sanity limits far above real use); a test keeps both complete, and the backend choices and
# defaults equal ExtractionSettings'.
EXTRACT_SOURCE_OPTIONS = {"source": str, "source_path": str, "num_episodes": Number(int, 1, 1_000_000),
                          "seed": seed_int, "num_frames": Number(int, 2, 10_000), "image_size": Number(int, 16, 2048),
                          "moving_camera": bool, "target_fps": positive_float, "camera_key": str, "episodes": episode_indices,
                          "shard_index": non_negative_int, "num_shards": Number(int, 1, 1_000_000)}
EXTRACT_SETTING_OPTIONS = {"depth": str, "camera": str, "keypoints": str, "tracker": str, "captions": str,
                           "num_keypoints": Number(int, 1, 65_536), "lk_window": Number(int, 3, 255, odd=True),
                           "appearance_choice": bool, "depth_model": str,
                           "field_of_view": Number(float, 0, 180, low_excluded=True, high_excluded=True),
                           "dino_model": str, "cotracker_model": str, "cotracker_repo": str,
                           "cotracker_checkpoint": str, "caption_model": str, "min_coverage": Number(float, 0, 1),
                           "history": Number(int, 0, 1000), "horizon": Number(int, 1, 1000), "retarget_steps": Number(int, 1, 1000),
                           "retarget_step": positive_float, "frame_stride": Number(int, 1, 100_000), "static_queries": bool,
                           "seed": seed_int}
EXTRACT_BACKENDS = {"depth": ("given", "depth_anything"), "camera": ("given", "static", "estimated"),
                    "keypoints": ("given", "grid", "motion", "dino"),
                    "tracker": ("given", "support_lk", "lk", "cotracker"), "captions": ("given", "template", "vlm")}
# ExtractionSettings' defaults, shown in `mu0 extract --help` (a test keeps them equal)
EXTRACT_SETTING_DEFAULTS = {"depth": "given", "camera": "given", "keypoints": "given", "tracker": "given",
                            "captions": "template", "num_keypoints": 256, "lk_window": "the tracker's, by image size",
                            "appearance_choice": False,
                            "depth_model": "depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf",
                            "field_of_view": "the source's intrinsics", "dino_model": "facebook/dinov2-base",
                            "cotracker_model": "cotracker3_offline", "cotracker_repo": None,
                            "cotracker_checkpoint": None, "caption_model": None, "min_coverage": 0.6, "history": 8,
                            "horizon": 32, "retarget_steps": 128, "retarget_step": 0.05, "frame_stride": 1,
                            "static_queries": False, "seed": 0}
EXTRACT_SOURCE_HELP = {
    "source_path": "the folder the source reads (video_folder: also a single video file; lerobot: or a Hub dataset repo id)",
    "num_episodes": "generated sources: how many episodes (default: 8)",
    "seed": "generated sources: the first episode's seed (default: 0)",
    "num_frames": "generated sources: frames per episode (default: 48)",
    "image_size": "generated sources: frame side in pixels (default: 128)",
    "moving_camera": "generated sources: a camera that moves", "target_fps": "video_folder/egodex: subsample the video",
    "camera_key": "lerobot: which camera (default: the first video feature)",
    "episodes": "lerobot: only these episode indices, e.g. 0,3,10-19 (from a Hub dataset, only their files are downloaded)",
    "shard_index": "this machine's shard of --num-shards (default: 0)", "num_shards": "machines sharing the episodes",
}
EXTRACT_SETTING_HELP = {
    "depth": "depth backend", "camera": "camera backend", "keypoints": "keypoint backend", "tracker": "tracker backend",
    "captions": "caption backend", "num_keypoints": "query points per episode",
    "lk_window": "LK window side in pixels (odd)",
    "appearance_choice": "support_lk: keep an own LK step that fails its check where its patch matches better",
    "depth_model": "depth_anything checkpoint",
    "field_of_view": "horizontal field of view in degrees", "dino_model": "dino keypoint checkpoint",
    "cotracker_model": "hubconf entry of the cotracker repo", "cotracker_repo": "local clone of facebookresearch/co-tracker",
    "cotracker_checkpoint": "the tracker's local .pth file", "caption_model": "captions=vlm checkpoint",
    "min_coverage": "reject an episode whose visible-track coverage is lower", "history": "history steps per sample",
    "horizon": "raw future frames per sample", "retarget_steps": "retargeted future steps per sample",
    "retarget_step": "one retargeted step as a fraction of the robust path length",
    "frame_stride": "a sample every N frames", "static_queries": "also keep queries that do not move",
    "seed": "random keypoint choice",
}


SOURCES = ("procedural", "mujoco", "video_folder", "rgbd", "scenetracker", "egodex", "lerobot")


def setting_dest(name: str) -> str:
    """The flag of an ExtractionSettings field: `--seed` is the source's, so the extraction seed is `--extraction-seed`."""
    return "extraction_seed" if name == "seed" else name


def add_typed_option(parser: argparse.ArgumentParser, dest: str, kind, help_text: str | None) -> None:
    """A flag defaulting to None (a settings file or the builder's default applies), typed and range-checked."""
    typed = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
    parser.add_argument(f"--{dest.replace('_', '-')}", default=None, help=help_text, **typed)


def check_extract_options(config: dict, settings: dict, where: str) -> None:
    """Values from a settings file get the flags' type and range checks, naming the key, before any episode. None is
    accepted only where it is the field's default (it means "not set")."""
    from dataclasses import fields

    from ..dataset_builders.extraction import ExtractionSettings
    from ..dataset_builders.trace_extract import TraceExtractConfig

    for options, rules, kind, prefix in ((config, EXTRACT_SOURCE_OPTIONS, TraceExtractConfig, ""),
                                         (settings, EXTRACT_SETTING_OPTIONS, ExtractionSettings, "settings.")):
        optional = {field.name for field in fields(kind) if field.default is None}
        for name, value in options.items():
            rule = rules.get(name)
            if rule is None or (value is None and name in optional):
                continue  # unknown keys are named by the builder's own check
            if isinstance(rule, Number):
                try:
                    rule.check(value)
                except ValueError as error:
                    raise ValueError(f"{prefix}{name} in {where} {error}.") from None
            elif rule is episode_indices:
                if not (isinstance(value, list) and all(type(index) is int and index >= 0 for index in value)):
                    raise ValueError(f"{prefix}{name} in {where} must be a list of episode indices, got {value!r}.")
            elif not isinstance(value, rule):
                raise ValueError(f"{prefix}{name} in {where} must be a {rule.__name__}, got {value!r}.")


def stage_values(pairs: list[str] | None, kind: type, flag: str) -> dict | None:
    """`STAGE=VALUE` flags (repeatable) as a mapping, e.g. `--ray-stage-gpus depth=1 --ray-stage-gpus captions=0.5`."""
    if pairs is None:
        return None
    values = {}
    for pair in pairs:
        stage, _, value = pair.partition("=")
        try:
            values[stage] = kind(value)
        except ValueError:
            raise ValueError(f"{flag} {pair!r}: expected STAGE={kind.__name__.upper()}, e.g. depth=1.") from None
    return values


def extract(args: argparse.Namespace) -> None:
    """TraceExtract from the command line: a settings file and/or flags (flags win) -> datasets in a folder."""
    from ..dataset_builders.executors import LocalExecutor, RayExecutor, extract_to_folder, read_options
    from ..dataset_builders.extraction import ExtractionSettings
    from ..dataset_builders.trace_extract import TraceExtractConfig, output_folder_lock, settings_the_source_lacks

    config, settings = read_options(args.config) if args.config else ({}, {})
    check_extract_options(config, settings, f"--config {args.config!r}")
    config.update({name: getattr(args, name) for name in EXTRACT_SOURCE_OPTIONS if getattr(args, name) is not None})
    settings.update({name: getattr(args, setting_dest(name)) for name in EXTRACT_SETTING_OPTIONS
                     if getattr(args, setting_dest(name)) is not None})
    source = config.get("source", TraceExtractConfig.source)
    problems = settings_the_source_lacks(source, ExtractionSettings(**settings)) if source in SOURCES else []
    if problems:
        raise ValueError(f"these settings cannot work on any {source} episode: {'; '.join(problems)} (flags or the "
                         "'settings' of --config).")
    require_writable_folder(args.output_dir, "--output-dir")
    if args.work_dir is not None:
        require_writable_folder(args.work_dir, "--work-dir")
    ray_options = {name: getattr(args, f"ray_{name}") for name in ("address", "num_workers", "cpus_per_worker",
                                                                   "num_actors", "gpus_per_actor")}
    ray_options.update(stage_concurrency=stage_values(args.ray_stage_concurrency, int, "--ray-stage-concurrency"),
                       stage_gpus=stage_values(args.ray_stage_gpus, float, "--ray-stage-gpus"))
    ray_options = {name: value for name, value in ray_options.items() if value is not None}
    if args.executor == "ray":
        executor = RayExecutor(**ray_options)
    elif ray_options:
        raise ValueError(f"--ray-* options ({', '.join(sorted(ray_options))}) need --executor ray.")
    else:
        executor = LocalExecutor()
    with output_folder_lock(args.output_dir):
        summary = extract_to_folder(config, settings, args.output_dir, executor=executor, work_dir=args.work_dir,
                                    push_to_hub=args.push_to_hub, progress=not args.no_progress)
    print(f"{summary['episodes']} episodes ({summary['frames']} frames), {summary['samples']} samples, "
          f"{summary['failures']} failures; wrote {args.output_dir}/episodes, {args.output_dir}/samples, "
          f"trace_statistics.json and failures.jsonl")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")


def add_extract_parser(commands) -> None:
    """Every TraceExtract option as a flag; defaults stay None so a settings file (or the builder's default) applies."""
    parser = commands.add_parser("extract", help="run TraceExtract on videos: episodes and samples datasets in a folder")
    parser.add_argument("--config", default=None, help="YAML/JSON of TraceExtract keywords (stage backends under 'settings')")
    parser.add_argument("--output-dir", default="outputs/extract")
    parser.add_argument("--work-dir", default=None, help="per-episode cache (default: OUTPUT_DIR/work); rerun to resume")
    parser.add_argument("--source", choices=SOURCES, help="where the episodes come from (default: procedural)")
    for name, kind in EXTRACT_SOURCE_OPTIONS.items():
        if name != "source":
            add_typed_option(parser, name, kind, EXTRACT_SOURCE_HELP[name])
    for name, kind in EXTRACT_SETTING_OPTIONS.items():
        help_text = f"{EXTRACT_SETTING_HELP[name]} (default: {EXTRACT_SETTING_DEFAULTS[name]})"
        if name in EXTRACT_BACKENDS:
            parser.add_argument(f"--{name}", choices=EXTRACT_BACKENDS[name], help=help_text)
        else:
            add_typed_option(parser, setting_dest(name), kind, help_text)
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    parser.add_argument("--ray-num-workers", type=positive_int, help="episodes extracted at once by Ray tasks (default: all CPUs)")
    parser.add_argument("--ray-cpus-per-worker", type=positive_float, help="CPUs each task or actor holds (default 1)")
    parser.add_argument("--ray-num-actors", type=positive_int, help="actors in each learned stage's pool (default 1)")
    parser.add_argument("--ray-gpus-per-actor", type=Number(float, 0), help="GPUs each learned-stage actor holds (default 0)")
    parser.add_argument("--ray-stage-concurrency", action="append", metavar="STAGE=N",
                        help="actors in one learned stage's pool (depth, keypoints, tracker, captions); repeatable")
    parser.add_argument("--ray-stage-gpus", action="append", metavar="STAGE=GPUS",
                        help="GPUs each actor of one learned stage holds, e.g. depth=0.5; repeatable")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push both configurations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    parser.set_defaults(handler=extract)


def resumes_a_finished_run(checkpoint: str, max_steps: int) -> bool:
    """Whether `checkpoint` already holds the run's last step (`max_steps`, or the step count its run planned when
    training by epochs): a kill during the final save, resumed with `--resume last`."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        state = json.load(handle)
    return state["global_step"] >= (max_steps if max_steps > 0 else state["max_steps"])


def save_final_model(trainer, output_dir: str) -> None:
    """Write the trained model and processor to a staging folder, then move each finished file into `output_dir`:
    a kill during the save leaves every file there whole (the previous one or the new one), never half a
    `model.safetensors`; `--resume last` then redoes the save."""
    staging = os.path.join(output_dir, ".model.incomplete")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a kill during an earlier save
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)  # every rank takes part (sharded models gather); the main one writes
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
    trainer.accelerator.wait_for_everyone()


def convert(args: argparse.Namespace) -> None:
    from ..convert import ConversionReport, convert_released_checkpoint
    from .publishing import push_mu0_to_hub, render_model_card

    if os.path.exists(args.output_dir):
        raise FileExistsError(f"{args.output_dir} already exists; choose another output folder.")
    report = ConversionReport()
    model, processor = convert_released_checkpoint(args.source, normalizer_stats=args.normalizer_stats, report=report)
    print(report.summary())
    recipe = f"the authors' released μ0, converted from `{os.path.abspath(args.source)}` with `mu0 convert`"
    staging = args.output_dir.rstrip("/") + ".tmp"  # renamed into place once complete
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    with open(os.path.join(staging, "README.md"), "w") as handle:
        handle.write(render_model_card(model, processor, args.push_to_hub or os.path.basename(args.output_dir), recipe=recipe))
    os.replace(staging, args.output_dir)
    print(f"wrote {args.output_dir}")
    if args.push_to_hub:
        push_mu0_to_hub(model, processor, args.push_to_hub, recipe=recipe)
        print(f"pushed to {args.push_to_hub}")


def build_parser() -> argparse.ArgumentParser:
    from .demo import QUICK, DemoSettings

    parser = argparse.ArgumentParser(
        prog="mu0", description="μ0: predict future 3D traces of query points.", epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mu0 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
    demo_parser = commands.add_parser("demo", help="end-to-end job on synthetic data, no downloads")
    demo_parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    demo_parser.add_argument("--quick", action="store_true",
                             help=f"a smaller version ({QUICK.train_episodes + QUICK.eval_episodes} episodes, "
                                  f"{QUICK.steps} steps; under a minute, used by the tests)")
    demo_parser.add_argument("--steps", type=positive_int, default=None,
                             help=f"training steps (default: {DemoSettings.steps}, about 6 minutes on 2 quiet CPU cores; "
                                  f"with --quick: {QUICK.steps})")
    demo_parser.add_argument("--seed", type=seed_int, default=0, help="data, model and sampling seed")
    demo_parser.set_defaults(handler=demo)
    train_parser = commands.add_parser("train", help="pretrain μ0 on a TraceExtract samples dataset")
    recipes = sorted(entry.name.removesuffix(".json") for entry in resources.files(__package__).joinpath("recipes").iterdir()
                     if entry.name.endswith(".json"))  # pretrain.available_recipes() would import torch
    train_parser.add_argument("--recipe", default="tiny-cpu",
                              help=f"a named recipe ({', '.join(recipes)}) or a recipe JSON path (default: tiny-cpu)")
    train_parser.add_argument("--dataset", required=True, help="a folder from save_samples() or a Hub dataset repo")
    train_parser.add_argument("--output-dir", default="outputs/train")
    train_parser.add_argument("--max-steps", type=positive_int, default=None, help="override the recipe's max_steps")
    train_parser.add_argument("--eval-samples", type=non_negative_int, default=None,
                              help="rows evaluated after training (default: 32 for a local dataset, 0 when streamed)")
    train_parser.add_argument("--resume", default=None,
                              help="a checkpoint folder to resume from, or `last`: the newest complete one in --output-dir")
    train_parser.add_argument("--overwrite-output-dir", action="store_true",
                              help="delete what --output-dir holds before training (default: refuse a non-empty folder)")
    train_parser.add_argument("--push-to-hub", default=None, metavar="REPO")
    train_parser.set_defaults(handler=train)
    evaluate_parser = commands.add_parser("evaluate", help="the authors' evaluation protocol on a samples dataset")
    evaluate_parser.add_argument("--model", required=True, help="a saved μ0 or baseline folder (with its processor)")
    evaluate_parser.add_argument("--dataset", required=True,
                                 help="a folder from save_samples(), a Hub dataset repo, or a TraceExtract output tree "
                                      "(<group>/<episode>/samples/, e.g. the released test_set)")
    evaluate_parser.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    evaluate_parser.add_argument("--output-dir", default="outputs/evaluate")
    evaluate_parser.add_argument("--use-depth", action="store_true", help="feed the depth image (default: RGB only)")
    evaluate_parser.add_argument("--use-history", action="store_true", help="feed past steps (default: none)")
    evaluate_parser.add_argument("--frame-offsets", type=non_negative_int, nargs="+", default=[4, 8, 12],
                                 help="sample positions in each episode (default: 4 8 12)")
    evaluate_parser.add_argument("--num-queries", type=positive_int, default=16)
    evaluate_parser.add_argument("--samples", type=positive_int, default=5, help="samples per query for best-of-N")
    evaluate_parser.add_argument("--seed", type=seed_int, default=0)
    evaluate_parser.add_argument("--batch-size", type=positive_int, default=8)
    evaluate_parser.add_argument("--heuristics", nargs="*", default=["zero_motion", "constant_velocity"],
                                 choices=["zero_motion", "constant_velocity"], help="heuristic baselines scored alongside")
    evaluate_parser.add_argument("--overlays", type=non_negative_int, default=3, help="worst and best samples drawn (each)")
    evaluate_parser.set_defaults(handler=evaluate)
    convert_parser = commands.add_parser("convert", help="convert the authors' released checkpoint to a μ0 folder")
    convert_parser.add_argument("source", help="the released step folder (final_ckpt/: model.safetensors, config.json)")
    convert_parser.add_argument("output_dir", help="the folder to write (from_pretrained / trust_remote_code loadable)")
    convert_parser.add_argument("--normalizer-stats", default=None,
                                help="normalizer_stats.json (default: in or beside the source folder)")
    convert_parser.add_argument("--push-to-hub", default=None, metavar="REPO")
    convert_parser.set_defaults(handler=convert)
    adapt_parser = commands.add_parser("adapt", help="train an action expert on a frozen μ0 from robot demonstrations")
    adapt_parser.add_argument("--base", required=True, help="the μ0 to build on: a saved folder or Hub repo")
    adapt_parser.add_argument("--dataset", required=True, help="a LeRobotDataset (v3.0 or v2.1): local folder or Hub repo id")
    adapt_parser.add_argument("--camera-key", default=None, help="which camera (default: the first video feature)")
    adapt_parser.add_argument("--lora-rank", type=non_negative_int, default=0, help="LoRA rank on μ0's trace expert (0: μ0 frozen)")
    adapt_parser.add_argument("--no-trace", action="store_true", help="the ablation without μ0 motion tokens")
    adapt_parser.add_argument("--grid-size", type=positive_int, default=20, help="μ0 query grid side (motion tokens: side²/4)")
    adapt_parser.add_argument("--chunk-size", type=positive_int, default=16,
                              help="actions predicted per call (at most the shortest episode's steps)")
    adapt_parser.add_argument("--steps", type=positive_int, default=2000)
    adapt_parser.add_argument("--batch-size", type=positive_int, default=16)
    adapt_parser.add_argument("--learning-rate", type=positive_float, default=3e-4)
    adapt_parser.add_argument("--seed", type=seed_int, default=0)
    adapt_parser.add_argument("--output-dir", default="outputs/adapter")
    adapt_parser.add_argument("--push-to-hub", default=None, metavar="REPO")
    adapt_parser.set_defaults(handler=adapt)
    predict_parser = commands.add_parser("predict", help="predict traces for one image and write an overlay and JSON")
    predict_parser.add_argument("--model", required=True, help="a saved model folder or Hub repo")
    predict_parser.add_argument("--image", required=True)
    predict_parser.add_argument("--prompt", default="", help="the instruction (default: predict future trajectory)")
    predict_parser.add_argument("--points", nargs="+", default=None, metavar="X,Y", help="query pixels")
    # "-10,20" is a point, not an option: let argparse read such values as it reads negative numbers
    predict_parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-?[\d.]+,-?[\d.]+$")
    predict_parser.add_argument("--grid", type=positive_int, default=8,
                                help="an N x N query grid when --points is not given (N² at most the model's max_queries)")
    predict_parser.add_argument("--depth", default=None, help="metric depth map (.npy, H x W) for metric traces")
    predict_parser.add_argument("--intrinsics", default=None, help="3x3 pixel intrinsics as JSON")
    predict_parser.add_argument("--samples", type=positive_int, default=1)
    predict_parser.add_argument("--seed", type=seed_int, default=0)
    predict_parser.add_argument("--rerun", action="store_true", help="also write scene.rrd for the rerun viewer")
    predict_parser.add_argument("--output-dir", default="outputs/predict")
    predict_parser.set_defaults(handler=predict)
    view_parser = commands.add_parser("view", help="render an extracted episode's tracks over its frames to MP4")
    view_parser.add_argument("dataset", help="an episodes folder from save_to_disk or a Hub dataset repo")
    view_parser.add_argument("--episode", type=non_negative_int, default=0)
    view_parser.add_argument("--trail", type=non_negative_int, default=8,
                             help="frames of track history drawn behind each point (marked where it is now, blue to red into the past)")
    view_parser.add_argument("--scale", type=positive_int, default=None,
                             help="frame upscale (default: enough for 480 px on the longer side, 1 for larger frames)")
    view_parser.add_argument("--output-dir", default="outputs/view")
    view_parser.set_defaults(handler=view)
    app_parser = commands.add_parser("app", help="a browser demo (Gradio): click points, see the predicted traces")
    app_parser.add_argument("--model", required=True, help="a saved model folder or Hub repo")
    app_parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    app_parser.add_argument("--port", type=Number(int, 1, 65535), default=7860)
    app_parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    app_parser.set_defaults(handler=app)
    add_extract_parser(commands)
    return parser


def is_failed_write(error: BaseException) -> bool:
    """A write that the file system refused, however the writer words it: torch's zip writer says "[enforce fail at
    inline_container.cc] unexpected pos" or "basic_ios::clear: iostream error", safetensors raises a SafetensorError
    naming only the OS error."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    message = str(error)
    return (any(text in message for text in ("inline_container", "PytorchStreamWriter", "iostream error"))
            or (type(error).__name__ == "SafetensorError" and "serializ" in message))


def newest_folder(folder: str) -> str:
    """The folder of the file written last under `folder`: where a failed write was busy (the file itself may be
    gone, as safetensors removes what it could not finish)."""
    newest, path = -1.0, folder
    for root, _, names in os.walk(folder):
        for name in names:
            candidate = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.path.getmtime(candidate) > newest:
                    newest, path = os.path.getmtime(candidate), root
    return path


@contextlib.contextmanager
def named_write_failures(output_dir: str | None):
    """A failed write into `output_dir` becomes one OSError naming the file and the cause ("No space left on device
    while writing PATH"), and the command's `*.tmp` staging entries there are removed, not left for the re-run."""
    try:
        yield
    except Exception as error:
        if output_dir is None or not os.path.isdir(output_dir) or not is_failed_write(error):
            raise
        path = getattr(error, "filename", None) or newest_folder(output_dir)
        usage = shutil.disk_usage(output_dir)
        for name in os.listdir(output_dir):
            if name.endswith(".tmp"):
                entry = os.path.join(output_dir, name)
                shutil.rmtree(entry, ignore_errors=True) if os.path.isdir(entry) else os.remove(entry)
        if getattr(error, "errno", None) == errno.ENOSPC or "os error 28" in str(error) or usage.free < 16 * 2**20:
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path} ({usage.free / 2**20:.1f} MiB "
                                        "free); free some space and run the command again") from error
        raise OSError(f"Writing {path} failed: {error}") from error


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING)
    try:
        with named_write_failures(getattr(args, "output_dir", None)):
            args.handler(args)
    except (ValueError, FileNotFoundError, OSError, ImportError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"mu0 {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
