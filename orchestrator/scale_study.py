"""satscale's main job: a Ray Tune study of Smooth Adversarial Training.

The study driver (search space, Tune + Train trials, MLflow reporting) is tracked in the study issue;
until it lands this entry point checks the installation and says so.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import ffcv  # noqa: F401  -- the install is real: every dependency the study needs imports
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    import torch

    import trainers

    print(f"satscale {trainers.__version__}: torch {torch.__version__}, ray {ray.__version__}, "
          f"mlflow {mlflow.__version__}")
    print("not yet implemented: see the study issue (Ray Tune over activation x scaling x PGD).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
