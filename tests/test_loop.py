import pytest
import torch

from training import (
    NetworkConfig,
    TrainConfig,
    TrainingDivergedError,
    build_networks,
    train_networks,
)
from training import loop as loop_module


def _nets(objective="triangle"):
    torch.manual_seed(0)
    return build_networks(NetworkConfig(input_shape=(4,), latent_dim=2, width=8, depth=1),
                          with_energy=objective == "triangle")


def test_metrics_per_epoch_and_callback():
    seen = []
    history = train_networks(_nets(), torch.randn(40, 4), TrainConfig(epochs=3, batch_size=16),
                             callbacks=[lambda epoch, m: seen.append(epoch)])
    assert seen == [1, 2, 3]
    keys = {"loss_ebm", "loss_inference", "loss_generator", "reconstruction", "energy_gap",
            "encoder_variance", "seconds"}
    assert keys <= set(history.epochs[-1])
    assert history.rollbacks == 0


def test_vae_objective_needs_no_energy():
    history = train_networks(_nets("vae"), torch.randn(40, 4),
                             TrainConfig(objective="vae", epochs=2, batch_size=16))
    assert {"loss_vae", "encoder_variance"} <= set(history.epochs[-1])
    with pytest.raises(ValueError, match="energy"):
        train_networks(_nets("vae"), torch.randn(8, 4), TrainConfig(epochs=1))


def test_nan_rolls_back_to_last_good_state(monkeypatch):
    real_step = loop_module.triangle_step
    calls = {"n": 0}

    def flaky(networks, optimizers, x, config, generator=None):
        calls["n"] += 1
        metrics = real_step(networks, optimizers, x, config, generator)
        if calls["n"] == 4:  # second epoch, first batch: poison the weights and the loss
            with torch.no_grad():
                next(networks.encoder.parameters()).fill_(float("nan"))
            metrics["reconstruction"] = torch.tensor(float("nan"))
        return metrics

    monkeypatch.setattr(loop_module, "triangle_step", flaky)
    nets = _nets()
    history = train_networks(nets, torch.randn(48, 4), TrainConfig(epochs=3, batch_size=16))
    assert history.rollbacks == 1
    assert len(history.epochs) == 3
    assert all(torch.isfinite(p).all() for m in nets.modules() for p in m.parameters())


def test_each_rollback_halves_the_rate_in_force(monkeypatch):
    real_step = loop_module.triangle_step
    calls = {"n": 0}
    rates = []

    def flaky(networks, optimizers, x, config, generator=None):
        calls["n"] += 1
        rates.append(optimizers.encoder.param_groups[0]["lr"])
        metrics = real_step(networks, optimizers, x, config, generator)
        if calls["n"] in (2, 3):  # the first two tries of the second epoch diverge
            metrics["reconstruction"] = torch.tensor(float("nan"))
        return metrics

    monkeypatch.setattr(loop_module, "triangle_step", flaky)
    config = TrainConfig(epochs=2, batch_size=16, lr_decay=1.0, max_rollbacks=3)
    history = train_networks(_nets(), torch.randn(16, 4), config)
    assert history.rollbacks == 2
    rate = config.learning_rate
    assert rates == pytest.approx([rate, rate, rate / 2, rate / 4])


def test_persistent_nan_raises(monkeypatch):
    def broken(networks, optimizers, x, config, generator=None):
        return {"reconstruction": torch.tensor(float("nan"))}

    monkeypatch.setattr(loop_module, "triangle_step", broken)
    with pytest.raises(TrainingDivergedError, match="diverged"):
        train_networks(_nets(), torch.randn(16, 4), TrainConfig(epochs=2, max_rollbacks=2))


def test_time_budget_stops_after_the_minibatch_that_crosses_it():
    history = train_networks(_nets(), torch.randn(64, 4),
                             TrainConfig(epochs=50, batch_size=16, max_training_seconds=1e-9))
    assert len(history.epochs) == 1
    assert history.epochs[0]["batches_fraction"] == 0.25  # one of four minibatches ran


def test_image_training_uses_channels_last_and_returns_the_default_layout(monkeypatch):
    torch.manual_seed(0)
    nets = build_networks(NetworkConfig(input_shape=(3, 8, 8), latent_dim=2, width=4, depth=2))
    layouts = []
    real_step = loop_module.triangle_step

    def recording_step(networks, optimizers, x, config, generator=None):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last)
                       and networks.encoder.body[2].weight.is_contiguous(
                           memory_format=torch.channels_last))
        return real_step(networks, optimizers, x, config, generator)

    monkeypatch.setattr(loop_module, "triangle_step", recording_step)
    train_networks(nets, torch.randn(16, 3, 8, 8), TrainConfig(epochs=1, batch_size=8))
    assert layouts == [True, True]
    # Saving, export and scoring expect the default layout back.
    assert all(p.is_contiguous() for m in nets.modules() for p in m.parameters())
