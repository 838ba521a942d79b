"""`fct reproduce`: the paper's experiment from the command line (fct_ml only; the full `fct`
command, with the serving commands, is fct_assets.cli).

Deferred imports: each command imports what it runs, so `fct --help` starts without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that lists what it takes: `commands` (subcommand name -> its parser) and
    `options` (dest -> argparse.Action). The parsers of its subcommands are of its class too."""

    _subcommands: argparse.Action | None = None

    def add_subparsers(self, **kwargs):
        """argparse's add_subparsers, remembered for `commands`."""
        self._subcommands = super().add_subparsers(**kwargs)
        return self._subcommands

    @property
    def commands(self) -> dict[str, CommandParser]:
        """Subcommand name -> its parser, in the order they were added (empty: none)."""
        return dict(self._subcommands.choices) if self._subcommands is not None else {}

    @property
    def options(self) -> dict[str, argparse.Action]:
        """Every argument this parser takes (in any group), by dest, in the order added."""
        # argparse keeps every action, whatever group it was added to, in this one list.
        return {action.dest: action for action in self._actions}


def _reproduce(args: argparse.Namespace, evaluate: Callable[..., Any] | None = None) -> int:
    # Imports here keep `fct --help` fast (torch takes seconds to import).
    from fct_ml.data import parse_class_list
    from fct_ml.datasets import default_old_classes, load_dataset
    from fct_ml.presets import preset
    from fct_ml.progress import StageProgress, reproduce_stages
    from fct_ml.reproduce import dumps, evaluate_split, format_table, run_experiment
    from fct_ml.training import resolve_device

    dataset = load_dataset(args.dataset, args.data_dir)
    split = args.old_classes or default_old_classes(args.dataset, dataset.num_classes)
    old_classes = parse_class_list(split, dataset.num_classes, what="old_classes")
    if len(old_classes) == dataset.num_classes:
        print(
            "note: old_classes covers every class; no query is of an unseen class", file=sys.stderr
        )
    config = preset(args.preset)
    device = resolve_device(args.device)
    # Stage lines on stderr, each with the run's position and an overall ETA.
    log = (lambda s: None) if args.quiet else StageProgress(reproduce_stages(config))
    result = run_experiment(
        dataset,
        old_classes,
        config,
        seed=args.seed,
        device=device,
        progress=not args.quiet and sys.stderr.isatty(),
        log=log,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        evaluate=evaluate or evaluate_split,
    )
    # The setting of a study is its preset (benchmarks/studies/reproduce.py groups runs by it).
    result = {"dataset": result["dataset"], "preset": args.preset, "setting": args.preset, **result}
    print(dumps(result) if args.json else format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(dumps(result) + "\n")
        print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    """Add `reproduce` to a subparsers object (the `fct` command of fct_assets reuses it)."""
    from fct_ml.datasets import dataset_names, default_splits

    rep = sub.add_parser(
        "reproduce", help="train and evaluate old/new/h/BCT/FastFill (the paper's experiment)"
    )
    rep.add_argument(
        "--dataset",
        default="fashion-mnist",
        help=dataset_names(),
    )
    rep.add_argument(
        # fct_ml.presets.PRESETS (tests/test_registries.py checks this list against it): listed
        # here so that `fct --help` does not import torch.
        "--preset",
        default="cpu",
        choices=["tiny", "demo", "cpu", "cpu-hard", "paper"],
    )
    rep.add_argument(
        "--old-classes",
        default=None,
        help=(
            "classes the old model sees: ranges or lists, e.g. 0-4 or 1,3,5 (default: the"
            f" dataset's, {default_splits()})"
        ),
    )
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--out", default=None, help="write the result JSON here")
    rep.add_argument(
        "--data-dir",
        default=None,
        help="dataset folder (default: FCT_DATA_DIR or the Debian package's)",
    )
    rep.add_argument(
        "--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N"
    )
    rep.add_argument(
        "--cache-dir",
        default=None,
        help="reuse trained models from this folder when their config, seed and data match"
        " (settings that share stages train them once)",
    )
    rep.add_argument("--quiet", action="store_true", help="no progress output")
    rep.add_argument(
        "--json", action="store_true", help="print the result JSON (as --out writes it), no table"
    )
    rep.set_defaults(func=_reproduce)
    return rep


def build_parser() -> CommandParser:
    """`fct` with the one command of fct_ml, `reproduce` (fct_assets.cli adds the others)."""
    parser = CommandParser(prog="fct", description="Forward-compatible embedding upgrades.")
    add_reproduce_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None, *, evaluate: Callable[..., Any] | None = None) -> int:
    """Run `fct reproduce` with `argv` (default: the program's arguments); returns the exit code.

    `evaluate`: scores each split in place of fct_ml.reproduce.evaluate_split (run_experiment's
    `evaluate`), e.g. a wrapper of it that records its inputs; default evaluate_split."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, evaluate=evaluate)
    except ValueError as err:  # DataError, ConfigError and friends: one clear line, no traceback
        print(f"fct: error: {err}", file=sys.stderr)
        return 1  # refused; 2 is argparse's, for a command line that does not parse


if __name__ == "__main__":
    sys.exit(main())
