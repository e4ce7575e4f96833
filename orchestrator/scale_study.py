"""satscale's main job: a Ray Tune study of Smooth Adversarial Training, tracked in MLflow.

On a laptop it starts a local Ray; under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# Run as a script (`python orchestrator/scale_study.py`), the repository root is not on sys.path when the
# project is not installed; the packages live beside this folder.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from trainers.errors import ConfigError, StudyInterrupted, first_line  # noqa: E402

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


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set, --storage and --mlflow-uri: what names a study and where its results live, the same for
    every script that runs or reads one."""
    parser.add_argument("--config", default="default", metavar="FILE_OR_PRESET",
                        help="study YAML file or preset name (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key, e.g. --set train.epochs=3 (repeatable; VALUE is YAML)")
    parser.add_argument("--storage", default="satscale_runs", metavar="DIR_OR_S3",
                        help="where Tune/Train results and checkpoints go: a folder or s3://bucket/prefix "
                             "(default: ./satscale_runs)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scale_study.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of this name")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved space and trial count; run nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Tune's and the workers' own output on the console too (by default it goes "
                             "to log files in the study's folder, and the console shows the study's live view)")
    parser.add_argument("--shared-storage", action="store_true",
                        help="a local --storage folder is a shared filesystem mounted at the same path on every node "
                             "(needed on a multi-node or autoscaling cluster unless it is a recognised network "
                             "filesystem such as NFS)")
    parser.add_argument("--bind-all", action="store_true",
                        help="let the local Ray this script starts (without RAY_ADDRESS) listen on every network "
                             "interface, dashboard included, instead of 127.0.0.1 only; token authentication stays on")
    return parser.parse_args(argv)


def storage_uri(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


LOOPBACK = "127.0.0.1"


# Start-up settings of a single-machine Ray (the tests' Ray head uses them too):
LOCAL_RAY_STARTUP = {
    # Ray Train's PreemptionWatcher (one more process per trial, started on every trial's critical path) watches
    # for spot nodes being drained, which a local Ray does not have; on a cluster it stays on.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The two idle workers Ray would start for each driver are never used: trials run in actors with their own
    # runtime environments. Not starting them leaves both cores to the first trials.
    "RAY_prestart_worker_first_driver": "0",
}


def local_ray_settings(bind_all: bool) -> None:
    """Settings for the local Ray started when no RAY_ADDRESS names a cluster, made before `ray` is imported
    (Ray reads them then): token authentication, and unless `bind_all`, 127.0.0.1 as the node's address, which
    makes every Ray server (GCS, raylet, workers, agents, dashboard) listen on loopback only, as Ray does on
    macOS and Windows (on Linux it takes the routable address and listens on all interfaces)."""
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`
        if bind_all:
            raise ConfigError("--bind-all applies to the local Ray this script starts; RAY_ADDRESS names a running "
                              "cluster, whose own settings decide where it listens: drop --bind-all or RAY_ADDRESS")
        return
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode}: the local Ray this script starts always uses token "
                          "authentication; unset RAY_AUTH_MODE (or set it to token)")
    if not bind_all:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for name, value in LOCAL_RAY_STARTUP.items():
        os.environ.setdefault(name, value)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


_RAY_ADDRESS_FIX = "start the cluster (ray start --head), fix RAY_ADDRESS, or unset it to run on a local Ray"
_RAY_CONNECT_TIMEOUT_S = 5


def check_ray_address(address: str) -> None:
    """A `host:port` RAY_ADDRESS must accept connections: Ray itself retries a dead address for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=_RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({error.strerror or error}); "
                          f"{_RAY_ADDRESS_FIX}") from None


def connect_ray(bind_all: bool, log_to_driver: bool = True) -> None:
    """Join the cluster RAY_ADDRESS names, else start a local Ray (after `local_ray_settings`). Without
    `log_to_driver` the workers' output stays in Ray's log files (the console shows the study's own view). Among
    it on a cluster: Ray's error-level line `core_worker.cc: Actor with class name: 'PreemptionWatcher' ... has
    constructor arguments in the object store and max_restarts > 0`, once per trial on a healthy run. Ray Train's
    controller creates its preemption watcher that way; the line is harmless (a local Ray runs no watcher)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
        except ConnectionError as error:
            raise ConfigError(f"RAY_ADDRESS={address}: {first_line(error)}; {_RAY_ADDRESS_FIX}") from None
        return
    dashboard_port = _free_port()
    # Ray's State API, which Ray Train's PlacementGroupCleaner calls from inside the cluster, looks for "the" local
    # Ray when no address is set and fails where several run on one machine ("Found multiple active Ray
    # instances"): finished trials' placement groups then stay and the study waits forever. Name ours; every
    # process this Ray starts inherits the variable.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{dashboard_port}"
    ray.init(configure_logging=False, dashboard_host="0.0.0.0" if bind_all else LOOPBACK,
             dashboard_port=dashboard_port, log_to_driver=log_to_driver)
    node_address = ray.util.get_node_ip_address()
    if not bind_all and node_address != LOOPBACK:  # `ray` was imported before local_ray_settings ran
        ray.shutdown()
        raise RuntimeError(f"the local Ray took address {node_address}, not {LOOPBACK}: import ray only after "
                           "scale_study.main has started")


# The exit status of a process stopped by SIGINT, as shells report it: a study interrupted, resumable.
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside, SIGTERM (`ray job stop`, a batch scheduler, `kill`) stops the study as Ctrl-C does: Tune saves its
    state and the MLflow runs say interrupted, where the process would die with its runs left RUNNING."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _signal, _frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except (KeyboardInterrupt, StudyInterrupted) as interrupted:
        print(f"scale_study: {interrupted or 'interrupted before the study started; nothing to resume'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # not a setting at fault: one line here, the traceback in a log file
        print(f"scale_study: failed: {type(error).__name__}: {first_line(error)} (traceback in "
              f"{log_traceback(error)})", file=sys.stderr)
        return 1


def log_traceback(error: BaseException) -> str:
    """Writes `error`'s traceback to the study's driver log when its logs go to files (`orchestrator.console`),
    else to a new file in the temporary folder; returns the file's path."""
    from orchestrator.console import driver_log

    logged_to = driver_log()
    if logged_to:
        logging.getLogger("satscale").error("the study stopped on an error", exc_info=error)
        return logged_to
    descriptor, path = tempfile.mkstemp(prefix="scale_study-error-", suffix=".log")
    with os.fdopen(descriptor, "w") as log:
        log.write("".join(traceback.format_exception(error)))
    return path


def _main(args: argparse.Namespace) -> int:
    try:
        if not args.dry_run:
            local_ray_settings(args.bind_all)
        from search_spaces.space import describe_space
        from search_spaces.study import load_study

        study = load_study(args.config, args.overrides)
        if args.dry_run:
            print(describe_space(study))
            return 0
        from orchestrator.console import ConsoleSettings, final_screen, robust_name
        from orchestrator.reports import leaderboard_markdown
        from orchestrator.runner import TrackingUnavailableError, run_study
        from orchestrator.tracking import check_tracking_server, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.mlflow_uri)
        check_tracking_server(tracking_uri, "--mlflow-uri" if args.mlflow_uri else "MLFLOW_TRACKING_URI")
        connect_ray(args.bind_all, log_to_driver=args.verbose)
        try:
            with sigterm_as_ctrl_c():
                outcome = run_study(study, storage_uri(args.storage), tracking_uri, resume=args.resume,
                                    console=ConsoleSettings(verbose=args.verbose), shared_storage=args.shared_storage)
        except TrackingUnavailableError as error:
            print(leaderboard_markdown(error.rows))
            print(f"scale_study: {error}", file=sys.stderr)
            return 1
    except ConfigError as error:
        print(f"scale_study: {error}", file=sys.stderr)
        return 2
    print(final_screen(study.name, outcome.rows, robust_name(study), outcome.parent_run_id, tracking_uri,
                       outcome.mlflow_url, outcome.experiment_path, outcome.best_model_uri, outcome.logs_dir,
                       study_arguments(args)))
    if outcome.budget_note:  # the study did what its budget allows: not an error
        print(f"scale_study: {outcome.budget_note}")
    return 0


def study_arguments(args: argparse.Namespace) -> str:
    """The arguments that name this study and its results, for the commands the last screen suggests."""
    words = [] if args.config == "default" else ["--config", args.config]
    for override in args.overrides:
        words += ["--set", override]
    if args.storage != "satscale_runs":
        words += ["--storage", args.storage]
    if args.mlflow_uri:
        words += ["--mlflow-uri", args.mlflow_uri]
    return " ".join(shlex.quote(word) for word in words)


if __name__ == "__main__":
    sys.exit(main())
