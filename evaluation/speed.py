"""Training throughput of the triangle objective and its speed levers against the VAE
ablation, on the same networks, with FLOPs per step and the share of the machine's peak."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import NetworkConfig, TrainConfig, build_networks
from training.loop import Optimizers, select_step, use_training_layout

# name -> TrainConfig options; "vae" is the reference of every ratio. TrainConfig's own
# defaults are the authors' step (alternating order, every model pair); the estimator's
# default is the variant marked "estimator default".
VARIANTS = {
    "vae": {"objective": "vae"},
    "triangle, authors' step": {},
    "triangle, simultaneous": {"update_order": "simultaneous"},
    "triangle, critic every 2": {"critic_every": 2},
    "triangle, critic every 3": {"critic_every": 3},
    "triangle, half the model pairs": {"model_pairs_fraction": 0.5},
    "triangle, a quarter of the model pairs": {"model_pairs_fraction": 0.25},
    "triangle, a quarter of the model pairs, critic every 2": {"model_pairs_fraction": 0.25,
                                                               "critic_every": 2},
    "triangle, estimator default (a quarter of the model pairs, simultaneous)": {
        "model_pairs_fraction": 0.25, "update_order": "simultaneous"},
    "vae, bf16": {"objective": "vae", "training_precision": "bfloat16"},
    "triangle, authors' step, bf16": {"training_precision": "bfloat16"},
    "triangle, estimator default, bf16": {"model_pairs_fraction": 0.25,
                                          "update_order": "simultaneous",
                                          "training_precision": "bfloat16"},
}


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
                       ) -> float:
    """Best achieved GFLOP/s of an ``n x n`` matrix product: the practical arithmetic peak
    of this machine's BLAS with the threads torch uses."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * n**3 / best / 1e9


def flops_per_step(step, networks, optimizers, batch, config) -> float:
    """Floating-point operations of one training step (forward and backward), as counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        step(networks, optimizers, batch, config)
    return float(counter.get_total_flops())


def training_throughput(
    images: np.ndarray,
    *,
    variants: dict[str, dict] | None = None,
    width: int = 32,
    energy_width: int | None = None,
    latent_dim: int = 32,
    batch_size: int = 64,
    steps: int = 40,
    repeats: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Samples per second of one training step per variant, on images ``(n, H, W)``.

    The networks are the estimator's defaults for 28x28 images (conv, width 32, critic width
    16, latent 32). The variants run in turn, ``repeats`` times, so that all see the same
    machine load; the table reports the median over repeats, the ratio to the float32 VAE,
    the FLOPs of one step, the achieved GFLOP/s and their share of the matrix-product peak of
    the step's precision, measured in the same run.
    """
    variants = VARIANTS if variants is None else variants
    torch.manual_seed(seed)
    x_all = torch.as_tensor(images, dtype=torch.float32)
    if x_all.ndim == 3:
        x_all = x_all.unsqueeze(1)
    x_all = x_all / 127.5 - 1.0
    config = NetworkConfig(input_shape=tuple(x_all.shape[1:]), width=width,
                           energy_width=energy_width, latent_dim=latent_dim)
    peaks = {"float32": matmul_peak_gflops(torch.float32),
             "bfloat16": matmul_peak_gflops(torch.bfloat16)}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    flops: dict[str, float] = {}
    for _ in range(repeats):
        for name, options in variants.items():
            train_config = TrainConfig(batch_size=batch_size, **options)
            step = select_step(train_config)
            networks = build_networks(config, with_energy=train_config.objective == "triangle")
            x_train = use_training_layout(networks, x_all)  # the layout train_networks uses
            optimizers = Optimizers.create(networks, train_config)
            batches = [x_train[torch.randint(len(x_train), (batch_size,))]
                       for _ in range(steps + 3)]
            for batch in batches[:3]:  # warm-up: allocator and oneDNN kernel selection
                step(networks, optimizers, batch, train_config)
            if name not in flops:
                # averaged over critic_every consecutive steps, so skipped critic steps count
                k = train_config.critic_every
                flops[name] = sum(flops_per_step(step, networks, optimizers, batch,
                                                 train_config) for batch in batches[:k]) / k
            started = time.perf_counter()
            for batch in batches[3:]:
                step(networks, optimizers, batch, train_config)
            runs[name].append(steps * batch_size / (time.perf_counter() - started))
    reference = float(np.median(runs[next(iter(variants))]))
    rows = []
    for name, values in runs.items():
        rate = float(np.median(values))
        precision = variants[name].get("training_precision", "float32")
        achieved = flops[name] * rate / batch_size / 1e9
        rows.append({"variant": name, "samples_per_s": rate, "ratio_to_vae": rate / reference,
                     "gflop_per_step": flops[name] / 1e9, "achieved_gflops": achieved,
                     "peak_gflops": peaks[precision],
                     "peak_fraction": achieved / peaks[precision],
                     "image_shape": "x".join(map(str, config.input_shape)),
                     "batch_size": batch_size, "threads": torch.get_num_threads()})
    return pd.DataFrame(rows)


def scoring_throughput(images: np.ndarray, *, width: int = 32, latent_dim: int = 32,
                       batch_size: int = 4096, repeats: int = 3) -> pd.DataFrame:
    """Samples per second and achieved GFLOP/s of large-batch scoring: the encoder and
    generator forward passes (what the ``latent_knn`` and reconstruction rules run), without
    autograd, in float32 (the ONNX export's networks) and float64 (the estimator's)."""
    x = torch.as_tensor(images[:batch_size], dtype=torch.float32)
    x = (x.unsqueeze(1) if x.ndim == 3 else x) / 127.5 - 1.0
    config = NetworkConfig(input_shape=tuple(x.shape[1:]), width=width, latent_dim=latent_dim)
    peak = matmul_peak_gflops(torch.float32)
    rows = []
    for dtype in (torch.float32, torch.float64):
        networks = build_networks(config, with_energy=False)
        networks.to("cpu", dtype)
        networks.train(False)
        batch = x.to(dtype)

        def score(batch=batch, networks=networks):
            with torch.no_grad():
                return networks.generator(networks.encoder(batch)[0])

        score()  # warm-up
        with FlopCounterMode(display=False) as counter:
            score()
        best = np.inf
        for _ in range(repeats):
            started = time.perf_counter()
            score()
            best = min(best, time.perf_counter() - started)
        achieved = counter.get_total_flops() / best / 1e9
        rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": len(batch),
                     "samples_per_s": len(batch) / best, "achieved_gflops": achieved,
                     "fp32_peak_gflops": peak, "peak_fraction": achieved / peak})
    return pd.DataFrame(rows)
