import numpy as np
import pytest
import torch

# Tiny configurations keep the suite fast on 2 cores.
TINY = dict(latent_dim=2, width=8, depth=1, epochs=2, batch_size=32)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


@pytest.fixture
def tabular():
    rng = np.random.RandomState(0)
    return rng.normal(size=(80, 5))


@pytest.fixture
def images():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(40, 8, 8)).astype(np.uint8)
