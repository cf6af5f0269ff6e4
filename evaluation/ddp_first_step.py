"""One training step, run both in one process and in each process of a ``torchrun`` group
(by ``tests/test_distributed.py`` and the ``distributed`` suite):
``python -m evaluation.ddp_first_step OUT OBJECTIVE ORDER`` under torchrun saves rank 0's
gradients and parameters after the step to ``OUT``."""

from __future__ import annotations

import sys

import torch

from training import NetworkConfig, TrainConfig, build_networks, train_networks
from training.distributed import Shard, init_from_environment

ROWS = 24  # one global minibatch


def first_step(batch_size: int, shard: Shard | None, objective: str = "triangle",
               update_order: str = "alternating") -> dict[str, dict[str, torch.Tensor]]:
    """Gradients and parameters after one step on ``ROWS`` rows with minibatches of
    ``batch_size`` rows per process, and the parameters before it (the same seeds in every
    process and every call)."""
    torch.manual_seed(0)
    networks = build_networks(NetworkConfig(input_shape=(6,), latent_dim=3, width=16),
                              with_energy=objective == "triangle")
    initial = {k: v.clone() for k, v in networks.state_dict().items()}
    data = torch.randn(ROWS, 6, generator=torch.Generator().manual_seed(1))
    # the estimator's trimmed loss: the rows it leaves out are the global minibatch's worst
    config = TrainConfig(epochs=1, batch_size=batch_size, objective=objective,
                         update_order=update_order, trim_fraction=0.25)
    train_networks(networks, data, config, generator=torch.Generator().manual_seed(2),
                   shard=shard)
    return {"grads": {name: p.grad.clone() for name, p in networks.named_parameters()},
            "params": {k: v.clone() for k, v in networks.state_dict().items()},
            "initial": initial}


def main(out: str, objective: str, update_order: str) -> None:
    shard = init_from_environment("cpu")
    if shard is None:
        raise SystemExit("run this under torchrun with more than one process")
    result = first_step(ROWS // shard.world_size, shard, objective, update_order)
    if shard.is_main:
        torch.save(result, out)
    shard.barrier()
    shard.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
