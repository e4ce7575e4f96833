"""The malformed-input corpus (tests/data/malformed/cases.yaml) through the real CLI, `scale_study.main`: every
case exits 2 with a message naming the setting at fault and the fix, prints no traceback, and writes nothing
(no MLflow store, no storage, no converted data or cache, no S3 object). A few cases also run as a real
subprocess, for the exit code and stderr a user sees."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator import scale_study

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "orchestrator" / "scale_study.py"
CORPUS = Path(__file__).resolve().parent / "data" / "malformed"
MIN_CASES = 30


@dataclass(frozen=True)
class Case:
    id: str
    expect: list[str]
    study: str = "valid.yaml"
    args: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=lambda: ["in_process"])
    exit: int = 2


CASES = [Case(**entry) for entry in yaml.safe_load((CORPUS / "cases.yaml").read_text())]


@dataclass(frozen=True)
class Workspace:
    root: Path
    work: Path       # the working directory; --storage and the MLflow store point inside it
    fixtures: Path   # built inputs and the case's study file
    betons: dict[str, Path]
    bucket: str | None

    def fill(self, text: str) -> str:
        values = {"@TRAIN@": self.betons["train"], "@EVAL@": self.betons["test"], "@FIXTURES@": self.fixtures,
                  "@WORK@": self.work, "@BUCKET@": self.bucket or "no-bucket-for-this-case"}
        for placeholder, value in values.items():
            text = text.replace(placeholder, str(value))
        return text


# --- fixture builders: inputs that cannot be stored as static files ------------------------------------------------
def _copy_beton(workspace: Workspace, name: str, with_manifest: bool = True) -> Path:
    source = workspace.betons["test"]
    target = workspace.fixtures / name
    shutil.copyfile(source, target)
    if with_manifest:
        shutil.copyfile(f"{source}.manifest.json", f"{target}.manifest.json")
    return target


def _truncated_beton(workspace: Workspace) -> None:
    path = _copy_beton(workspace, "truncated.beton")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupted_beton(workspace: Workspace) -> None:
    path = _copy_beton(workspace, "corrupted.beton")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    path.write_bytes(bytes(data))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_folder(folder: Path, labels: np.ndarray) -> Path:
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    for split in ("train", "t10k"):
        _write_idx(folder / f"{split}-images-idx3-ubyte", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


LABELS_WITH_A_12 = np.array([0, 1, 2, 12, 4, 5, 6, 7, 8, 9, 0, 1])


def _labels_out_of_range_beton(workspace: Workspace) -> None:
    """A .beton whose manifest says 10 classes while one label is 12 (a manifest edited by hand, or a file
    written by another tool): consistent size and sha256, wrong labels."""
    from trainers.data.convert import WriteOptions, convert
    from trainers.data.manifest import write_manifest

    scratch = workspace.root / "scratch"
    scratch.mkdir()
    folder = _idx_folder(scratch / "idx", LABELS_WITH_A_12)
    path = workspace.fixtures / "labels-12.beton"
    manifest = convert("idx", path, input_dir=folder, split="train", options=WriteOptions(num_workers=1))
    write_manifest(path, manifest.model_copy(update={"num_classes": 10, "class_names": manifest.class_names[:10]}))
    shutil.rmtree(scratch)


def _truncated_s3_object(workspace: Workspace) -> None:
    import boto3

    source = workspace.betons["test"]
    client = boto3.session.Session().client("s3")
    client.put_object(Bucket=workspace.bucket, Key="digits/truncated.beton", Body=source.read_bytes()[:1000])
    client.put_object(Bucket=workspace.bucket, Key="digits/truncated.beton.manifest.json",
                      Body=Path(f"{source}.manifest.json").read_bytes())


def _run_of_a_changed_study(workspace: Workspace) -> None:
    """A resumable run (Tune's tuner.pkl, a stand-in: the check reads only the study kept beside it) of valid.yaml
    as it was before its epochs and scheduler were edited."""
    from orchestrator.preflight import STUDY_FILE
    from search_spaces.study import StudyConfig

    study = yaml.safe_load(workspace.fill((CORPUS / "studies" / "valid.yaml").read_text()))
    before = StudyConfig.parse(study).model_dump(mode="json")
    before["base"]["train"]["epochs"] = 5
    before["tune"]["scheduler"] = "asha"
    run = workspace.work / "storage" / study["name"]
    run.mkdir(parents=True)
    (run / "tuner.pkl").write_bytes(b"")
    (run / STUDY_FILE).write_text(json.dumps(before))


BUILDERS: dict[str, Callable[[Workspace], None]] = {
    "run_of_a_changed_study": _run_of_a_changed_study,
    "storage_file": lambda workspace: (workspace.fixtures / "storage-file").write_text("not a folder\n"),
    "truncated_beton": _truncated_beton,
    "corrupted_beton": _corrupted_beton,
    "beton_without_manifest": lambda workspace: _copy_beton(workspace, "no-manifest.beton", with_manifest=False),
    "labels_out_of_range_beton": _labels_out_of_range_beton,
    "idx_label_12": lambda workspace: _idx_folder(workspace.fixtures / "idx-label-12", LABELS_WITH_A_12),
    "empty_folders": lambda workspace: [(workspace.fixtures / name).mkdir() for name in ("empty-train", "empty-eval")],
    "truncated_s3_object": _truncated_s3_object,
}


# --- what was written ----------------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*"))}


def _s3_objects() -> dict[str, list[str]]:
    import boto3

    client = boto3.session.Session().client("s3")
    return {bucket["Name"]: sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket["Name"]).get(
        "Contents", [])) for bucket in client.list_buckets()["Buckets"]}


def _argv(case: Case, workspace: Workspace) -> list[str]:
    study = workspace.fixtures / case.study
    # Latin-1 maps bytes to characters one to one: a file that is not UTF-8 is copied as it is.
    study.write_text(workspace.fill((CORPUS / "studies" / case.study).read_text("latin-1")), "latin-1")
    return ["--config", str(study), "--storage", str(workspace.work / "storage"),
            "--mlflow-uri", f"sqlite:///{workspace.work / 'mlflow.db'}", *map(workspace.fill, case.args)]


def _must_not_start_ray(bind_all: bool, log_to_driver: bool = True) -> None:
    raise AssertionError("the case passed every check made before Ray starts: it is not rejected where it should be")


def _run_in_process(case: Case, argv: list[str], workspace: Workspace, request, monkeypatch, capsys):
    monkeypatch.chdir(workspace.work)
    # main() sets Ray's settings for a local start in this environment: restored after the test.
    for name in ("MLFLOW_TRACKING_URI", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("SATSCALE_CACHE_DIR", str(workspace.work / "cache"))
    if "ray" in case.needs:
        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_cluster").address)
    else:
        monkeypatch.setattr(scale_study, "connect_ray", _must_not_start_ray)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    try:
        code = scale_study.main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_subprocess(case: Case, argv: list[str], workspace: Workspace, request):
    environment = {**os.environ, "SATSCALE_CACHE_DIR": str(workspace.work / "cache")}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        environment.pop(name, None)
    if "ray" in case.needs:
        environment["RAY_ADDRESS"] = request.getfixturevalue("ray_cluster").address
    environment.update(case.env)
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=workspace.work, env=environment,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


RUNS = [pytest.param(case, via, id=f"{case.id}-{via}") for case in CASES for via in case.via]


@pytest.mark.parametrize(("case", "via"), RUNS)
def test_malformed_input_is_rejected_clearly_and_writes_nothing(case: Case, via: str, digits_betons, tmp_path,
                                                                request, monkeypatch, capsys):
    bucket = request.getfixturevalue("s3_bucket") if "s3" in case.needs else None
    workspace = Workspace(tmp_path, tmp_path / "work", tmp_path / "fixtures", digits_betons, bucket)
    workspace.work.mkdir()
    workspace.fixtures.mkdir()
    for builder in case.build:
        BUILDERS[builder](workspace)
    argv = _argv(case, workspace)
    files_before = _files(tmp_path)
    objects_before = _s3_objects() if bucket else None

    run = _run_in_process if via == "in_process" else _run_subprocess
    extra = (monkeypatch, capsys) if via == "in_process" else ()
    code, out, err = run(case, argv, workspace, request, *extra)

    assert code == case.exit, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    for fragment in case.absent:
        assert fragment not in out + err
    assert _files(tmp_path) == files_before  # no MLflow store, storage, converted data or cache
    if bucket:
        assert _s3_objects() == objects_before


def test_the_corpus_is_complete_and_every_file_in_it_is_used():
    assert len(CASES) >= MIN_CASES
    assert len({case.id for case in CASES}) == len(CASES)
    studies = {path.name for path in (CORPUS / "studies").glob("*.yaml")}
    assert studies == {case.study for case in CASES}
    assert {builder for case in CASES for builder in case.build} == set(BUILDERS)
    for case in CASES:
        assert case.expect and set(case.needs) <= {"ray", "s3"} and set(case.via) <= {"in_process", "subprocess"}
    kinds = {"subprocess": sum("subprocess" in case.via for case in CASES),
             "cluster": sum("ray" in case.needs for case in CASES), "s3": sum("s3" in case.needs for case in CASES)}
    assert all(count >= 3 for count in kinds.values()), kinds
