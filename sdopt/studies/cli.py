"""``sdopt study correlation|grokking [--quick] [--out DIR] [--cache DIR]``.

The argparse wiring of the studies, kept here so that :mod:`sdopt.cli` needs one line to
register it: ``add_study_parser(subparsers)`` adds the ``study`` subcommand and
``run_study(args)`` runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from sdopt.studies import DATASETS

STUDIES = ("correlation", "grokking")


def add_study_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to an ``argparse`` subparsers object and return it."""
    parser = subparsers.add_parser(
        "study",
        help="reproduce the paper's measurements at CPU scale (correlation, grokking)",
        description=(
            "correlation: Kendall τ/ψ and partial τ (with bootstrap intervals) of SD and other "
            "measures against the generalization gap on a learning-rate × batch-size grid "
            "trained for a fixed epoch budget (digits and MNIST-1D MLPs, several seeds). "
            "grokking: SD with its decomposition, trace and λ_max through grokking runs of an "
            "MLP on (a + b) mod p over several seeds, with a permutation test of the paper's "
            "claim. "
            "Runs are cached under --cache and skipped when found."
        ),
    )
    parser.add_argument("name", choices=STUDIES, help="which study")
    parser.add_argument("--quick", action="store_true", help="the few-minute variant")
    parser.add_argument(
        "--out", default=None, help="output directory (default results/<name>[-quick])"
    )
    parser.add_argument("--cache", default=None, help="cache directory (default OUT/cache)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: tiny models run fastest)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=None,
        help="correlation: only these datasets (default: all; e.g. one process per dataset "
        "sharing --cache)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="only these seeds (default: the study's; the tables then cover these seeds only)",
    )
    return parser


def run_study(args: argparse.Namespace) -> int:
    """Run the study named by ``args.name``; print where the outputs went; return 0."""
    out = Path(args.out or f"results/{args.name}{'-quick' if args.quick else ''}")
    started = time.perf_counter()
    if args.name == "correlation":
        from sdopt.studies.correlation import CorrelationConfig, run_correlation_study

        config = CorrelationConfig.quick() if args.quick else CorrelationConfig()
        overrides: dict[str, Any] = {}
        if args.datasets:
            overrides["datasets"] = tuple(config.dataset(name) for name in args.datasets)
        if args.seeds:
            overrides["seeds"] = tuple(args.seeds)
        config = dataclasses.replace(config, **overrides)
        result = run_correlation_study(
            config, out_dir=out, cache_dir=args.cache, num_threads=args.threads
        )
        print(Path(result.files["correlations_md"]).read_text())
        print(f"{len(result.runs)} runs ({result.cached} from the cache)")
        for name, secs in result.seconds.items():
            print(f"{name}: {secs:.0f} s wall in this call")
    else:
        from sdopt.studies.grokking_dynamics import GrokkingDynamicsConfig, run_grokking_study

        config = GrokkingDynamicsConfig.quick() if args.quick else GrokkingDynamicsConfig()
        if args.datasets:
            print(
                "sdopt study: error: --datasets applies to the correlation study", file=sys.stderr
            )
            return 2
        if args.seeds:
            if not hasattr(config, "seeds"):
                print("sdopt study: error: --seeds needs a study with seeds", file=sys.stderr)
                return 2
            config = dataclasses.replace(config, seeds=tuple(args.seeds))
        result = run_grokking_study(
            config, out_dir=out, cache_dir=args.cache, num_threads=args.threads
        )
        print(Path(result.files["summary_md"]).read_text())
    for name, path in result.files.items():
        print(f"{name}: {path}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m sdopt.studies.cli correlation --quick``."""
    parser = argparse.ArgumentParser(prog="sdopt")
    add_study_parser(parser.add_subparsers(dest="command"))
    return run_study(parser.parse_args(["study", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
