"""Training throughput of the triangle objective against the VAE ablation, same networks."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from training import NetworkConfig, TrainConfig, build_networks
from training.loop import Optimizers, triangle_step, use_training_layout, vae_step


def training_throughput(
    images: np.ndarray,
    *,
    width: int = 32,
    energy_width: int | None = None,
    latent_dim: int = 4,
    batch_size: int = 64,
    steps: int = 40,
    repeats: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Samples per second of one training step, per objective, on images ``(n, H, W)``.

    The networks are the estimator's defaults for 28x28 images (width 32, critic width 16,
    latent 4). The objectives alternate ``repeats`` times so that both see the same machine
    load; the table reports the median over repeats and the ratio to the VAE.
    """
    torch.manual_seed(seed)
    x_all = torch.as_tensor(images, dtype=torch.float32)
    if x_all.ndim == 3:
        x_all = x_all.unsqueeze(1)
    x_all = x_all / 127.5 - 1.0
    config = NetworkConfig(input_shape=tuple(x_all.shape[1:]), width=width,
                           energy_width=energy_width, latent_dim=latent_dim)
    runs: dict[str, list[float]] = {"vae": [], "triangle": []}
    for _ in range(repeats):
        for objective, step in (("vae", vae_step), ("triangle", triangle_step)):
            train_config = TrainConfig(objective=objective, batch_size=batch_size)
            networks = build_networks(config, with_energy=objective == "triangle")
            x_train = use_training_layout(networks, x_all)  # the layout train_networks uses
            optimizers = Optimizers.create(networks, train_config)
            batches = [x_train[torch.randint(len(x_train), (batch_size,))]
                       for _ in range(steps + 3)]
            for batch in batches[:3]:  # warm-up: allocator and oneDNN kernel selection
                step(networks, optimizers, batch, train_config)
            started = time.perf_counter()
            for batch in batches[3:]:
                step(networks, optimizers, batch, train_config)
            runs[objective].append(steps * batch_size / (time.perf_counter() - started))
    vae = float(np.median(runs["vae"]))
    rows = [{"objective": name, "samples_per_s": float(np.median(v)),
             "ratio_to_vae": float(np.median(v)) / vae,
             "image_shape": "x".join(map(str, config.input_shape)), "width": width,
             "energy_width": config.resolved_energy_width, "batch_size": batch_size,
             "threads": torch.get_num_threads()}
            for name, v in runs.items()]
    return pd.DataFrame(rows)
