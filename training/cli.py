"""The `mu0` command line."""

import argparse
import logging
import sys

from .. import __version__

EXAMPLES = """examples:
  mu0 demo                      synthetic data -> train a small μ0 -> evaluate -> save (a few minutes, no downloads)
  mu0 demo --quick --output-dir /tmp/mu0-demo
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
