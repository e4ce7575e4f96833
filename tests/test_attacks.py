"""PGD properties on a model trained on real data (digits): ball, box, strength, restarts, model state."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tests.conftest import DIGITS_RESOLUTION
from trainers.attacks import AttackConfig, PGDAttacker
from trainers.attacks.autoattack import autoattack_accuracy, build_autoattack
from trainers.errors import ConfigError
from trainers.models import build_model
from trainers.seeding import stream_generator

EPS = 0.1


@pytest.fixture(scope="module")
def batch(digits_split):
    (_, _), (images, labels) = digits_split
    return images[:200], labels[:200]


def accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def fooled(model, images, labels):
    with torch.no_grad():
        return model(images).argmax(1) != labels


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 1.0)])
@pytest.mark.parametrize("random_start", [True, False])
def test_adversarial_images_stay_in_the_ball_and_the_box(trained_digits_model, batch, norm, eps,
                                                         random_start):
    images, labels = batch
    config = AttackConfig(norm=norm, eps=eps, step_size=eps / 2, steps=5, random_start=random_start,
                          restarts=2, clean_start_prob=0.2)
    adv = PGDAttacker(config).perturb(trained_digits_model, images, labels)
    delta = (adv - images).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert adv.min() >= 0 and adv.max() <= 1
    assert size.mean() > eps / 4  # it really moved


def test_pgd_beats_random_noise_of_the_same_size(trained_digits_model, batch):
    images, labels = batch
    torch.manual_seed(0)
    noise = (images + EPS * torch.randint(0, 2, images.shape).mul(2).sub(1)).clamp(0, 1)
    adv = PGDAttacker(AttackConfig(eps=EPS, step_size=EPS / 4, steps=10)).perturb(
        trained_digits_model, images, labels)
    clean_acc = accuracy(trained_digits_model, images, labels)
    noise_acc = accuracy(trained_digits_model, noise, labels)
    pgd_acc = accuracy(trained_digits_model, adv, labels)
    assert clean_acc > 0.9
    assert noise_acc > clean_acc - 0.15       # random corners of the same ball barely matter
    assert pgd_acc < noise_acc - 0.5          # the gradient finds the weak directions


def test_more_steps_never_weaken_the_attack(trained_digits_model, batch):
    images, labels = batch
    previous = torch.zeros(len(labels), dtype=torch.bool)
    accuracies = []
    for steps in (1, 2, 4, 8, 16):
        torch.manual_seed(0)  # same random start for each budget
        config = AttackConfig(eps=EPS / 2, step_size=EPS / 8, steps=steps, keep_best=True)
        now = fooled(trained_digits_model, PGDAttacker(config).perturb(trained_digits_model, images, labels),
                     labels)
        assert bool((now | ~previous).all()), f"{steps} steps lost examples fooled with fewer"
        previous = now
        accuracies.append(1 - now.float().mean().item())
    assert accuracies[-1] < accuracies[0] - 0.1, accuracies


def test_restarts_keep_the_worst_case_and_go_to_the_examples_still_standing(trained_digits_model, batch):
    images, labels = batch
    single = AttackConfig(eps=EPS, step_size=EPS / 2, steps=1, random_start=True)
    # The same stream: the first restart draws exactly the single run's starts.
    first = fooled(trained_digits_model, PGDAttacker(single, generator=stream_generator(1, "restarts")).perturb(
        trained_digits_model, images, labels), labels)
    restarted = fooled(trained_digits_model, PGDAttacker(
        single.model_copy(update={"restarts": 4}), generator=stream_generator(1, "restarts")).perturb(
        trained_digits_model, images, labels), labels)
    assert restarted[first].all()  # what the first restart fooled stays fooled
    assert restarted.sum() > first.sum()  # later restarts added examples here


def test_an_evaluation_attack_stops_on_fooled_examples_without_changing_any_outcome(trained_digits_model, batch):
    """Dropping an example once it is fooled is only a saving: each example, attacked on its own for every
    step, ends fooled or not exactly as in the batch (no random start, so the trajectories are the same)."""
    images, labels = batch[0][:48], batch[1][:48]
    attack = PGDAttacker(AttackConfig(eps=EPS / 4, step_size=EPS / 16, steps=8, random_start=False, keep_best=True))
    together = fooled(trained_digits_model, attack.perturb(trained_digits_model, images, labels), labels)
    alone = torch.cat([fooled(trained_digits_model, attack.perturb(trained_digits_model, images[i:i + 1],
                                                                   labels[i:i + 1]), labels[i:i + 1])
                       for i in range(len(labels))])
    assert torch.equal(together, alone)
    assert 0 < together.sum() < len(labels)  # some fooled early, some never: both paths ran


def test_attack_touches_no_parameter_gradient_and_restores_the_model(batch):
    images, labels = batch
    model = build_model("resnet18", 10, activation="smooth_relu", width_mult=0.25, depth_mult=0.5,
                        resolution=DIGITS_RESOLUTION).train()
    model(images[:32]).sum().backward()  # existing gradients must survive untouched
    grads_before = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    model.network.head[-1].bias.grad = None
    PGDAttacker(AttackConfig(eps=EPS, step_size=EPS / 4, steps=3, restarts=2, keep_best=True)).perturb(
        model, images[:32], labels[:32])
    for name, param in model.named_parameters():
        if name == "network.head.3.bias":
            assert param.grad is None
        else:
            assert torch.equal(param.grad, grads_before[name]), name
        assert param.requires_grad, name
    # BatchNorm ran on running statistics: no running mean/var/count moved.
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name]), name
    assert model.training


def test_targeted_attack_reaches_its_targets(trained_digits_model, batch):
    images, labels = batch
    targets = (labels + 1) % 10
    config = AttackConfig(eps=0.3, step_size=0.05, steps=20, targeted=True)
    adv = PGDAttacker(config).perturb(trained_digits_model, images, labels, target_labels=targets)
    with torch.no_grad():
        hit = (trained_digits_model(adv).argmax(1) == targets).float().mean().item()
    assert hit > 0.5
    random_targets = PGDAttacker(config).perturb(trained_digits_model, images, labels)  # drawn != label
    assert accuracy(trained_digits_model, random_targets, labels) < 0.5


def test_fgsm_with_random_start_is_the_one_step_case(trained_digits_model, batch):
    images, labels = batch
    config = AttackConfig.fgsm_rs(EPS)
    assert (config.steps, config.random_start) == (1, True)
    assert config.step_size == pytest.approx(1.25 * EPS)
    adv = PGDAttacker(config).perturb(trained_digits_model, images, labels)
    assert (adv - images).abs().max() <= EPS + 1e-6
    assert accuracy(trained_digits_model, adv, labels) < accuracy(trained_digits_model, images, labels) - 0.2


def test_attack_under_bf16_autocast(trained_digits_model, batch):
    images, labels = batch
    attacker = PGDAttacker(AttackConfig(eps=EPS, step_size=EPS / 4, steps=5), autocast_dtype=torch.bfloat16)
    adv = attacker.perturb(trained_digits_model, images, labels)
    assert adv.dtype == torch.float32
    assert (adv - images).abs().max() <= EPS + 1e-6
    assert accuracy(trained_digits_model, adv, labels) < 0.5


def test_zero_eps_returns_the_clean_images(trained_digits_model, batch):
    images, labels = batch
    torch.testing.assert_close(PGDAttacker(AttackConfig(eps=0, steps=5)).perturb(
        trained_digits_model, images, labels), images)


def test_autoattack_is_at_least_as_strong_as_pgd_and_harmless_at_zero_eps(trained_digits_model, batch):
    images, labels = images_and_labels = batch[0][:64], batch[1][:64]
    clean = accuracy(trained_digits_model, images, labels)
    pgd = accuracy(trained_digits_model, PGDAttacker(AttackConfig(eps=EPS, step_size=EPS / 4, steps=10)).perturb(
        trained_digits_model, images, labels), labels)
    autoattack = autoattack_accuracy(trained_digits_model, [images_and_labels], "linf", EPS, 10, "apgd")
    assert autoattack <= pgd + 1 / 64 and autoattack < clean
    assert autoattack_accuracy(trained_digits_model, [images_and_labels], "linf", 0.0, 10, "apgd") == clean
    assert trained_digits_model.training is False  # attack_mode restores the model's state


@pytest.mark.parametrize("norm, version, message", [("l1", "apgd", "norm 'l1' is not supported"),
                                                    ("linf", "plus", "version 'plus' is unknown")])
def test_autoattack_rejects_what_it_cannot_run(trained_digits_model, norm, version, message):
    with pytest.raises(ConfigError, match=message):
        build_autoattack(trained_digits_model, norm, EPS, 10, version)


@pytest.mark.parametrize("fields, message", [
    ({"eps": "4/255"}, None),
    ({"eps": "four"}, "fraction like '4/255'"),
    ({"eps": 4}, "linf eps is in pixel scale"),
    ({"eps": -0.1}, "greater than or equal to 0"),
    ({"steps": 0}, "greater than or equal to 1"),
    ({"norm": "l1"}, "'linf' or 'l2'"),
    ({"stepsize": 0.1}, "Extra inputs are not permitted"),
])
def test_attack_config_validation(fields, message):
    if message is None:
        assert AttackConfig(**fields).eps == pytest.approx(4 / 255)
        return
    with pytest.raises(ValidationError, match=message):
        AttackConfig(**fields)


def test_an_fp16_attack_keeps_the_gradients_that_half_precision_would_flush_to_zero():
    """A model confident of every prediction: its loss gradients (~1e-9 and less) lie below fp16's smallest
    subnormal (6e-8), so an unscaled fp16 backward pass gives zero gradients, a zero sign step, an attack weaker
    than it reports. The attack rescales each example's gradient first: its steps are fp32's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(600)  # margins of tens to hundreds of logits
    images = torch.rand(16, 3, 8, 8) * 0.5 + 0.25
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    leaf = images.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(leaf)
    (unscaled,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels, reduction="sum"), leaf)

    config = AttackConfig(eps=EPS, step_size=EPS / 4, steps=1, random_start=False)
    fp32 = PGDAttacker(config).perturb(model, images, labels)
    fp16 = PGDAttacker(config, autocast_dtype=torch.float16).perturb(model, images, labels)
    moved = (fp32 - images).abs() > EPS / 8  # where fp32 has a gradient (its softmax saturates beyond ~100)
    assert moved.float().mean() > 0.5
    assert (unscaled[moved] == 0).float().mean() > 0.5  # the premise: half precision flushes most to zero
    assert ((fp16 - images).sign()[moved] == (fp32 - images).sign()[moved]).float().mean() > 0.99
