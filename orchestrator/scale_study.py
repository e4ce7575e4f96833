"""satscale's main job: a Ray Tune study of Smooth Adversarial Training, tracked in MLflow.

On a laptop it starts a local Ray; under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script (`python orchestrator/scale_study.py`), the repository root is not on sys.path when the
# project is not installed; the packages live beside this folder.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from trainers.errors import ConfigError  # noqa: E402

EXAMPLES = """\
examples:
  python orchestrator/scale_study.py                         # the embedded default study, local Ray
  python orchestrator/scale_study.py --dry-run               # print the search space and trial count
  python orchestrator/scale_study.py --config activation_table --set tune.num_samples=2
  python orchestrator/scale_study.py --config my_study.yaml --storage s3://bucket/studies \\
      --mlflow-uri http://mlflow.internal:5000
  python orchestrator/scale_study.py --resume                # continue an interrupted study
  ray job submit --working-dir . -- python orchestrator/scale_study.py --config compound_scaling

presets: default, activation_table, compound_scaling (search_spaces/presets/); any YAML file works too.
S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scale_study.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", metavar="FILE_OR_PRESET",
                        help="study YAML file or preset name (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key, e.g. --set train.epochs=3 (repeatable; VALUE is YAML)")
    parser.add_argument("--storage", default="satscale_runs", metavar="DIR_OR_S3",
                        help="where Tune/Train results and checkpoints go: a folder or s3://bucket/prefix "
                             "(default: ./satscale_runs)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of this name")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved space and trial count; run nothing")
    return parser.parse_args(argv)


def _storage_uri(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


def _connect_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # RAY_ADDRESS is set by `ray job submit`; otherwise a local Ray with this machine's cores.
    ray.init(address=os.environ.get("RAY_ADDRESS"), configure_logging=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from search_spaces.space import describe_space
        from search_spaces.study import load_study

        study = load_study(args.config, args.overrides)
        if args.dry_run:
            print(describe_space(study))
            return 0
        from orchestrator.runner import format_outcome, run_study
        from orchestrator.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.mlflow_uri)
        _connect_ray()
        outcome = run_study(study, _storage_uri(args.storage), tracking_uri, resume=args.resume)
    except ConfigError as error:
        print(f"scale_study: {error}", file=sys.stderr)
        return 2
    print(format_outcome(outcome, tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
