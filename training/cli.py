"""The `mu0` command line."""

import argparse
import logging
import os
import sys

from .. import __version__

EXAMPLES = """examples:
  mu0 demo                      synthetic data -> train a small μ0 -> evaluate -> save (a few minutes, no downloads)
  mu0 demo --quick --output-dir /tmp/mu0-demo
  mu0 train --recipe tiny-cpu --dataset data/samples --output-dir outputs/tiny
  mu0 train --recipe mu0-smolvlm2-2.2b --dataset me/my-traces --push-to-hub me/mu0-run1
"""


def demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .demo import QUICK, DemoSettings, format_table, run_demo

    settings = QUICK if args.quick else DemoSettings()
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    settings = replace(settings, seed=args.seed)
    summary = run_demo(args.output_dir, settings)
    print(f"\nHeld-out metrics ({summary['eval_samples']} samples; u, v in [-1, 1], z in metres; min = best of "
          f"{settings.num_samples}):")
    print(format_table(summary["metrics"]))
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; wall time {summary['wall_time_s']:.0f} s")
    print(f"model and processor saved to {args.output_dir}/model (load with Mu0ForTracePrediction.from_pretrained)")


def train(args: argparse.Namespace) -> None:
    from .pretrain import load_recipe, load_samples, make_trainer

    recipe = load_recipe(args.recipe)
    samples, statistics = load_samples(args.dataset)
    evaluation = None
    if args.eval_samples:
        if not hasattr(samples, "select"):
            raise ValueError("--eval-samples needs a local dataset (a streamed Hub dataset has no random access).")
        evaluation = samples.select(range(min(args.eval_samples, len(samples))))
    trainer = make_trainer(recipe, samples, statistics, args.output_dir, eval_dataset=evaluation, max_steps=args.max_steps)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.output_dir)
    trainer.processing_class.save_pretrained(args.output_dir)
    metrics = None
    if evaluation is not None:
        metrics = trainer.evaluate()
        print("| metric | value |\n|---|---|")
        for key in sorted(metrics):
            if key.endswith("@32") and key.split("/")[1].split("@")[0] in ("ade", "fde", "min_ade", "min_fde"):
                print(f"| {key.removeprefix('eval_')} | {metrics[key]:.4f} |")
    if trainer.skipped_nonfinite_steps:
        print(f"skipped {trainer.skipped_nonfinite_steps} batches with a non-finite loss")
    if args.push_to_hub:
        from .publishing import push_mu0_to_hub

        push_mu0_to_hub(trainer.model, trainer.processing_class, args.push_to_hub,
                        datasets=None if os.path.isdir(args.dataset) else [args.dataset],
                        metrics=None if metrics is None else {k.removeprefix("eval_"): v for k, v in metrics.items()},
                        recipe=args.recipe)
    print(f"model and processor saved to {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mu0", description="μ0: predict future 3D traces of query points.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mu0 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="end-to-end job on synthetic data, no downloads")
    demo_parser.add_argument("--output-dir", default="outputs/demo")
    demo_parser.add_argument("--quick", action="store_true", help="a one-minute version (used by CI)")
    demo_parser.add_argument("--steps", type=int, default=None, help="training steps (default: 400, quick: 30)")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(handler=demo)
    train_parser = commands.add_parser("train", help="pretrain μ0 on a TraceExtract samples dataset")
    train_parser.add_argument("--recipe", default="tiny-cpu", help="a named recipe or a recipe JSON path")
    train_parser.add_argument("--dataset", required=True, help="a folder from save_samples() or a Hub dataset repo")
    train_parser.add_argument("--output-dir", default="outputs/train")
    train_parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    train_parser.add_argument("--eval-samples", type=int, default=32, help="rows evaluated after training (0: none)")
    train_parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    train_parser.add_argument("--push-to-hub", default=None, metavar="REPO")
    train_parser.set_defaults(handler=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        if args.debug:
            raise
        print(f"mu0 {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
