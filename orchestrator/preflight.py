"""What a study checks before it starts: everything a bad input could break, checked while nothing is written yet.

`check_study_inputs` runs before the MLflow parent run is created and before anything goes to storage or into
the data cache: the storage location, `--resume` against what storage holds, the data (its files, or the
sources a `dataset` block converts), and whether the cluster can ever place a trial's worker group. Every
problem is a ConfigError naming the setting at fault and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs
import ray
from ray import tune

from search_spaces.study import Conversion, StudyConfig
from trainers.data.errors import DataError
from trainers.data.loaders import check_dataset
from trainers.data.manifest import read_manifest, verify_file
from trainers.data.sources import read_source
from trainers.errors import ConfigError, first_line, mask_url_credentials
from trainers.trial import TrialConfig, WorkersConfig

# Storage Ray Tune/Train can write to (through pyarrow) besides a local folder.
REMOTE_STORAGE_SCHEMES = ("s3", "gs")
_STORAGE_HINT = "accepted: a local folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"


# A study run again without --resume starts a new Tune experiment beside the earlier ones, which are kept:
# NAME, then NAME-run2, NAME-run3, ...
_RUN_SUFFIX = "-run"


def _run_path(storage_path: str, study: StudyConfig, number: int) -> str:
    name = study.name if number == 1 else f"{study.name}{_RUN_SUFFIX}{number}"
    return f"{storage_path.rstrip('/')}/{name}"


def study_runs(storage_path: str, study: StudyConfig) -> list[str]:
    """The Tune experiments of the study's runs in `storage_path`, oldest first."""
    runs = []
    while tune.Tuner.can_restore(path := _run_path(storage_path, study, len(runs) + 1)):
        runs.append(path)
    return runs


def experiment_path(storage_path: str, study: StudyConfig) -> str:
    """The study's latest run (its first one's path when it never ran): what `--resume` continues and
    `evaluate_study.py` reads."""
    runs = study_runs(storage_path, study)
    return runs[-1] if runs else _run_path(storage_path, study, 1)


def check_study_inputs(study: StudyConfig, storage_path: str, resume: bool, shared_storage: bool = False) -> str:
    """Everything below, in order; the cluster checks need a connected Ray. Returns where this run of the study
    keeps its Tune experiment (`run_path`). `shared_storage`: the user says a local storage folder is the same
    on every node (--shared-storage)."""
    check_storage(storage_path)
    results_path = run_path(study, storage_path, resume)
    if resume:
        check_unchanged(study, results_path)
    check_data(study)
    capacity = cluster_capacity()
    check_cluster_capacity(TrialConfig.parse(study.base_values()).workers, capacity)
    check_storage_reaches_every_node(storage_path, capacity, shared_storage)
    return results_path


# ------------------------------------------------------------------------------------------------ storage

def _nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists (storage folders are made by Tune, not here)."""
    return next(path for path in (folder, *folder.parents) if path.exists())


def check_storage(storage_path: str) -> None:
    """A local folder (its nearest existing parent must be a writable folder; nothing is created here), or a
    bucket that exists, reached with the standard cloud credentials, never ones written into the URI."""
    label = f"storage {mask_url_credentials(storage_path)!r} (--storage)"
    if "://" not in storage_path:
        existing = _nearest_existing(Path(storage_path))
        if not existing.is_dir():
            raise ConfigError(f"{label}: {existing} is a file, not a folder; choose another --storage")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{label}: {existing} is not writable; choose a folder you can write to")
        return
    parts = urlsplit(storage_path)
    if mask_url_credentials(storage_path) != storage_path:
        raise ConfigError(f"{label}: the URI carries credentials; remove them (cloud credentials come from the "
                          "environment: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance roles)")
    if parts.scheme == "file":
        return check_storage(parts.path)
    if parts.scheme not in REMOTE_STORAGE_SCHEMES:
        raise ConfigError(f"{label}: scheme {parts.scheme!r} is not supported; {_STORAGE_HINT}")
    if not parts.netloc:
        raise ConfigError(f"{label}: no bucket; {_STORAGE_HINT}")
    try:
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        bucket = filesystem.get_file_info(parts.netloc)
    except (pyarrow.ArrowException, OSError) as error:
        raise ConfigError(f"{label}: cannot be reached: {first_line(error)}; check the bucket name, endpoint "
                          "(AWS_ENDPOINT_URL) and credentials") from None
    if bucket.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"{label}: bucket {parts.netloc!r} does not exist at the configured endpoint; create it "
                          "or fix the bucket name")


def run_path(study: StudyConfig, storage_path: str, resume: bool) -> str:
    """Where this run of the study keeps its Tune experiment: with `resume` the latest run's (it must exist),
    else a new one beside the earlier runs, which are never overwritten."""
    runs = study_runs(storage_path, study)
    if resume:
        if not runs:
            raise ConfigError(f"--resume: nothing to resume in {_run_path(storage_path, study, 1)}; run without "
                              "--resume to start the study")
        return runs[-1]
    return _run_path(storage_path, study, len(runs) + 1)


# The study as its run started, kept beside Tune's state: `--resume` must continue that study, not another.
STUDY_FILE = "satscale-study.json"
# Settings that change no trial and no search: free to change between a run and its resume (a larger budget is
# how a study stopped by its budget goes on; prices and what is logged at the end change no result).
_FREE_TO_CHANGE = frozenset({"description", "budget", "cost", "tracking"})


def _filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def save_study(study: StudyConfig, results_path: str) -> None:
    """Keep the study's settings with its run (a new run; a resumed one keeps the first's)."""
    filesystem, path = _filesystem(results_path)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{STUDY_FILE}") as stream:
        stream.write(json.dumps(study.model_dump(mode="json"), indent=1, sort_keys=True).encode())


def _changes(saved: Any, current: Any, path: str = "") -> list[str]:
    """The dotted paths at which two JSON values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted({*saved, *current})
                for change in _changes(saved.get(key), current.get(key), f"{path}.{key}" if path else key)]
    return [] if saved == current else [path]


def check_unchanged(study: StudyConfig, results_path: str) -> None:
    """`--resume` continues the run Tune saved, with its search space, searcher, scheduler and metric; trials
    would get the new base values beside them. A study file changed since is refused, naming what changed."""
    filesystem, path = _filesystem(results_path)
    try:
        with filesystem.open_input_stream(f"{path}/{STUDY_FILE}") as stream:
            saved = json.loads(stream.read())
    except FileNotFoundError:
        return  # a run started before satscale kept its study: nothing to compare with
    changed = [change for change in _changes(saved, study.model_dump(mode="json"))
               if change.split(".")[0] not in _FREE_TO_CHANGE]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(f"--resume: the study's settings changed since {results_path} started ({shown}); a "
                          "resumed run goes on with the search, scheduler and trials it started with. Undo the "
                          "changes to resume, or run without --resume to start a new run with them")


# ------------------------------------------------------------------------------------------------ data

def pending_conversions(study: StudyConfig) -> list[Conversion]:
    """The dataset block's conversions whose .beton is missing or does not match its manifest."""
    pending = []
    for conversion in study.dataset.conversions() if study.dataset else ():
        path = Path(conversion.path)
        try:
            verify_file(path, read_manifest(path), check_sha256=False)
        except (DataError, OSError):  # missing, partial or stale: convert (again)
            pending.append(conversion)
    return pending


def _classes_match_model(study: StudyConfig, classes: Mapping[str, int]) -> None:
    """`classes`: where the data comes from -> how many classes it has."""
    num_classes = TrialConfig.parse(study.base_values()).model.num_classes
    for origin, count in classes.items():
        if count != num_classes:
            raise ConfigError(f"base.model.num_classes is {num_classes} but {origin} has {count} classes; set "
                              f"model.num_classes: {count}")


def check_data(study: StudyConfig) -> None:
    """A dataset block: every source still to convert is read and checked (no file is written until every one
    is good). Otherwise `base.data`'s files: their manifests, sizes, checksums and labels (S3: manifest and
    size). Either way the classes must agree with each other and with the model."""
    if study.dataset:
        pending = pending_conversions(study)
        fields = ("input_dir", "eval_input_dir" if study.dataset.eval_input_dir else "input_dir")
        classes = {}
        for conversion, field in zip(study.dataset.conversions(), fields):
            origin = f"dataset {conversion.source}:{conversion.split}"
            if conversion not in pending:
                classes[origin] = read_manifest(Path(conversion.path)).num_classes
                continue
            try:
                source = read_source(conversion.source, Path(conversion.input_dir) if conversion.input_dir else None,
                                     conversion.split)
            except DataError as error:
                raise ConfigError(f"dataset.{field}: {error}") from None
            classes[origin] = len(source.class_names)
        _classes_match_model(study, classes)
        return
    data = TrialConfig.parse(study.base_values()).data
    manifests = {}
    for field in ("train_path", "eval_path"):
        path = getattr(data, field)
        try:
            manifests[path] = check_dataset(path)
        except DataError as error:
            raise ConfigError(f"base.data.{field}: {error}") from None
    train, evaluation = manifests[data.train_path], manifests[data.eval_path]
    if train.class_names != evaluation.class_names:
        raise ConfigError(f"base.data: {data.train_path} and {data.eval_path} name different classes "
                          f"({train.num_classes} vs {evaluation.num_classes}); convert both splits from the same source")
    _classes_match_model(study, {path: manifest.num_classes for path, manifest in manifests.items()})


# ------------------------------------------------------------------------------------------------ cluster

# Filesystems that show every node the same files when mounted at the same path (/proc/mounts' type names).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                                 "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3",
                                 "fuse.juicefs", "fuse.sshfs", "9p", "virtiofs"})


@dataclasses.dataclass(frozen=True)
class ClusterCapacity:
    """The cluster at its largest: with an autoscaler, what its node types reach at their max counts (a cluster
    that starts with no GPU node may still get some); without, the nodes there now."""
    totals: dict[str, float]  # resources in all
    node_shapes: list[dict[str, float]]  # one resource dict per node (and per autoscaled node type)
    autoscaling: bool
    alive_nodes: int  # nodes up now


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's `ClusterCapacity`."""
    alive = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    nodes = list(alive)
    totals = dict(ray.cluster_resources())
    # Ray Train reads the autoscaler's limits the same way before placing a worker group.
    config = ray._private.state.state.get_cluster_config()
    autoscaling = bool(config and config.node_group_configs)
    if autoscaling:
        nodes += [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
        totals = {name: max(totals.get(name, 0), limits.get(name, 0)) for name in {*totals, *limits}}
    return ClusterCapacity(totals, nodes, autoscaling, len(alive))


def _format(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items())) or "nothing"


def check_cluster_capacity(workers: WorkersConfig, capacity: ClusterCapacity) -> None:
    """A trial's worker group must fit the cluster at its largest: each worker on one node, all of them in
    total. Otherwise the trial would wait for resources forever."""
    totals, nodes, autoscaling = capacity.totals, capacity.node_shapes, capacity.autoscaling
    where = ("(at its largest: the autoscaler's node types at their max counts)" if autoscaling
             else "(no autoscaler: the nodes there now)")
    per_worker = workers.resources_per_worker()
    if workers.use_gpu and not totals.get("GPU"):
        raise ConfigError(f"workers.use_gpu is true but the cluster has no GPU {where}; set workers.use_gpu: false "
                          "or run on a cluster with GPU nodes")
    fitting = [node for node in nodes if all(node.get(name, 0) >= need for name, need in per_worker.items())]
    if not fitting:
        largest = {name: max(node.get(name, 0) for node in nodes) for name in per_worker}
        raise ConfigError(f"workers: each worker needs {_format(per_worker)} on one node, but the largest node "
                          f"offers {_format(largest)} {where}; lower workers.cpus_per_worker"
                          + (" or workers.gpus_per_worker" if workers.use_gpu else ""))
    needed = {name: need * workers.num_workers for name, need in per_worker.items()}
    short = {name: need for name, need in needed.items() if need > totals.get(name, 0)}
    if short:
        available = {name: totals.get(name, 0) for name in short}
        raise ConfigError(f"workers.num_workers: {workers.num_workers} workers x {_format(per_worker)} need "
                          f"{_format(short)}, but the cluster has {_format(available)} {where}; lower "
                          "workers.num_workers (keeping global_batch_size divisible by it) or "
                          "workers.cpus_per_worker, or use a larger cluster")


def _filesystem_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The type of the filesystem holding `path` (its longest mount point), or None where mounts are unknown."""
    try:
        entries = [fields[1:3] for fields in map(str.split, mounts.read_text().splitlines()) if len(fields) >= 3]
    except OSError:
        return None
    resolved = str(path.resolve())
    holding = [(point, kind) for point, kind in entries
               if resolved == point or resolved.startswith(point.rstrip("/") + "/")]
    return max(holding, key=lambda entry: len(entry[0]))[1] if holding else None


def check_storage_reaches_every_node(storage_path: str, capacity: ClusterCapacity, shared_storage: bool,
                                     mounts: Path = Path("/proc/mounts")) -> None:
    """Trials write checkpoints from whichever node runs them, and a resumed trial reads them on another: on a
    cluster that has (or an autoscaler may add) nodes beside this one, a local folder must be a shared filesystem.
    A network filesystem is recognised; `shared_storage` vouches for one that is not (the same disk on every
    node, as with fake nodes on one machine)."""
    if shared_storage or not (capacity.autoscaling or capacity.alive_nodes > 1):
        return
    if "://" in storage_path and urlsplit(storage_path).scheme != "file":
        return
    folder = Path(urlsplit(storage_path).path if "://" in storage_path else storage_path)
    kind = _filesystem_type(_nearest_existing(folder), mounts)
    if kind in NETWORK_FILESYSTEMS:
        return
    reach = "an autoscaler adds nodes to" if capacity.autoscaling else f"{capacity.alive_nodes} nodes run"
    raise ConfigError(f"storage {storage_path!r} (--storage) is a folder on this node ({kind or 'unknown'} "
                      f"filesystem), but {reach} this Ray cluster: trials on other nodes could not write or resume "
                      "their checkpoints there; use --storage s3://BUCKET/PREFIX, or add --shared-storage if that "
                      "folder is a shared filesystem mounted at the same path on every node")
