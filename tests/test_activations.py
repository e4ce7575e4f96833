"""The activation registry and the forward-ReLU / smooth-backward ablation."""
import pytest
import torch
import torch.nn.functional as F

from trainers.activations import (ACTIVATIONS, SMOOTH_ACTIVATIONS, ReLUSmoothBackward, activation_params,
                                  activation_phase, build_activation)
from trainers.errors import ConfigError

GRID = torch.linspace(-3, 3, 6001, dtype=torch.float64)  # step 1e-3, includes 0


def derivative(layer, x):
    x = x.clone().requires_grad_(True)
    layer.double()(x).sum().backward()
    return x.grad


def largest_jump(grad):
    return (grad[1:] - grad[:-1]).abs().max().item()


@pytest.mark.parametrize("name", sorted(SMOOTH_ACTIVATIONS))
def test_smooth_activation_derivative_is_continuous(name):
    grad = derivative(build_activation(name), GRID)
    # Neighbouring grid points 1e-3 apart: a continuous derivative barely moves (beta=10 -> <= 1e-2).
    assert largest_jump(grad) < 0.02, name
    zero = GRID.numel() // 2
    assert abs(grad[zero + 1] - grad[zero - 1]) < 0.02


def test_relu_derivative_jumps_at_zero():
    grad = derivative(build_activation("relu"), GRID)
    assert largest_jump(grad) == pytest.approx(1.0)


def test_smooth_relu_matches_the_paper_formula():
    beta = 5.0
    x = torch.linspace(-2, 2, 101)
    expected = torch.where(x >= 0, x - torch.log(beta * x + 1) / beta, torch.zeros_like(x))
    torch.testing.assert_close(build_activation("smooth_relu", beta=beta)(x), expected)


@pytest.mark.parametrize("name", ["smooth_relu", "parametric_softplus"])
def test_learnable_beta_receives_gradient(name):
    layer = build_activation(name, beta=3.0)
    layer(torch.randn(64)).pow(2).sum().backward()
    assert layer.beta.grad is not None and layer.beta.grad.abs() > 0


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ConfigError) as error:
        build_activation("swishh")
    for name in ACTIVATIONS:
        assert name in str(error.value)


def test_parameter_on_the_wrong_activation_is_rejected():
    with pytest.raises(ConfigError, match=r"'relu' takes no parameter\(s\) \['beta'\]"):
        build_activation("relu", beta=2.0)
    with pytest.raises(ConfigError, match="beta must be a positive number"):
        build_activation("softplus", beta=-1.0)
    assert set(activation_params("softplus")) == {"beta"}
    assert set(activation_params("elu")) == {"alpha"}


def smooth_derivative(x):
    return derivative(build_activation("softplus", beta=10.0), x)


@pytest.mark.parametrize("phase", ["attack", "update"])
def test_ablation_forward_is_relu_backward_is_smooth(phase):
    layer = ReLUSmoothBackward(smooth="softplus", smooth_params={"beta": 10.0}, smooth_backward_in="both")
    x = torch.linspace(-1, 1, 201, dtype=torch.float64)
    with activation_phase(phase):
        torch.testing.assert_close(layer.double()(x), F.relu(x))
        torch.testing.assert_close(derivative(layer, x), smooth_derivative(x))


def test_ablation_is_plain_relu_outside_its_phase():
    x = torch.linspace(-1, 1, 201, dtype=torch.float64)
    relu_derivative = (x > 0).double()
    attack_only = ReLUSmoothBackward(smooth_backward_in="attack")
    update_only = ReLUSmoothBackward(smooth_backward_in="update")
    with activation_phase("attack"):
        torch.testing.assert_close(derivative(attack_only, x), smooth_derivative(x))
        torch.testing.assert_close(derivative(update_only, x), relu_derivative)
    with activation_phase("update"):
        torch.testing.assert_close(derivative(attack_only, x), relu_derivative)
        torch.testing.assert_close(derivative(update_only, x), smooth_derivative(x))
    torch.testing.assert_close(derivative(attack_only, x), relu_derivative)  # no phase: plain ReLU


def test_ablation_rejects_bad_settings():
    with pytest.raises(ConfigError, match="smooth_backward_in"):
        ReLUSmoothBackward(smooth_backward_in="forward")
    with pytest.raises(ConfigError, match="smooth must be one of"):
        ReLUSmoothBackward(smooth="relu")
