"""The ``s2study run`` and ``s2study report`` subcommands.

Imports stay light here (the CLI builds every parser at start-up); Ray, Optuna and MLflow
are imported by the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from s2study.errors import ConfigError

#: exit codes: every trial failed; interrupted by Ctrl-C (128 + SIGINT); stopped by SIGTERM
#: (128 + SIGTERM: ``ray job stop``, ``docker stop``, ``kill``); both leave the study resumable
EXIT_ALL_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


def _cmd_run(args: argparse.Namespace) -> int:
    from s2study.study.config import load_study

    overrides = list(args.set or [])
    # JSON-quoted so a URI or path is read back as a string whatever it contains
    if args.storage:
        overrides.append(f"storage={json.dumps(args.storage)}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={json.dumps(args.tracking_uri)}")
    cfg = load_study(args.study, overrides, trials=args.trials)
    from s2study.study.runner import Terminated, run_study

    try:
        outcome = run_study(cfg, address=args.address, resume=args.resume,
                            study_text=Path(args.study).read_text(encoding="utf-8"))
    except Terminated:
        print(f"s2study: stopped by SIGTERM; continue it with: s2study run {args.study} --resume", file=sys.stderr)
        return EXIT_TERMINATED
    if outcome.interrupted and outcome.stopped_by != "budget":  # a spent budget is a clean end
        return EXIT_TERMINATED if outcome.stopped_by == "SIGTERM" else EXIT_INTERRUPTED
    if outcome.trials and all(t.status == "failed" for t in outcome.trials):
        return EXIT_ALL_FAILED
    return 0


def report_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (which must exist)."""
    from s2study.study.tracking import normalize_tracking_uri, sqlite_path

    uri = normalize_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"), cwd or Path.cwd())
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"--tracking-uri: no MLflow database at {db}; pass the URI the study used")
    return uri


def _cmd_report(args: argparse.Namespace) -> int:
    from s2study.report import study_report

    print(study_report(report_tracking_uri(args.tracking_uri), args.study, lambda_plot=args.lambda_plot))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``report``."""
    run = subparsers.add_parser(
        "run", help="run a hyperparameter study (Ray Tune + Optuna + ASHA, tracked in MLflow)",
        description="Validate STUDY.yaml, then run its trials on a local Ray instance or a cluster. "
                    "Examples: search_spaces/smoke.yaml (CPU, minutes), search_spaces/lambda.yaml (GPU).",
    )
    run.add_argument("study", metavar="STUDY.yaml", help="the study file")
    run.add_argument("--address", help="Ray cluster to join (auto, ray://HOST:10001); default: a local instance")
    run.add_argument("--storage", help="Ray storage path: a local folder or s3://BUCKET/PREFIX (overrides storage)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri)")
    run.add_argument("--resume", action="store_true",
                     help="continue the study stored at STORAGE/NAME (finished trials are not rerun; the study "
                          "file must be unchanged, except for more trials)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a study key, e.g. asha.max_epochs=3 or base.lambda_ssl=0.2 (repeatable)")
    run.add_argument("--trials", type=int, help="override the number of trials")
    run.set_defaults(func=_cmd_run)

    rep = subparsers.add_parser(
        "report", help="ranked trials and the paper's tables of a study, read from MLflow",
        description="Print a study's trials ranked by its metric and, for evaluated trials, the "
                    "paper's NC / NCM / CMR tables.",
    )
    rep.add_argument("study", metavar="STUDY_NAME|RUN_ID", help="study name or its parent run id")
    rep.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    rep.add_argument("--lambda-plot", metavar="PNG",
                     help="also draw the evaluated trials' NCM against lambda per K (the paper's Fig. 3)")
    rep.set_defaults(func=_cmd_report)
