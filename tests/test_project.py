"""The project's promises: the README's Python example runs, the entry point runs on a real install."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    history = namespace["history"]
    assert len(history) == 2 and history[-1]["clean_acc"] > 0.5
    adversarial, batch = namespace["adversarial"], namespace["batch"]
    assert (adversarial - batch).abs().max() <= 8 / 255 + 1e-6


def test_readme_first_two_commands_are_demo_and_test():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make (\w+)", re.search(r"```bash\n(.*?)```", readme, re.S).group(1), re.M)
    assert commands[:2] == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_entry_point_runs_as_a_script():
    result = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "scale_study.py"), "--help"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "ray job submit" in result.stdout


def test_trial_actors_do_not_import_ffcv():
    """Every Tune trial actor imports `orchestrator.trial_driver` (and through it `trainers.distributed`) to run
    its trial; only Train workers read data, so FFCV and its numba compile stay out of the actor's start-up."""
    probe = ("import sys, orchestrator.trial_driver, trainers.distributed; "
             "print(sorted(name for name in ('ffcv', 'numba', 'mlflow') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
