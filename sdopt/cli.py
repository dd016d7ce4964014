"""The ``sdopt`` command line: ``sdopt grok`` trains the grokking benchmark, ``sdopt sweep`` a grid.

``sdopt grok`` with no flags trains the paper's grokking MLP at CPU scale (a bias-free GELU MLP
of width 32 with 3 linear layers, its initial parameters scaled by 3) on ``(a + b) mod 97``
(40 % of the pairs for training) with full-batch SGD (lr 2, heavy-ball momentum 0.9, weight
decay 5e-4) for 1,200 steps, at the edge of stability of its own (heavy-ball) map, while
:class:`sdopt.SDOptimizer` monitors the sharpness dimension every 100 steps; it fits the
training set in about 500 steps and groks (validation accuracy ≥ 95 %) at about step 900, in
about a minute on one CPU core. It writes ``metrics.csv`` (or ``.jsonl``),
``sdopt_records.jsonl``, ``grokking.png``, ``summary.json`` and ``checkpoint.pt`` into ``--out``.

``sdopt sweep`` runs a grid (optimizers × modes × seeds, or any ``grok`` flags) sequentially
on the CPU and writes ``sweep.csv``, ``sweep.md`` and a W&B sweep file ``wandb_sweep.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdopt.train import OPTIMIZERS, TrainConfig

__all__ = ["GROK_DEFAULTS", "build_parser", "config_from_args", "main"]

# The defaults of ``sdopt grok``: chosen by measurement to show grokking in minutes on a CPU.
GROK_DEFAULTS: dict[str, Any] = {
    # the paper's grokking MLP at CPU scale, trained at the edge of stability of its own map:
    # full-batch heavy ball whose eta * lambda_max climbs to the heavy-ball edge 2 (1 + beta)
    # and stays near it while the network memorises, then groks (docs/grokking.md, measured)
    "p": 97,
    "operation": "add",
    "train_fraction": 0.4,
    "model": "mlp",
    "width": 32,
    "layers": 3,
    "bias": False,
    "init_scale": 3.0,
    "optimizer": "sgd",
    "lr": None,  # the optimizer's own default: OPTIMIZER_DEFAULTS
    "momentum": 0.9,
    "weight_decay": None,
    "steps": 1200,
    "eval_every": 10,
    "mode": "monitor",
    "every": 100,
    "k": 3,
    "exponent_map": "auto",
    "seed": 0,
    "out": "runs/grok",
    "threads": 1,  # measured (docs/cli.md): torch's choice (one per core) is 1.5-5x slower under load
}


def _add_run_flags(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    d = GROK_DEFAULTS
    g = parser.add_argument_group("task and model")
    g.add_argument("--p", type=int, default=d["p"], help="prime modulus (default: %(default)s)")
    g.add_argument(
        "--operation",
        choices=["add", "sub", "mul", "div"],
        default=d["operation"],
        help="a op b mod p (default: %(default)s)",
    )
    g.add_argument(
        "--train-fraction",
        type=float,
        default=d["train_fraction"],
        help="fraction of all pairs used for training (default: %(default)s)",
    )
    g.add_argument(
        "--model",
        choices=["mlp", "transformer", "power"],
        default=d["model"],
        help="mlp: one-hot GELU MLP; transformer: Nanda et al.; power: Power et al. (default: %(default)s)",
    )
    g.add_argument(
        "--width",
        type=int,
        default=d["width"],
        help="hidden width of the MLP (default: %(default)s)",
    )
    g.add_argument(
        "--layers",
        type=int,
        default=d["layers"],
        help="linear layers of the MLP (default: %(default)s)",
    )
    g.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=d["bias"],
        help="biases in the MLP's linear layers (default: %(default)s)",
    )
    g.add_argument(
        "--init-scale",
        type=float,
        default=d["init_scale"],
        help="factor on the MLP's initial parameters (default: %(default)s)",
    )
    g = parser.add_argument_group("optimizer")
    if not sweep:
        g.add_argument(
            "--optimizer",
            choices=list(OPTIMIZERS),
            default=d["optimizer"],
            help="base optimizer; grokfast-* adds the Grokfast EMA filter (default: %(default)s)",
        )
        g.add_argument(
            "--mode",
            choices=["none", "monitor", "lr", "penalty"],
            default=d["mode"],
            help="SDOptimizer mode; none trains with the plain optimizer (default: %(default)s)",
        )
        g.add_argument("--seed", type=int, default=d["seed"], help="seed (default: %(default)s)")
    g.add_argument(
        "--lr",
        type=float,
        default=d["lr"],
        help="learning rate (default: 2.0 for sgd, 3e-3 for adam/adamw)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="weight decay (default: 5e-4 for sgd, 1.0 for adam/adamw)",
    )
    g.add_argument(
        "--momentum",
        type=float,
        default=d["momentum"],
        help="SGD momentum (default: %(default)s)",
    )
    g.add_argument(
        "--grokfast-alpha", type=float, default=0.98, help="Grokfast EMA α (default: %(default)s)"
    )
    g.add_argument(
        "--grokfast-lamb",
        type=float,
        default=2.0,
        help="Grokfast amplification λ (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size", type=int, default=None, help="minibatch size (default: full batch)"
    )
    g = parser.add_argument_group("sharpness dimension (SDOptimizer)")
    g.add_argument(
        "--every",
        type=int,
        default=d["every"],
        help="steps between SD estimates (default: %(default)s)",
    )
    g.add_argument(
        "--k",
        type=int,
        default=d["k"],
        help="top Hessian eigenpairs per estimate (default: %(default)s)",
    )
    g.add_argument(
        "--exponent-map",
        choices=["auto", "gd", "momentum", "adam"],
        default=d["exponent_map"],
        help="the map whose exponents SD is made of; auto: the optimizer's own (heavy ball for "
        "SGD with momentum, adam for Adam/AdamW, gd otherwise) (default: %(default)s)",
    )
    g.add_argument(
        "--target-sd", type=float, default=None, help="mode lr: largest allowed predicted SD"
    )
    g.add_argument(
        "--penalty-strength",
        type=float,
        default=None,
        help="mode penalty: weight of the SD surrogate",
    )
    g.add_argument(
        "--sd-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any further SDOptimizer keyword, e.g. --sd-option penalty_every=8 (repeatable)",
    )
    g = parser.add_argument_group("run")
    g.add_argument(
        "--steps", type=int, default=d["steps"], help="optimizer steps (default: %(default)s)"
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help="evaluate every N steps (default: %(default)s)",
    )
    g.add_argument(
        "--out",
        default=d["out"] if not sweep else "runs/sweep",
        help="output directory (default: %(default)s)",
    )
    g.add_argument(
        "--format",
        choices=["csv", "jsonl"],
        default="csv",
        help="metrics file format (default: %(default)s)",
    )
    g.add_argument(
        "--wandb",
        choices=["disabled", "offline", "online"],
        default="disabled",
        help="Weights & Biases mode (default: %(default)s)",
    )
    g.add_argument("--wandb-project", default="sdopt", help="W&B project (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="checkpoint every N steps; 0: only at the end (default: %(default)s)",
    )
    g.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="stop once validation accuracy reaches this value",
    )
    g.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype"
    )
    g.add_argument(
        "--threads",
        type=int,
        default=d["threads"],
        help="torch threads; 1 is the fastest on a shared CPU (default: %(default)s)",
    )
    existing = g.add_mutually_exclusive_group() if not sweep else g
    if not sweep:
        existing.add_argument(
            "--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists"
        )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files already in OUT (without it, an existing run is refused)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sdopt`` argument parser (subcommands ``grok`` and ``sweep``)."""
    parser = argparse.ArgumentParser(
        prog="sdopt",
        description="Measure, log and steer the sharpness dimension of training dynamics.",
    )
    from sdopt import __version__

    parser.add_argument("--version", action="version", version=f"sdopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    grok = sub.add_parser(
        "grok",
        help="train the modular-arithmetic grokking benchmark on the CPU",
        description=(
            "Train the modular-arithmetic grokking benchmark; writes metrics, SD records, a PNG "
            "plot, summary.json and a checkpoint into --out."
        ),
    )
    _add_run_flags(grok)
    grok.add_argument(
        "--grid",
        action="store_true",
        help="run the default sweep grid instead of one run (same as `sdopt sweep`)",
    )
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of grokking configurations and seeds; write one table",
        description=(
            "Run every combination of --optimizers x --modes x --seeds (other flags shared) "
            "and write sweep.csv, sweep.md and wandb_sweep.yaml into --out."
        ),
    )
    _add_run_flags(sweep, sweep=True)
    sweep.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=["sgd", "grokfast-sgd"],
        help="optimizers of the grid (default: %(default)s)",
    )
    sweep.add_argument(
        "--modes",
        nargs="+",
        choices=["none", "monitor", "lr", "penalty"],
        default=["none", "lr"],
        help="SDOptimizer modes of the grid (default: %(default)s)",
    )
    sweep.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)"
    )
    sweep.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help=(
            "base learning rates of the grid (default: --lr, or each optimizer's own default); "
            "with --modes none lr this is the steering comparison: fixed LRs against the "
            "edge-riding controller started from each"
        ),
    )
    from sdopt.studies.cli import add_study_parser  # `sdopt study correlation|grokking`

    add_study_parser(sub)
    return parser


# SDOptimizer keywords that other flags set: --sd-option refuses them and names the flag
_SD_RESERVED = {
    "base_optimizer": "--optimizer",
    "model": "--model",
    "loss_fn": "the task (cross-entropy)",
    "data": "the task (the training split)",
    "mode": "--mode",
    "every": "--every",
    "k": "--k",
    "loggers": "--wandb",
    "exponent_map": "--exponent-map",
}
_SD_FLAGS = {"target_sd": "--target-sd", "penalty_strength": "--penalty-strength"}


def _sd_keywords() -> list[str]:
    """The keyword arguments of :class:`sdopt.SDOptimizer` that ``--sd-option`` may set."""
    import inspect

    from sdopt.optim import SDOptimizer

    names = inspect.signature(SDOptimizer.__init__).parameters
    return sorted(n for n in names if n != "self" and n not in _SD_RESERVED)


# --lr and --weight-decay when not given, per base optimizer (grokfast-X uses X's): SGD at the
# heavy-ball edge of the default task (measured, docs/grokking.md); Adam(W) as in the first
# release's default AdamW task
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 2.0, "weight_decay": 5e-4},
    "adam": {"lr": 3e-3, "weight_decay": 1.0},
    "adamw": {"lr": 3e-3, "weight_decay": 1.0},
}


def _optimizer_default(optimizer: str, name: str, given: float | None) -> float:
    if given is not None:
        return given
    return OPTIMIZER_DEFAULTS[optimizer.removeprefix("grokfast-")][name]


def _exponent_map(name: str, optimizer: str, momentum: float) -> str:
    """``--exponent-map``: ``auto`` is the map of the base optimizer's own update."""
    if name != "auto":
        return name
    base = optimizer.removeprefix("grokfast-")
    if base in ("adam", "adamw"):
        return "adam"
    return "momentum" if momentum > 0 else "gd"


def _sd_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    given: dict[str, str] = {}  # key -> how it was given, for the duplicate message
    if args.target_sd is not None:
        options["target_sd"] = args.target_sd
        given["target_sd"] = f"--target-sd {args.target_sd}"
    if args.penalty_strength is not None:
        options["penalty_strength"] = args.penalty_strength
        given["penalty_strength"] = f"--penalty-strength {args.penalty_strength}"
    allowed = None
    for item in args.sd_option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(
                f"Invalid --sd-option: {item!r} (must be KEY=JSON, e.g. penalty_every=8)"
            )
        if key in _SD_RESERVED:
            raise ValueError(
                f"Invalid --sd-option: {item!r} ({key} is set by {_SD_RESERVED[key]}, "
                "not by --sd-option)"
            )
        if allowed is None:
            allowed = _sd_keywords()
        if key not in allowed:
            raise ValueError(
                f"Invalid --sd-option: {item!r} (unknown SDOptimizer keyword {key!r}; "
                f"known: {', '.join(allowed)})"
            )
        if key in given:
            raise ValueError(
                f"Invalid --sd-option: {item!r} ({key} is already given by {given[key]!r}; "
                "give each key once)"
            )
        given[key] = f"--sd-option {item}"
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string
    return options


def config_from_args(
    args: argparse.Namespace,
    *,
    optimizer: str | None = None,
    mode: str | None = None,
    seed: int | None = None,
    out: str | None = None,
) -> TrainConfig:
    """Translate parsed ``grok``/``sweep`` flags into a validated :class:`TrainConfig`."""
    model_kwargs: dict[str, Any] = {}
    if args.model == "mlp":
        model_kwargs.update(width=args.width, num_layers=args.layers, bias=args.bias)
        model_kwargs["init_scale"] = args.init_scale
    optimizer = optimizer if optimizer is not None else args.optimizer
    sd_options = _sd_options(args)
    sd_options["exponent_map"] = _exponent_map(args.exponent_map, optimizer, args.momentum)
    config = TrainConfig(
        p=args.p,
        operation=args.operation,
        train_fraction=args.train_fraction,
        model=args.model,
        model_kwargs=model_kwargs,
        optimizer=optimizer,
        lr=_optimizer_default(optimizer, "lr", args.lr),
        weight_decay=_optimizer_default(optimizer, "weight_decay", args.weight_decay),
        momentum=args.momentum,
        grokfast_alpha=args.grokfast_alpha,
        grokfast_lamb=args.grokfast_lamb,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        sd_mode=mode if mode is not None else args.mode,
        sd_every=args.every,
        sd_k=args.k,
        sd_options=sd_options,
        seed=seed if seed is not None else args.seed,
        dtype=args.dtype,
        out_dir=out if out is not None else args.out,
        metrics_format=args.format,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=getattr(args, "resume", False),
        plot=not args.no_plot,
        stop_at_val_accuracy=args.stop_at,
        threads=args.threads,
    )
    try:
        return config.validate()
    except ValueError as exc:  # name the flag, not the config field
        raise ValueError(_flag_message(str(exc))) from None


def _flag_message(message: str, args: argparse.Namespace | None = None) -> str:
    """Rewrite ``Invalid <field>:`` of a config/SDOptimizer error as ``Invalid <flag>:``.

    With ``args`` (errors raised by the training run), SDOptimizer keywords come first: named
    by the flag that gave them (``--target-sd``, ``--penalty-strength`` or ``--sd-option KEY``).
    """
    if args is not None:
        for key, flag in _sd_option_flags(args).items():
            pattern = rf"^Invalid {re.escape(key)}(?=[:.\[ ])"
            if re.match(pattern, message):
                return re.sub(pattern, f"Invalid {flag}", message)
    for field_name, flag in _FIELD_FLAGS.items():
        message = message.replace(f"Invalid {field_name}:", f"Invalid {flag}:")
    if message.startswith("Invalid resume:"):
        message = "Invalid --resume:" + message[len("Invalid resume:") :]
        match = re.match(r"Invalid --resume: (\w+)=", message)
        if match and match.group(1) in _RESUME_FLAGS:
            name = match.group(1)
            message = message.replace(f" {name}=", f" {_RESUME_FLAGS[name]}=", 1)
    return message


def _sd_option_flags(args: argparse.Namespace) -> dict[str, str]:
    """SDOptimizer keyword -> the flag that set it."""
    flags = {}
    for key, flag in _SD_FLAGS.items():
        if getattr(args, key, None) is not None:
            flags[key] = flag
    for item in args.sd_option:
        key = item.partition("=")[0]
        flags.setdefault(key, f"--sd-option {key}")
    flags.setdefault("exponent_map", "--exponent-map")
    return flags


_FIELD_FLAGS = {
    "train_fraction": "--train-fraction",
    "weight_decay": "--weight-decay",
    "grokfast_alpha": "--grokfast-alpha",
    "grokfast_lamb": "--grokfast-lamb",
    "batch_size": "--batch-size",
    "eval_every": "--eval-every",
    "sd_every": "--every",
    "sd_k": "--k",
    "checkpoint_every": "--checkpoint-every",
    "stop_at_val_accuracy": "--stop-at",
    "steps": "--steps",
    "lr": "--lr",
    "p": "--p",
    "momentum": "--momentum",
    "seed": "--seed",
    "threads": "--threads",
    "width": "--width",
    "num_layers": "--layers",
    "init_scale": "--init-scale",
}
# config fields that a resumed run must keep, and their flags
_RESUME_FLAGS = {
    **_FIELD_FLAGS,
    "operation": "--operation",
    "model": "--model",
    "model_kwargs": "--width",
    "optimizer": "--optimizer",
    "sd_mode": "--mode",
    "sd_options": "--sd-option",
    "dtype": "--dtype",
    "metrics_format": "--format",
    "wandb_project": "--wandb-project",
}


def _print_summary(summary: dict[str, Any], out: str) -> None:
    grok = summary["steps_to_95_val_accuracy"]
    fit = summary["steps_to_99_train_accuracy"]
    fit_text = f"≥ 99 % at step {fit}" if fit is not None else "never ≥ 99 %"
    grok_text = (
        f"step {grok} ({summary['seconds_to_95_val_accuracy']:.1f} s)"
        if grok is not None
        else "not reached"
    )
    sd = summary["final_sharpness_dimension"]
    sd_text = (
        f"; {summary['sd_estimates']} SD estimates, final SD {sd:.4g}" if sd is not None else ""
    )
    files = "metrics, sdopt_records.jsonl, summary.json, checkpoint.pt"
    if summary["config"]["plot"]:
        files += ", grokking.png"
    lines = [
        f"train accuracy {summary['final_train_accuracy']:.3f} ({fit_text}), "
        f"validation accuracy {summary['final_val_accuracy']:.3f}",
        f"grokking (validation ≥ 95 %): {grok_text}",
        f"{summary['steps']} steps in {summary['wall_time_seconds']:.1f} s{sd_text}",
        f"wrote {out}/: {files}",
    ]
    if summary["diverged"]:
        lines.insert(0, "training loss became non-finite: stopped (diverged)")
    print("\n".join(lines))


# what `sdopt grok` writes into --out: a directory holding any of these holds a run
RUN_FILES = (
    "checkpoint.pt",
    "metrics.csv",
    "metrics.jsonl",
    "summary.json",
    "sdopt_records.jsonl",
)
_REPLACED_FILES = (*RUN_FILES, "grokking.png", "checkpoint.tmp")
SWEEP_FILES = ("sweep.csv", "sweep.md", "wandb_sweep.yaml")


def _writable_dir(path: Path, flag: str = "--out") -> None:
    """Check that ``path`` is, or can be created as, a writable directory; else ``ValueError``.

    Nothing is created: the nearest existing directory on the way is probed with a temporary
    file (the run creates the rest).
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"Invalid {flag}: {str(path)!r} is a file, not a directory")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(
            f"Invalid {flag}: {str(path)!r} is under the file {str(base)!r}, not a directory"
        )
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        what = "is not writable" if base == path else f"cannot be created in {str(base)!r}"
        raise ValueError(f"Invalid {flag}: {str(path)!r} {what} ({reason})") from None


def _existing_run(path: Path, names: Sequence[str] = RUN_FILES) -> list[str]:
    return [name for name in names if (path / name).exists()]


def _refuse_or_replace(
    runs: Sequence[Path], args: argparse.Namespace, command: str, *, sweep: Path | None = None
) -> None:
    """Refuse to write over a run unless ``--resume`` or ``--overwrite`` says so.

    ``runs`` are run directories (``RUN_FILES``), ``sweep`` the directory of a sweep's tables
    (``SWEEP_FILES``). With ``--overwrite`` those files are deleted first (nothing else is).
    """
    held = [(path, _existing_run(path), _REPLACED_FILES) for path in runs]
    if sweep is not None:
        held.append((sweep, _existing_run(sweep, SWEEP_FILES), SWEEP_FILES))
    held = [item for item in held if item[1]]
    if not held:
        return
    if args.overwrite:
        for path, _, names in held:
            for name in names:
                (path / name).unlink(missing_ok=True)
        where = ", ".join(str(path) for path, _, _ in held[:3]) + (", ..." if len(held) > 3 else "")
        print(f"sdopt {command}: --overwrite: replaced the run files in {where}", file=sys.stderr)
        return
    if getattr(args, "resume", False):
        return
    path, found, _ = held[0]
    choices = "replace it with --overwrite"
    if hasattr(args, "resume"):
        choices = "continue it with --resume, " + choices
    raise ValueError(
        f"Invalid --out: {str(path)!r} already holds a run ({', '.join(found)}); "
        f"{choices}, or choose another --out"
    )


def _run_grok(args: argparse.Namespace) -> int:
    from sdopt.train import train

    config = config_from_args(args)
    out = Path(config.out_dir)
    _writable_dir(out)
    _refuse_or_replace([out], args, "grok")
    try:
        result = train(config)
    except ValueError as exc:
        raise ValueError(_flag_message(str(exc), args)) from None
    _print_summary(result.summary, str(config.out_dir))
    return 1 if result.summary["diverged"] else 0


def _run_sweep(args: argparse.Namespace) -> int:
    from sdopt.sweeps import run_sweep

    if getattr(args, "grid", False):  # `sdopt grok --grid`: the default grid around these flags
        optimizers = ["sgd", "grokfast-sgd"]
        modes = ["none", "lr"]
        seeds = [0, 1, 2]
    else:
        optimizers, modes, seeds = args.optimizers, args.modes, args.seeds
    lrs = getattr(args, "lrs", None)
    for lr in lrs or []:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Invalid --lrs: {lr!r} (each learning rate must be > 0)")
    configs = []
    for optimizer in optimizers:
        for lr in lrs or [None]:
            run_args = args if lr is None else argparse.Namespace(**{**vars(args), "lr": lr})
            for mode in modes:
                for seed in seeds:
                    tag = "" if lr is None else f"_lr{lr:g}"
                    name = f"{optimizer}{tag}_{mode}_seed{seed}"
                    configs.append(
                        config_from_args(
                            run_args,
                            optimizer=optimizer,
                            mode=mode,
                            seed=seed,
                            out=str(Path(args.out) / name),
                        )
                    )
    out = Path(args.out)
    for path in [out, *(Path(c.out_dir) for c in configs)]:
        _writable_dir(path)
    _refuse_or_replace([Path(c.out_dir) for c in configs], args, args.command, sweep=out)
    try:
        table = run_sweep(configs, out)
    except ValueError as exc:
        raise ValueError(_flag_message(str(exc), args)) from None
    print(table.markdown)
    print(f"wrote {args.out}/sweep.csv, sweep.md, wandb_sweep.yaml")
    return 0


class _Interrupts:
    """SIGINT and SIGTERM while a command runs: the first raises ``KeyboardInterrupt``.

    :func:`sdopt.train.train` saves a checkpoint on ``KeyboardInterrupt``, so SIGTERM (a job
    scheduler, ``kill``) saves one like Ctrl-C. A second signal exits at once with status
    128 + signal and one line on stderr; the checkpoint on disk is the last complete one (saves
    are atomic). Run as the program (``keep``), the second-signal handler stays installed until
    the process ends, so a second Ctrl-C during shutdown exits quietly too.
    """

    SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self, command: str, *, keep: bool = False) -> None:
        self.command = command
        self.keep = keep
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._first)
        except ValueError:  # not the main thread: leave the handlers alone
            self._restore()
        return self

    def __exit__(self, *exc: object) -> None:
        if not (self.keep and self.signum is not None):
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _first(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for sig in self.SIGNALS:
            signal.signal(sig, self._again)
        raise KeyboardInterrupt

    def _again(self, signum: int, frame: Any) -> None:
        print(
            f"\nsdopt {self.command}: interrupted again: exiting now "
            "(the last complete checkpoint is kept)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdopt`` console script and ``python -m sdopt``; returns the exit code.

    Every invalid flag value, an unusable ``--out`` and an unreadable checkpoint exit with
    status 2 and one line naming the flag. SIGINT (Ctrl-C) and SIGTERM save a checkpoint and
    exit with 130 / 143; a second signal exits at once.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    started = time.perf_counter()
    interrupts = _Interrupts(args.command, keep=argv is None)
    try:
        with interrupts:
            if args.command == "study":
                from sdopt.studies.cli import run_study

                code = run_study(args)
            elif args.command == "grok" and not args.grid:
                code = _run_grok(args)
            else:
                code = _run_sweep(args)
    except (ValueError, ImportError) as exc:
        print(f"sdopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing into --out
        print(f"sdopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = interrupts.signum if interrupts.signum is not None else signal.SIGINT
        name = (
            "terminated (SIGTERM)" if signum == getattr(signal, "SIGTERM", None) else "interrupted"
        )
        hint = ""
        if args.command == "grok":  # train() saved the checkpoint of the run (of a --grid point)
            hint = " (checkpoint saved; continue with --resume)"
        elif args.command == "sweep":
            hint = " (the current run's checkpoint is saved in its folder)"
        print(
            f"sdopt {args.command}: {name} after {time.perf_counter() - started:.0f} s{hint}",
            file=sys.stderr,
        )
        return 128 + int(signum)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
