"""Activation registry: one table of names to layers, one factory used by every model.

SAT's point is that only the activation changes, so models never name a layer class: they call
`build_activation(name, **params)` (or a factory from `activation_factory`) for each place that needs one.

The paper's ablation (Section 3) keeps ReLU in the forward pass and uses a smooth activation's derivative in
the backward pass, either while the attacker computes input gradients, while the network update computes
weight gradients, or both. `ReLUSmoothBackward` does that; the phase is chosen by the training loop with
`activation_phase("attack")` / `activation_phase("update")`. Evaluation attacks run with no phase
(`activation_phase(None)`): they attack the model as it computes, with its true gradient, whatever the arm.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers.errors import ConfigError

Phase = Literal["attack", "update"]
_PHASES: tuple[Phase, ...] = ("attack", "update")
# Outside any `activation_phase` block (plain inference, user code) the forward is a plain ReLU.
_current_phase: contextvars.ContextVar[Phase | None] = contextvars.ContextVar("satscale_phase", default=None)


@contextlib.contextmanager
def activation_phase(phase: Phase | None) -> Iterator[None]:
    """Mark the code inside as the attack or the update phase (read by `ReLUSmoothBackward.forward`); None
    marks it as neither, so every layer computes its true forward and backward."""
    if phase is not None and phase not in _PHASES:
        raise ConfigError(f"activation phase must be one of {list(_PHASES)} or None, got {phase!r}")
    token = _current_phase.set(phase)
    try:
        yield
    finally:
        _current_phase.reset(token)


class _LearnableBeta(nn.Module):
    """An activation with one learnable sharpness parameter beta > 0 (one per layer)."""

    def __init__(self, beta: float = 10.0, learnable: bool = True) -> None:
        super().__init__()
        _require_positive("beta", beta)
        self.beta = nn.Parameter(torch.tensor(float(beta)), requires_grad=learnable)

    def positive_beta(self) -> torch.Tensor:
        # Keeps a learnable beta usable if an update pushes it through zero.
        return self.beta.abs().clamp_min(1e-3)

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}"


class SmoothReLU(_LearnableBeta):
    """SAT's SmoothReLU: relu(x - log(beta*|x| + 1) / beta), a learnable beta > 0.

    Equal to x - log(beta*x + 1)/beta for x >= 0 and 0 below; its derivative beta*x/(beta*x + 1) is 0 at 0+,
    so, unlike ReLU's, it is continuous.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.positive_beta()
        return F.relu(x - torch.log1p(beta * x.abs()) / beta)


class ParametricSoftplus(_LearnableBeta):
    """Softplus with a learnable sharpness: log(1 + exp(beta*x)) / beta (the paper's ablation choice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.positive_beta()
        return F.softplus(x * beta) / beta


class _ReLUWithSurrogateGradient(torch.autograd.Function):
    """Forward: ReLU. Backward: the derivative of `smooth` at the same input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, smooth: nn.Module) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.smooth = smooth
        return F.relu(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            (grad_input,) = torch.autograd.grad(ctx.smooth(x_leaf), x_leaf, grad_output)
        return grad_input, None


class ReLUSmoothBackward(nn.Module):
    """ReLU forward; a smooth activation's derivative backward during the phases in `smooth_backward_in`.

    `smooth_backward_in`: "attack" (only the attacker's input gradients are smoothed), "update" (only the
    network update's gradients), or "both". Outside those phases this is an exact ReLU, forward and backward.
    """

    def __init__(
        self,
        smooth: str = "softplus",
        smooth_params: dict | None = None,
        smooth_backward_in: Literal["attack", "update", "both"] = "both",
    ) -> None:
        super().__init__()
        if smooth_backward_in not in ("attack", "update", "both"):
            raise ConfigError(
                "smooth_backward_in must be 'attack', 'update' or 'both', got " f"{smooth_backward_in!r}"
            )
        if smooth not in SMOOTH_ACTIVATIONS:
            raise ConfigError(f"smooth must be one of {sorted(SMOOTH_ACTIVATIONS)}, got {smooth!r}")
        params = {"beta": 10.0} if smooth_params is None and smooth == "softplus" else dict(smooth_params or {})
        self.smooth = build_activation(smooth, **params)
        # The surrogate's shape is fixed: its parameters are not trained through this layer.
        self.smooth.requires_grad_(False)
        self.smooth_backward_in = smooth_backward_in
        self.phases: tuple[Phase, ...] = _PHASES if smooth_backward_in == "both" else (smooth_backward_in,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _current_phase.get() in self.phases:
            return _ReLUWithSurrogateGradient.apply(x, self.smooth)
        return F.relu(x)

    def extra_repr(self) -> str:
        return f"smooth_backward_in={self.smooth_backward_in!r}"


def _require_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"activation parameter {name} must be a positive number, got {value!r}")


# The registry. Adding an activation is one line here; every model picks it up.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "smooth_relu": SmoothReLU,
    "parametric_softplus": ParametricSoftplus,
    "relu_smooth_backward": ReLUSmoothBackward,
}
# Activations whose derivative is continuous everywhere (the ones SAT calls smooth).
SMOOTH_ACTIVATIONS = frozenset({"silu", "gelu", "elu", "softplus", "smooth_relu", "parametric_softplus"})
# Constructor arguments that are implementation details, not activation parameters.
_HIDDEN_PARAMS = frozenset({"inplace", "threshold", "approximate"})


def activation_params(name: str) -> dict[str, object]:
    """The parameters `name` accepts, with their defaults (used for validation and search spaces)."""
    layer = _lookup(name)
    signature = inspect.signature(layer)
    return {
        param: spec.default
        for param, spec in signature.parameters.items()
        if param not in _HIDDEN_PARAMS and spec.kind is spec.POSITIONAL_OR_KEYWORD
    }


def build_activation(name: str, **params: object) -> nn.Module:
    """A new activation layer `name` with `params` (e.g. `build_activation("softplus", beta=5.0)`)."""
    accepted = activation_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"activation {name!r} takes no parameter(s) {unknown}; "
            f"accepted: {sorted(accepted) or 'none'}"
        )
    if name in ("softplus", "elu"):
        for param in ("beta", "alpha"):
            if param in params:
                _require_positive(param, params[param])  # torch accepts <= 0 silently
    return _lookup(name)(**params)


def activation_factory(name: str, **params: object) -> Callable[[], nn.Module]:
    """A zero-argument factory that builds a fresh layer per call (learnable betas are per layer)."""
    build_activation(name, **params)  # validate once, at model-build time
    return lambda: build_activation(name, **params)


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown activation {name!r}; valid names: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
