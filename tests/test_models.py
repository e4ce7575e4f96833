"""Model families: the published sizes, the EfficientNet table, compound scaling, normalization inside."""
import math

import pytest
import torch
from torch import nn

from trainers.activations import ParametricSoftplus, SmoothReLU
from trainers.errors import ConfigError
from trainers.models import ARCHS, EFFICIENTNET_SCALES, build_model, compound_scaling
from trainers.models.efficientnet import B0_STAGES, HEAD_CHANS, STEM_CHANS
from trainers.models.layers import round_channels


@pytest.mark.parametrize("arch, params_m, gmacs", [
    ("resnet18", 11.69, 1.82), ("resnet50", 25.56, 4.09), ("efficientnet_b0", 5.29, 0.39),
])
def test_published_parameter_and_flop_counts(arch, params_m, gmacs):
    cost = build_model(arch, 1000).cost()
    assert cost.params / 1e6 == pytest.approx(params_m, rel=0.01)
    assert cost.macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert cost.flops == 2 * cost.macs and cost.resolution == 224


@pytest.mark.parametrize("arch, params_m", [
    ("resnet34", 21.80), ("resnet101", 44.55), ("resnet152", 60.19), ("efficientnet_b1", 7.79),
    ("efficientnet_b2", 9.11), ("efficientnet_b3", 12.23), ("efficientnet_b4", 19.34),
    ("efficientnet_b5", 30.39), ("efficientnet_b6", 43.04), ("efficientnet_b7", 66.35),
])
def test_published_parameter_counts(arch, params_m):
    params = sum(p.numel() for p in build_model(arch, 1000).parameters())
    assert params / 1e6 == pytest.approx(params_m, rel=0.02)


@pytest.mark.parametrize("name", sorted(EFFICIENTNET_SCALES))
def test_efficientnet_follows_the_coefficient_table(name):
    scale = EFFICIENTNET_SCALES[name]
    model = build_model(f"efficientnet_{name}", 10)
    network = model.network
    assert model.spec.resolution == scale.resolution
    assert model.spec.dropout == scale.dropout
    assert network.head[3].p == scale.dropout
    assert network.stage_repeats == tuple(math.ceil(s.repeats * scale.depth_mult) for s in B0_STAGES)
    assert network.stem[0].out_channels == round_channels(STEM_CHANS * scale.width_mult)
    assert network.num_features == round_channels(HEAD_CHANS * scale.width_mult)
    assert network.blocks[-1].block[-1][0].out_channels == round_channels(320 * scale.width_mult)


def test_sat_l1_is_wider_and_deeper_than_b7():
    assert EFFICIENTNET_SCALES["l1"] == type(EFFICIENTNET_SCALES["l1"])(3.9, 3.7, 600, 0.5)


def test_compound_scaling_rule():
    for phi in (0, 1, 2.5):
        scale = compound_scaling(phi)
        assert scale.depth_mult == pytest.approx(1.2**phi)
        assert scale.width_mult == pytest.approx(1.1**phi)
        assert abs(scale.resolution - 224 * 1.15**phi) <= 4 and scale.resolution % 8 == 0
    # alpha * beta^2 * gamma^2 ~= 2: each unit of phi roughly doubles the FLOPs.
    base = build_model("efficientnet_b0", 10).cost().macs
    scaled_model = build_model("efficientnet_b0", 10, compound_phi=1.0)
    assert scaled_model.spec.resolution == compound_scaling(1.0).resolution
    assert 1.6 < scaled_model.cost().macs / base < 2.4


def test_width_and_depth_multipliers_scale_resnets():
    small = build_model("resnet50", 10, width_mult=0.5, depth_mult=0.5, resolution=32)
    widths = [m.out_channels for m in small.network.stages.modules() if isinstance(m, nn.Conv2d)]
    assert max(widths) == 1024  # 512 * 0.5 * expansion 4
    assert len(small.network.stages) == sum(math.ceil(b * 0.5) for b in (3, 4, 6, 3))
    assert small.spec.stem == "cifar" and isinstance(small.network.stem, nn.Sequential)
    assert build_model("resnet18", 10).spec.stem == "imagenet"


def test_resolution_is_part_of_the_model_description():
    model = build_model("resnet18", 10, resolution=48)
    assert model.spec.resolution == 48
    assert model.cost().resolution == 48
    assert model.cost(resolution=64).macs > model.cost().macs


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "efficientnet_b0"])
@pytest.mark.parametrize("activation, layer_type", [("smooth_relu", SmoothReLU),
                                                    ("parametric_softplus", ParametricSoftplus),
                                                    ("silu", nn.SiLU)])
def test_every_model_uses_the_registry_activation(arch, activation, layer_type):
    model = build_model(arch, 10, activation=activation, width_mult=0.25, depth_mult=0.25, resolution=32)
    kinds = {type(m) for m in model.modules()}
    assert layer_type in kinds and nn.ReLU not in kinds
    if layer_type is not nn.SiLU:  # each layer gets its own learnable beta
        betas = [m.beta for m in model.modules() if isinstance(m, layer_type)]
        assert len({id(b) for b in betas}) == len(betas) > 1
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalization_lives_inside_the_model():
    model = build_model("resnet18", 10, width_mult=0.25, resolution=32,
                        input_mean=(0.1, 0.2, 0.3), input_std=(0.5, 0.25, 0.2)).eval()
    images = torch.rand(4, 3, 32, 32)
    normalized = (images - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(images), model.network(normalized))
    assert "normalize.mean" in model.state_dict()  # travels with checkpoints


def test_grayscale_input_channels():
    model = build_model("efficientnet_b0", 10, in_chans=1, width_mult=0.25, resolution=32)
    assert model.spec.input_mean == (0.5,)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("options, message", [
    ({"arch": "resnet19"}, "arch: unknown arch; accepted: efficientnet_b0"),
    ({"widht_mult": 2}, "widht_mult: unknown key"),
    ({"width_mult": -1}, "width_mult: Input should be greater than 0"),
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"activation": "relu", "activation_params": {"beta": 2}}, "takes no parameter"),
    ({"arch": "efficientnet_b0", "stem": "cifar"}, "stem applies to resnet archs only"),
    ({"in_chans": 1, "input_mean": (0.5, 0.5, 0.5)}, "input_mean needs 1 values"),
])
def test_bad_model_options_name_the_field(options, message):
    options = {"arch": "resnet18", **options}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_model(options.pop("arch"), 10, **options)


def test_every_arch_builds_and_runs_tiny():
    for arch in ARCHS:
        model = build_model(arch, 3, width_mult=0.1, depth_mult=0.1, resolution=32)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3), arch
