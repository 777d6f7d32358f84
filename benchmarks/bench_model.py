"""μ0 model cost on CPU: train-step time, sampling latency with and without the prefix cache, peak memory.

Random-weight preset models ("tiny", "small"; SmolVLM backbone, max_queries raised to 256) on synthetic processed
batches (random image, depth map, history and future per query point), so nothing is downloaded. For every size:

- train step (forward + backward + AdamW step) at batch 2 for each number of query points N;
- `predict_traces` (batch 1, one sample) for each N and number of Euler steps, with the backbone prefix computed
  once (`use_prefix_cache=True`) and recomputed at every step (`False`), and the cached speed-up;
- `predict_traces` in the RGB-only headline mode (batch 1, default steps) with the depth panel passed and masked
  (`depth_mask` False) and with the depth keys left out, which give the same traces and now cost the same;
- peak resident memory of one extra, untimed call of each configuration (torch's CPU allocator is invisible to
  `tracemalloc`, and `ru_maxrss` never goes down, so RSS is sampled every 5 ms by a thread instead);
- parameter counts.

Times are medians over `--repeats` after one warm-up call. Prints markdown tables and writes JSON.

`--size full` instead smoke-tests the default (released-size) config with random weights, nothing downloaded: the
backbone and DINOv2 in bf16 and the expert in fp32 as released, one 960x540 frame, one training step (batch 1, 16
queries, AdamW) and `predict_traces` (4 steps, 5 samples), with wall time, peak memory and the trainable / frozen
parameter counts next to the released checkpoint's.

    python benchmarks/bench_model.py [--sizes tiny small] [--queries 1 16 64 256] [--steps 1 4 10] [--repeats 3]
                                     [--output benchmarks/results/bench_model.json] [--quick]
    python benchmarks/bench_model.py --size full [--output benchmarks/results/bench_model_full.json]
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch

from mu0 import Mu0Config, Mu0ForTracePrediction, Mu0ImageProcessor, Mu0Processor, build_character_tokenizer
from mu0.presets import preset_config

MAX_QUERIES = 256
TRAIN_BATCH_SIZE = 2
IMAGE_HEIGHT, IMAGE_WIDTH = 96, 128
FULL_FRAME = (540, 960)
# The released checkpoint (../shared/RELEASED.md): trainable parameters include the 3.1 M unused action-time MLP,
# frozen ones the 101 M unused LM head; neither exists here.
RELEASED_TRAINABLE, RELEASED_FROZEN = 522_343_870, 2_064_913_520
RELEASED_UNUSED_TRAINABLE, RELEASED_UNUSED_FROZEN = 3_147_776, 100_925_440
MIB = 2**20

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: freed heap pages are left to the allocator
    _LIBC = None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the next measurement starts from a low, comparable baseline RSS.

    glibc keeps freed small and medium blocks mapped; without this a later call reuses them and its RSS delta reads
    close to zero.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class PeakRSS:
    """Peak resident set size while the block runs, sampled every `interval` seconds by a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        release_freed_memory()
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    def report(self) -> dict[str, float]:
        return {"peak_rss_mib": self.peak / MIB, "peak_rss_delta_mib": (self.peak - self.baseline) / MIB}


def measure(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Median wall time of each call after one warm-up call each, then the peak RSS of one more, untimed call each.

    Repeats of the variants are interleaved, so a burst of load from other processes hits all of them alike instead
    of skewing their ratio.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, call in calls.items():
        with PeakRSS() as memory:
            call()
        results[name] = {
            "median_s": statistics.median(times[name]), "min_s": min(times[name]), "times_s": times[name], **memory.report()
        }
    return results


def make_processor(config: Mu0Config) -> Mu0Processor:
    image_processor = Mu0ImageProcessor(image_size=config.image_size, dino_image_size=config.dino_image_size)
    return Mu0Processor(
        image_processor,
        build_character_tokenizer(),
        delta_scale=[0.1, 0.1, 0.05],
        depth_log_range=[-1.0, 1.5],
        history_length=config.history_length,
        horizon=config.horizon,
        max_prompt_length=config.max_prompt_length,
        max_queries=config.max_queries,
    )


def synthetic_batch(
    processor: Mu0Processor, batch_size: int, num_queries: int, with_future: bool, seed: int = 0,
    frame: tuple[int, int] = (IMAGE_HEIGHT, IMAGE_WIDTH),
) -> dict:
    """A processed batch with every input the model takes (image, depth, history; future for training).

    Points move on straight lines so the spline fit in the loss sees ordinary, well-conditioned targets.
    """
    rng = np.random.default_rng(seed)
    height, width = frame
    horizon, history_length = processor.horizon, processor.history_length
    kwargs: dict[str, list] = {key: [] for key in ("images", "query_points", "history", "history_mask", "depth", "cluster_ids")}
    futures, future_masks = [], []
    for _ in range(batch_size):
        anchor = np.column_stack([
            rng.uniform(5, width - 5, num_queries),
            rng.uniform(5, height - 5, num_queries),
            rng.uniform(0.8, 2.0, num_queries),
        ])
        velocity = rng.normal(0, [0.3, 0.3, 0.01], (num_queries, 3))
        kwargs["images"].append(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        kwargs["query_points"].append(anchor)
        kwargs["history"].append(anchor[:, None] - np.arange(1, history_length + 1)[None, :, None] * velocity[:, None])
        kwargs["history_mask"].append(np.ones((num_queries, history_length), dtype=bool))
        kwargs["depth"].append(rng.uniform(0.5, 3.0, (height, width)))
        kwargs["cluster_ids"].append(np.arange(num_queries) % 2)
        futures.append(anchor[:, None] + np.arange(1, horizon + 1)[None, :, None] * velocity[:, None])
        future_masks.append(np.ones((num_queries, horizon), dtype=bool))
    if with_future:
        kwargs.update(future=futures, future_mask=future_masks)
    return dict(processor(text=["push the block"] * batch_size, **kwargs))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def bench_train(model: Mu0ForTracePrediction, processor: Mu0Processor, num_queries: int, repeats: int) -> dict:
    """One optimiser step as the trainer runs it; the warm-up step also allocates AdamW's moment buffers."""
    batch = synthetic_batch(processor, TRAIN_BATCH_SIZE, num_queries, with_future=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    torch.manual_seed(0)
    result = measure({"train": step}, repeats)["train"]
    model.eval()
    return result


def bench_predict(
    model: Mu0ForTracePrediction, processor: Mu0Processor, num_queries: int, num_steps: int, repeats: int
) -> dict:
    """Cached vs per-step prefix on identical inputs and noise, so only the prefix work differs."""
    batch = synthetic_batch(processor, 1, num_queries, with_future=False)

    def sampler(use_cache: bool) -> Callable[[], object]:
        return lambda: model.predict_traces(
            **batch, num_steps=num_steps, num_samples=1, generator=torch.Generator().manual_seed(0),
            use_prefix_cache=use_cache,
        )

    result = measure({"cached": sampler(True), "uncached": sampler(False)}, repeats)
    result["speedup"] = result["uncached"]["median_s"] / result["cached"]["median_s"]
    return result


def bench_masked_depth(model: Mu0ForTracePrediction, processor: Mu0Processor, num_queries: int, repeats: int) -> dict:
    """The RGB-only headline mode two ways: the depth panel passed with `depth_mask` False, and left out.

    They give the same traces (tests/test_modeling.py); the first once also ran the depth tower on the masked panel.
    """
    batch = synthetic_batch(processor, 1, num_queries, with_future=False)
    masked = dict(batch, depth_mask=torch.zeros(1, dtype=torch.bool))
    omitted = {key: value for key, value in batch.items() if key not in ("depth_pixel_values", "depth_mask")}

    def sampler(inputs: dict) -> Callable[[], object]:
        return lambda: model.predict_traces(**inputs, num_samples=1, generator=torch.Generator().manual_seed(0))

    result = measure({"depth_masked": sampler(masked), "depth_omitted": sampler(omitted)}, repeats)
    result["masked_over_omitted"] = result["depth_masked"]["median_s"] / result["depth_omitted"]["median_s"]
    return result


def bench_size(size: str, queries: list[int], steps: list[int], repeats: int) -> dict:
    config = preset_config(size, max_queries=MAX_QUERIES)
    torch.manual_seed(0)
    model = Mu0ForTracePrediction(config).eval()
    processor = make_processor(config)
    report = {"size": size, "parameters": parameter_counts(model), "train": [], "predict": [], "masked_depth": []}
    for num_queries in queries:
        row = bench_train(model, processor, num_queries, repeats)
        report["train"].append({"queries": num_queries, "batch_size": TRAIN_BATCH_SIZE, **row})
        print(f"  {size} train N={num_queries}: {row['median_s'] * 1e3:.1f} ms", flush=True)
        for num_steps in steps:
            row = bench_predict(model, processor, num_queries, num_steps, repeats)
            report["predict"].append({"queries": num_queries, "steps": num_steps, "batch_size": 1, **row})
            print(f"  {size} predict N={num_queries} steps={num_steps}: cached {row['cached']['median_s'] * 1e3:.1f} ms, "
                  f"uncached {row['uncached']['median_s'] * 1e3:.1f} ms", flush=True)
        row = bench_masked_depth(model, processor, num_queries, repeats)
        report["masked_depth"].append({"queries": num_queries, "steps": config.num_inference_steps, **row})
        print(f"  {size} RGB-only N={num_queries}: depth masked {row['depth_masked']['median_s'] * 1e3:.1f} ms, "
              f"depth omitted {row['depth_omitted']['median_s'] * 1e3:.1f} ms", flush=True)
    return report


def bench_full() -> dict:
    """The default config at full size with random weights: one training step and one sampling call."""
    timings = {}
    start = time.perf_counter()
    with PeakRSS() as memory:
        config = Mu0Config()
        torch.manual_seed(0)
        model = Mu0ForTracePrediction(config).set_backbone_dtype(torch.bfloat16)
    timings["build"] = {"seconds": time.perf_counter() - start, **memory.report()}
    print(f"  full build: {timings['build']['seconds']:.0f} s", flush=True)
    processor = make_processor(config)
    counts = parameter_counts(model)
    counts["frozen"] = counts["total"] - counts["trainable"]
    train_batch = synthetic_batch(processor, 1, 16, with_future=True, frame=FULL_FRAME)
    predict_batch = synthetic_batch(processor, 1, 16, with_future=False, frame=FULL_FRAME)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**train_batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    def predict() -> torch.Tensor:
        return model.predict_traces(**predict_batch, num_steps=4, num_samples=5,
                                    generator=torch.Generator().manual_seed(0)).traces

    for name, call in (("train_step", train_step), ("predict_traces", predict)):
        if name == "predict_traces":
            model.eval()
        start = time.perf_counter()
        with PeakRSS() as memory:
            value = call()
        timings[name] = {"seconds": time.perf_counter() - start, **memory.report()}
        if name == "train_step":
            timings[name]["loss"] = value
        else:
            timings[name]["traces_finite"] = bool(torch.isfinite(value).all())
        print(f"  full {name}: {timings[name]['seconds']:.1f} s", flush=True)
    return {
        "parameters": counts,
        "released": {"trainable": RELEASED_TRAINABLE, "frozen": RELEASED_FROZEN,
                     "trainable_without_unused": RELEASED_TRAINABLE - RELEASED_UNUSED_TRAINABLE,
                     "frozen_without_unused": RELEASED_FROZEN - RELEASED_UNUSED_FROZEN},
        "dtypes": {"backbone": str(model.backbone_dtype), "expert": str(model.expert_dtype)},
        "frame": list(FULL_FRAME),
        "timings": timings,
    }


def print_full(report: dict) -> None:
    counts, released = report["parameters"], report["released"]
    print("\n| parameters | μ0 (this package) | released | released without unused modules |\n|---|---|---|---|")
    print(f"| trainable | {counts['trainable']:,} | {released['trainable']:,} | {released['trainable_without_unused']:,} |")
    print(f"| frozen | {counts['frozen']:,} | {released['frozen']:,} | {released['frozen_without_unused']:,} |")
    print("\n| step | wall time (s) | peak RSS (MiB) | peak RSS Δ (MiB) |\n|---|---|---|---|")
    for name, row in report["timings"].items():
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {row['peak_rss_delta_mib']:.0f} |")


def print_tables(reports: list[dict]) -> None:
    print("\n| size | total params | trainable params |\n|---|---|---|")
    for report in reports:
        counts = report["parameters"]
        print(f"| {report['size']} | {counts['total']:,} | {counts['trainable']:,} |")
    print(f"\n| size | N | train step (ms), batch {TRAIN_BATCH_SIZE} | peak RSS (MiB) | peak RSS Δ (MiB) |\n|---|---|---|---|---|")
    for report in reports:
        for row in report["train"]:
            print(f"| {report['size']} | {row['queries']} | {row['median_s'] * 1e3:.1f} | "
                  f"{row['peak_rss_mib']:.0f} | {row['peak_rss_delta_mib']:.1f} |")
    print("\n| size | N | steps | cached (ms) | uncached (ms) | speed-up | cached peak Δ (MiB) | uncached peak Δ (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for report in reports:
        for row in report["predict"]:
            cached, uncached = row["cached"], row["uncached"]
            print(f"| {report['size']} | {row['queries']} | {row['steps']} | {cached['median_s'] * 1e3:.1f} | "
                  f"{uncached['median_s'] * 1e3:.1f} | {row['speedup']:.2f}× | {cached['peak_rss_delta_mib']:.1f} | "
                  f"{uncached['peak_rss_delta_mib']:.1f} |")


def print_masked_depth(reports: list[dict]) -> None:
    print("\n| size | N | steps | depth masked (ms) | depth omitted (ms) | masked / omitted |")
    print("|---|---|---|---|---|---|")
    for report in reports:
        for row in report["masked_depth"]:
            print(f"| {report['size']} | {row['queries']} | {row['steps']} | {row['depth_masked']['median_s'] * 1e3:.1f} | "
                  f"{row['depth_omitted']['median_s'] * 1e3:.1f} | {row['masked_over_omitted']:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--queries", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/bench_model.json")
    parser.add_argument("--quick", action="store_true", help="tiny only, N in {1, 16}, steps in {1, 4}, 1 repeat (CI smoke run)")
    parser.add_argument("--size", choices=["full"], help="smoke-test the default full-size config instead (see above)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.steps, args.repeats = ["tiny"], [1, 16], [1, 4], 1
    if max(args.queries) > MAX_QUERIES or min(args.queries) < 1:
        parser.error(f"--queries must lie in [1, {MAX_QUERIES}].")
    machine = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_before": os.getloadavg(),
    }
    print(f"# μ0 model benchmark (CPU, {machine['cpus']} cores, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, load average {machine['load_average_before'][0]:.1f})")
    print(f"median wall time over {args.repeats} repeat(s) after 1 warm-up call; peak RSS Δ over the RSS before one "
          "extra untimed call", flush=True)
    started = time.perf_counter()
    if args.size == "full":
        report = bench_full()
        print_full(report)
        machine["load_average_after"] = os.getloadavg()
        output = args.output.replace("bench_model.json", "bench_model_full.json")
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as handle:
            json.dump({"machine": machine, "full": report, "total_seconds": time.perf_counter() - started}, handle, indent=2)
        print(f"\nwrote {output} ({time.perf_counter() - started:.0f} s)")
        return
    reports = [bench_size(size, args.queries, args.steps, args.repeats) for size in args.sizes]
    print_tables(reports)
    print_masked_depth(reports)
    # Other processes on the same cores inflate CPU timings several-fold: keep the load next to the numbers.
    machine["load_average_after"] = os.getloadavg()
    results = {
        "machine": machine,
        "settings": {"sizes": args.sizes, "queries": args.queries, "steps": args.steps, "repeats": args.repeats,
                     "quick": args.quick, "max_queries": MAX_QUERIES, "train_batch_size": TRAIN_BATCH_SIZE,
                     "image_size": [IMAGE_HEIGHT, IMAGE_WIDTH]},
        "sizes": {report.pop("size"): report for report in reports},
        "total_seconds": time.perf_counter() - started,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {args.output} ({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
