"""The training loop: three optimizers, the authors' update order, NaN rollback, metrics."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from training import objectives
from training.checkpoint import Checkpointer
from training.config import TrainConfig
from training.distributed import GlobalMinibatch, Replicas, Shard, unwrapped
from training.networks import Networks
from training.streaming import SpilledRows

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

# Radius multiplier of the "wide" critic negatives (in prior standard deviations).
WIDE_PRIOR_SCALE = 2.5


class TrainingDivergedError(RuntimeError):
    """Raised when losses stay non-finite after every allowed rollback."""


@dataclass
class TrainingHistory:
    """Per-epoch metrics (one dict per finished epoch) and the number of NaN rollbacks."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    rollbacks: int = 0


@dataclass
class Optimizers:
    """One Adam per network (the EBM gets its own learning rate and no weight decay)."""

    encoder: torch.optim.Adam
    generator: torch.optim.Adam
    energy: torch.optim.Adam | None

    @classmethod
    def create(cls, networks: Networks, config: TrainConfig) -> Optimizers:
        def adam(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
            # fused: one kernel per step instead of one per tensor (CPU and CUDA).
            return torch.optim.Adam(module.parameters(), lr=lr, betas=config.betas,
                                    weight_decay=weight_decay, fused=True)

        return cls(
            encoder=adam(networks.encoder, config.learning_rate, config.weight_decay),
            generator=adam(networks.generator, config.learning_rate, config.weight_decay),
            energy=None if networks.energy is None else adam(networks.energy,
                                                             config.ebm_learning_rate, 0.0),
        )

    def all(self) -> list[torch.optim.Adam]:
        return [o for o in (self.encoder, self.generator, self.energy) if o is not None]

    def learning_rates(self) -> list[float]:
        return [group["lr"] for optimizer in self.all() for group in optimizer.param_groups]

    def set_learning_rates(self, rates: list[float]) -> None:
        groups = [group for optimizer in self.all() for group in optimizer.param_groups]
        for group, rate in zip(groups, rates, strict=True):
            group["lr"] = rate


def _clip(module: nn.Module, max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(module.parameters(), max_norm)


@dataclass
class Pairs:
    """One minibatch's draws: data pairs (x, z_q) and model pairs (x_p, z_p), with graphs."""

    mu: torch.Tensor       # (n, k)
    logvar: torch.Tensor   # (n, k)
    z_q: torch.Tensor      # (n, k), reparameterised sample of q(z|x)
    z_p: torch.Tensor      # (n, k), prior sample
    x_rec: torch.Tensor    # like x, g(z_q)
    x_p: torch.Tensor      # like x, g(z_p)
    weights: torch.Tensor | None = None  # (n,) data-row weights of a trimmed loss
    observed: torch.Tensor | None = None  # like x, bool: entries seen (None: all)


Noise = torch.Generator | GlobalMinibatch | None


def _normal(generator: Noise, like: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """``(ceil(share * rows of like), like.shape[1])`` N(0, 1) draws; under data parallelism
    (a :class:`GlobalMinibatch`) this rank's part of the draw for the global minibatch."""
    if isinstance(generator, GlobalMinibatch):
        return generator.normal(like, share)
    rows = max(1, math.ceil(share * like.shape[0]))
    return torch.randn((rows, like.shape[1]), generator=generator, device=like.device,
                       dtype=like.dtype)


def _minibatch(generator: Noise) -> GlobalMinibatch | None:
    """The global minibatch these rows are one rank's part of, if any."""
    return generator if isinstance(generator, GlobalMinibatch) else None


def _reparameterise(mu: torch.Tensor, logvar: torch.Tensor, generator: Noise) -> torch.Tensor:
    """z = mu + sigma * eps, differentiable in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * _normal(generator, mu)


def _update_encoder_and_generator(networks: Networks, optimizers: Optimizers,
                                  loss: torch.Tensor, config: TrainConfig) -> None:
    """Backward ``loss`` into the encoder and generator only, clip, step both."""
    optimizers.encoder.zero_grad(set_to_none=True)
    optimizers.generator.zero_grad(set_to_none=True)
    loss.backward(inputs=list(networks.encoder.parameters())
                  + list(networks.generator.parameters()))
    _clip(networks.encoder, config.grad_clip)
    _clip(networks.generator, config.grad_clip)
    optimizers.encoder.step()
    optimizers.generator.step()


def draw_pairs(networks: Networks | Replicas, x: torch.Tensor,
               generator: Noise = None,
               config: TrainConfig | None = None,
               observed: torch.Tensor | None = None) -> Pairs:
    n = x.shape[0]
    mu, logvar = networks.encoder(x)
    z_q = _reparameterise(mu, logvar, generator)
    z_p = _normal(generator, mu, 1.0 if config is None else config.model_pairs_fraction)
    # One generator call for both latents: fewer, larger kernels.
    x_rec, x_p = networks.generator(torch.cat([z_q, z_p])).split([n, z_p.shape[0]])
    weights = None if config is None else objectives.trimming_weights(
        x, x_rec, config.decoder_sigma, config.trim_fraction, observed, _minibatch(generator))
    return Pairs(mu, logvar, z_q, z_p, x_rec, x_p, weights, observed)


def _energies(energy: nn.Module, x: torch.Tensor, pairs: Pairs,
              detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """E(x, z_q) and E(x_p, z_p), with one spectral-norm power iteration per call.

    ``detach=True`` (the critic's step): one critic call on both halves, inputs detached.
    ``detach=False`` (the encoder and generator step, which never moves the critic): the data
    half of the x-branch runs without a graph, because nothing it could give a gradient to is
    trained in this step; only E's gradients in x_p, z_q and z_p are kept. This saves the
    x-branch's backward pass over half the rows.
    """
    n = x.shape[0]
    if detach:
        energies = energy(torch.cat([x, pairs.x_p.detach()]),
                          torch.cat([pairs.z_q.detach(), pairs.z_p]))
        return energies[:n], energies[n:]
    # The network's own methods, outside any DDP wrapper: this pass never moves the critic.
    energy = unwrapped(energy)
    with parametrize.cached():
        with torch.no_grad():
            h_data = energy.x_branch(x)
        h_x = torch.cat([h_data, energy.x_branch(pairs.x_p)])
        energies = energy.from_x_features(h_x, torch.cat([pairs.z_q, pairs.z_p]))
    return energies[:n], energies[n:]


def extra_negatives(networks: Networks, x: torch.Tensor, pairs: Pairs, kinds: Sequence[str]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pairs besides the generator's that the critic pushes up, ``(x_neg, z_neg)`` without
    graphs, or None.

    ``"mismatch"``: (x, z_q of another row of the batch), so that a low energy needs x and z to
    agree. ``"wide"``: (g(c z), c z) with z ~ N(0, I), c = ``WIDE_PRIOR_SCALE``: pairs beyond
    the prior's bulk, where the generator's under-dispersed samples never go, so that the
    critic's potential also rises away from the data and not only towards them.
    ``"suspect"``: (x, z_q) of the rows the trimmed loss leaves out of this minibatch (the
    ``trim_fraction`` reconstructed worst; none without trimming): the critic pushes up the
    rows most likely to be the unlabelled anomalies among the training rows, instead of
    only leaving them out of the data side, so that its energy rises towards them.
    """
    xs, zs = [], []
    with torch.no_grad():
        if "mismatch" in kinds:
            xs.append(x)
            zs.append(pairs.z_q.detach().roll(1, dims=0))
        if "wide" in kinds:
            z_wide = WIDE_PRIOR_SCALE * pairs.z_p
            xs.append(unwrapped(networks.generator)(z_wide))
            zs.append(z_wide)
        if "suspect" in kinds and pairs.weights is not None:
            left_out = pairs.weights == 0
            xs.append(x[left_out])
            zs.append(pairs.z_q.detach()[left_out])
    return (torch.cat(xs), torch.cat(zs)) if xs else None


def _critic_loss(networks: Networks, x: torch.Tensor, pairs: Pairs, energy_data: torch.Tensor,
                 energy_model: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The critic's loss from the energies of the data and generator pairs, with the pairs
    of ``config.critic_negatives`` added to the model side (one mean over all of them)."""
    extra = extra_negatives(networks, x, pairs, config.critic_negatives)
    if extra is not None:
        # a second call of a DDP wrapper before its backward pass is an error; the gradient
        # of this call joins the first one's in the parameters all the same
        energy_model = torch.cat([energy_model, unwrapped(networks.energy)(*extra)])
    return objectives.ebm_loss(energy_data, energy_model, pairs.weights)


def _fused_loss(x: torch.Tensor, pairs: Pairs, energy_data: torch.Tensor,
                energy_model: torch.Tensor, config: TrainConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused, inference loss) of :func:`encoder_generator_losses` from given energies."""
    loss_inference = objectives.inference_loss(x, pairs.x_rec, pairs.z_q, pairs.logvar,
                                               energy_data, config.decoder_sigma,
                                               config.inference_loss, pairs.weights,
                                               pairs.observed)
    return loss_inference + energy_model.mean(), loss_inference


def ebm_update(networks: Networks, optimizers: Optimizers, x: torch.Tensor, pairs: Pairs,
               config: TrainConfig) -> torch.Tensor:
    """Step 1: data pairs down, model pairs up (the generator's pairs and those of
    ``config.critic_negatives``, one mean over all of them). Inputs are detached, so only
    alpha moves."""
    energy_data, energy_model = _energies(networks.energy, x, pairs, detach=True)
    loss = _critic_loss(networks, x, pairs, energy_data, energy_model, config)
    optimizers.energy.zero_grad(set_to_none=True)
    loss.backward(inputs=list(networks.energy.parameters()))
    _clip(networks.energy, config.grad_clip)
    optimizers.energy.step()
    return loss.detach()


def encoder_generator_losses(networks: Networks, x: torch.Tensor, pairs: Pairs,
                             config: TrainConfig) -> dict[str, torch.Tensor]:
    """Steps 2 and 3 as one differentiable objective, ``fused``.

    ``fused = inference_loss + mean E(g(z_p), z_p)``. Its gradient in phi is that of the
    inference loss (E(g(z_p), z_p) does not depend on phi) and its gradient in theta is that
    of the generator loss (the -/+ E(x, z_q) and entropy terms do not depend on theta, and the
    reconstruction term appears once in each). z_q and z_p are drawn once per minibatch, so
    the encoder update changes nothing the generator loss reads: one backward pass through
    ``fused`` equals the authors' encoder-then-generator updates.
    """
    energy_data, energy_model = _energies(networks.energy, x, pairs, detach=False)
    fused, loss_inference = _fused_loss(x, pairs, energy_data, energy_model, config)
    return {"fused": fused, "inference": loss_inference,
            "energy_data": energy_data, "energy_model": energy_model}


def encoder_generator_update(networks: Networks, optimizers: Optimizers, x: torch.Tensor,
                             pairs: Pairs, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Steps 2 and 3 against the updated critic; the critic's parameters do not move."""
    losses = encoder_generator_losses(networks, x, pairs, config)
    _update_encoder_and_generator(networks, optimizers, losses["fused"], config)
    return losses


def triangle_step(
    networks: Networks,
    optimizers: Optimizers,
    x: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    observed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One divergence-triangle update on a minibatch in the authors' order (EBM, encoder,
    generator); with ``config.critic_every`` = k the critic moves on every k-th minibatch
    only. Returns detached scalar metrics."""
    pairs = draw_pairs(networks, x, generator, config, observed)
    critic_moves = (config.critic_every == 1
                    or _updates_done(optimizers.encoder) % config.critic_every == 0)
    loss_ebm = ebm_update(networks, optimizers, x, pairs, config) if critic_moves else None
    losses = encoder_generator_update(networks, optimizers, x, pairs, config)
    return _triangle_metrics(x, pairs, loss_ebm, losses["inference"].detach(),
                             losses["energy_data"].detach(), losses["energy_model"].detach(),
                             config)


def simultaneous_triangle_step(
    networks: Networks,
    optimizers: Optimizers,
    x: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    observed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One divergence-triangle update with the three networks moved together: one critic
    forward pass over the data and model pairs serves both the critic's loss (gradients in
    its parameters only) and the encoder and generator's (gradients in theirs only), as in
    simultaneous-gradient GAN training. Unlike :func:`triangle_step`, the encoder and
    generator see the critic before this step's update."""
    pairs = draw_pairs(networks, x, generator, config, observed)
    energy = networks.energy
    n = x.shape[0]
    with parametrize.cached():
        # The data half needs no gradient in x; the critic's parameters get theirs from both.
        energies = energy(torch.cat([x, pairs.x_p]), torch.cat([pairs.z_q, pairs.z_p]))
        energy_data, energy_model = energies[:n], energies[n:]
        loss_ebm = _critic_loss(networks, x, pairs, energy_data, energy_model, config)
        fused, loss_inference = _fused_loss(x, pairs, energy_data, energy_model, config)
        for optimizer in optimizers.all():
            optimizer.zero_grad(set_to_none=True)
        # Each loss reaches its own networks' parameters only (``inputs``).
        loss_ebm.backward(inputs=list(energy.parameters()), retain_graph=True)
        fused.backward(inputs=list(networks.encoder.parameters())
                       + list(networks.generator.parameters()))
    for module in (networks.encoder, networks.generator, energy):
        _clip(module, config.grad_clip)
    for optimizer in optimizers.all():
        optimizer.step()
    return _triangle_metrics(x, pairs, loss_ebm.detach(), loss_inference.detach(),
                             energy_data.detach(), energy_model.detach(), config)


def _updates_done(optimizer: torch.optim.Optimizer) -> int:
    """Steps ``optimizer`` has taken: part of its state, so it survives checkpoints."""
    for state in optimizer.state.values():
        return int(state["step"])
    return 0


def _triangle_metrics(x, pairs: Pairs, loss_ebm, loss_inference, energy_data, energy_model,
                      config: TrainConfig) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        recon = objectives.reconstruction_nll(x, pairs.x_rec, config.decoder_sigma,
                                              pairs.observed).mean()
        energy_data, energy_model = energy_data.mean(), energy_model.mean()
        # a minibatch on which the critic did not move reports no critic loss
        return ({} if loss_ebm is None else {"loss_ebm": loss_ebm}) | {
            "loss_inference": loss_inference,
            "loss_generator": recon + energy_model,
            "reconstruction": recon,
            "energy_data": energy_data,
            "energy_model": energy_model,
            "energy_gap": energy_model - energy_data,
            "encoder_variance": pairs.logvar.exp().mean(),
        }


def vae_step(
    networks: Networks,
    optimizers: Optimizers,
    x: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    observed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One update of the plain VAE (the ablation): encoder and generator on the negative ELBO."""
    mu, logvar = networks.encoder(x)
    x_rec = networks.generator(_reparameterise(mu, logvar, generator))
    weights = objectives.trimming_weights(x, x_rec, config.decoder_sigma, config.trim_fraction,
                                          observed, _minibatch(generator))
    loss = objectives.vae_loss(x, x_rec, mu, logvar, config.decoder_sigma, weights, observed)
    _update_encoder_and_generator(networks, optimizers, loss, config)
    with torch.no_grad():
        return {
            "loss_vae": loss.detach(),
            "reconstruction": objectives.reconstruction_nll(x, x_rec, config.decoder_sigma,
                                                            observed).mean(),
            "encoder_variance": logvar.exp().mean().detach(),
        }


@dataclass
class _Snapshot:
    networks: dict[str, torch.Tensor]
    optimizers: list[dict]
    schedulers: list[dict]


@dataclass
class _TrainingState:
    """Everything an epoch reads or changes, so the loop's helpers take one argument."""

    networks: Networks
    optimizers: Optimizers
    schedulers: list
    step: Callable
    data: torch.Tensor | SpilledRows
    config: TrainConfig
    generator: torch.Generator | None
    history: TrainingHistory
    observed: torch.Tensor | None = None
    checkpointer: Checkpointer | None = None
    shard: Shard | None = None
    # what the step calls: ``networks`` itself, or its DDP replicas under data parallelism
    replicas: Networks | Replicas | None = None

    @property
    def is_main(self) -> bool:
        return self.shard is None or self.shard.is_main

    def snapshot(self) -> _Snapshot:
        return _Snapshot(
            networks={k: v.detach().clone() for k, v in self.networks.state_dict().items()},
            optimizers=[copy.deepcopy(o.state_dict()) for o in self.optimizers.all()],
            schedulers=[copy.deepcopy(s.state_dict()) for s in self.schedulers],
        )

    def restore(self, snapshot: _Snapshot) -> None:
        self.networks.load_state_dict(snapshot.networks)
        for optimizer, state in zip(self.optimizers.all(), snapshot.optimizers, strict=True):
            optimizer.load_state_dict(copy.deepcopy(state))
        for scheduler, state in zip(self.schedulers, snapshot.schedulers, strict=True):
            scheduler.load_state_dict(state)

    def save_checkpoint(self, good: _Snapshot) -> None:
        self.checkpointer.save({
            "snapshot": vars(good), "epochs": self.history.epochs,
            "rollbacks": self.history.rollbacks,
            "generator": None if self.generator is None else self.generator.get_state(),
            # the missing entries' current fill is training state too
            "filled": None if self.observed is None else self.data.detach().cpu().contiguous(),
        })

    def resume(self, resumed: dict) -> None:
        self.restore(_Snapshot(**resumed["snapshot"]))
        if self.generator is not None:
            self.generator.set_state(resumed["generator"])
        self.history = TrainingHistory(epochs=list(resumed["epochs"]),
                                       rollbacks=int(resumed["rollbacks"]))
        if self.observed is not None:
            self.data.copy_(resumed["filled"].to(self.data.device).reshape(self.data.shape))


def select_step(config: TrainConfig):
    """The update function ``config`` asks for, under bfloat16 autocast where asked."""
    if config.objective == "vae":
        step = vae_step
    elif config.update_order == "simultaneous":
        step = simultaneous_triangle_step
    else:
        step = triangle_step
    if config.training_precision == "float32":
        return step

    def mixed_precision_step(networks, optimizers, x, config, generator=None, observed=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return step(networks, optimizers, x, config, generator, observed)

    return mixed_precision_step


def fill_missing(networks: Networks, data: torch.Tensor, observed: torch.Tensor,
                 index: torch.Tensor) -> None:
    """Replace the missing entries of ``data[index]`` by the current model's reconstruction
    g(mu(x)) of those rows, in place: the paper's alternating inpainting, so that the
    encoder and the critic see each incomplete row completed by the model as it learns.
    A reconstruction that is not finite (a diverging epoch, rolled back after) is not used."""
    with torch.no_grad():
        x = data[index]
        x_hat = networks.generator(networks.encoder(x)[0]).to(x.dtype)
        keep = observed[index] | ~torch.isfinite(x_hat)
        data[index] = torch.where(keep, x, x_hat)


def _global_minibatches(state: _TrainingState, batch_rows: int
                        ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """One epoch's global minibatches: ``(index into state.data, None)`` for rows in
    memory, ``(None, rows)`` for rows read from disk."""
    data = state.data
    if isinstance(data, SpilledRows):
        for rows in data.minibatches(batch_rows, state.generator):
            yield None, rows
        return
    order = torch.randperm(data.shape[0], generator=state.generator, device=data.device)
    for start in range(0, data.shape[0], batch_rows):
        yield order[start:start + batch_rows], None


def _run_epoch(state: _TrainingState, deadline: float | None) -> dict[str, float] | None:
    """One pass over ``state.data`` in a random order, cut short after the minibatch that
    crosses ``deadline`` (a ``time.perf_counter`` value); None as soon as a loss is not
    finite. ``batches_fraction`` in the result says how much of the epoch ran (the fraction
    of its rows). With ``state.observed``, the missing entries of each minibatch are filled
    anew after its step (:func:`fill_missing`).

    Under data parallelism (``state.shard``) a minibatch is global: ``world_size`` times the
    batch size, each rank stepping on its part of it, and the ranks agree after every step on
    whether to go on (a loss not finite or the deadline on any rank ends the epoch on all).
    """
    step, optimizers, config = state.step, state.optimizers, state.config
    networks = state.networks if state.replicas is None else state.replicas
    data, observed, shard = state.data, state.observed, state.shard
    noise = state.generator if shard is None else GlobalMinibatch(state.generator, shard)
    batch_rows = config.batch_size * (1 if shard is None else shard.world_size)
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    rows_done = 0
    for batch, rows in _global_minibatches(state, batch_rows):
        part = batch if rows is None else rows
        size = len(part)
        if shard is not None:
            if size < shard.world_size:  # a remainder too small to give every rank a row
                break
            noise.begin(size)
            part = shard.part(part)
        x = data[part] if rows is None else part.to(
            next(state.networks.parameters()).device, memory_format=_layout(networks))
        if observed is None:
            metrics = step(networks, optimizers, x, config, noise)
        else:
            metrics = step(networks, optimizers, x, config, noise, observed[part])
            # every rank refills the whole global minibatch (the same rows, the same model),
            # so that each rank's copy of the data holds the fill whichever rank next reads it
            fill_missing(state.networks, data, observed, batch)
        finite = all(torch.isfinite(v) for v in metrics.values())
        late = deadline is not None and time.perf_counter() > deadline
        if shard is not None:
            failed, late = shard.agree(not finite, late)
            finite = not failed
        if not finite:
            return None
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
        rows_done += size
        if late:
            break
    out = {key: float(value) / counts[key] for key, value in totals.items()}
    out["batches_fraction"] = rows_done / data.shape[0]
    return out


def use_training_layout(networks: Networks, data: torch.Tensor) -> torch.Tensor:
    """Switch the networks to the faster memory layout for training on ``data`` and return
    ``data`` in it: channels-last for images on CPU (oneDNN's preferred layout; measured +6%
    for the triangle step on 28x28, the VAE unchanged), unchanged otherwise."""
    if len(data.shape) != 4 or data.device.type != "cpu":
        return data
    networks.to(memory_format=torch.channels_last)
    if isinstance(data, SpilledRows):  # each minibatch is laid out as it is read
        return data
    return data.contiguous(memory_format=torch.channels_last)


def _layout(networks: Networks | Replicas) -> torch.memory_format:
    """The memory format minibatches read from disk take: the networks' training layout."""
    weight = next(unwrapped(networks.encoder).parameters())
    if weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def train_networks(
    networks: Networks,
    data: torch.Tensor | SpilledRows,
    config: TrainConfig,
    *,
    generator: torch.Generator | None = None,
    callbacks: Sequence[EpochCallback] = (),
    verbose: int = 0,
    checkpointer: Checkpointer | None = None,
    observed: torch.Tensor | None = None,
    shard: Shard | None = None,
) -> TrainingHistory:
    """Train ``networks`` in place on preprocessed ``data`` ``(n, ...)``: a tensor already on
    the device, or :class:`training.streaming.SpilledRows` read from disk a window at a time
    (each minibatch is moved to the networks' device; missing entries are not supported).

    ``observed`` (bool, shape of ``data``) marks the entries that were seen: the losses'
    reconstruction terms count those only, and the others, which ``data`` must hold finite
    (any start, e.g. 0), are refilled in place by the model's reconstruction after every
    minibatch (:func:`fill_missing`); the encoder and the critic see the completed rows.

    After each epoch the metrics are checked; an epoch that produced a non-finite loss or
    parameter is undone (networks, optimizers and schedules restored to the last good epoch)
    and retried with half the learning rates. After ``config.max_rollbacks`` such retries
    :class:`TrainingDivergedError` is raised, so a model that scores NaN is never returned.
    ``callbacks`` are called as ``callback(epoch, metrics)`` after every good epoch.
    With ``observed``, ``config.epochs`` counts passes of observed entries: the loop makes
    :func:`epochs_for_observed` passes over the data.
    With ``checkpointer``, the whole training state is written every ``checkpointer.every``
    epochs, and a fit asked to resume continues from the last checkpoint: on the same device
    it then ends with the same networks as a fit that was never interrupted.

    With ``shard`` (this process's place in a ``torch.distributed`` group, see
    :mod:`training.distributed`), every rank calls this on the same ``data`` and ``generator``
    state; ``config.batch_size`` is each rank's part of a global minibatch of
    ``world_size * batch_size`` rows, gradients are averaged over the ranks by
    ``DistributedDataParallel``, and all ranks end with the same networks. Rank 0 alone
    writes checkpoints, shows progress and calls ``callbacks``. A ``trim_fraction`` leaves
    out the worst rows of the global minibatch, as one process would.
    """
    if (config.objective == "triangle") != (networks.energy is not None):
        raise ValueError("the triangle objective needs an energy network; the VAE has none")
    if isinstance(data, SpilledRows) and observed is not None:
        raise ValueError("rows read from disk cannot have missing entries refilled")
    step = select_step(config)
    data = use_training_layout(networks, data)
    if observed is not None:
        observed = observed.reshape(data.shape)
        config = replace(config, epochs=epochs_for_observed(config.epochs, observed))
    if shard is not None and data.shape[0] < shard.world_size:
        raise ValueError(f"{data.shape[0]} training rows cannot be shared among "
                         f"{shard.world_size} processes")
    optimizers = Optimizers.create(networks, config)
    state = _TrainingState(
        networks=networks, optimizers=optimizers,
        schedulers=[torch.optim.lr_scheduler.ExponentialLR(o, config.lr_decay)
                    for o in optimizers.all()],
        step=step, data=data, config=config, generator=generator, history=TrainingHistory(),
        observed=observed, checkpointer=checkpointer, shard=shard,
        replicas=None if shard is None else Replicas.wrap(networks))
    resumed = checkpointer.load() if checkpointer is not None else None
    if resumed is not None:
        state.resume(resumed)
        logger.info("resuming from %s after epoch %d", checkpointer.path,
                    len(state.history.epochs))
    try:
        _train_epochs(state, callbacks, verbose)
    finally:
        # The DDP wrappers' gradient hooks go with them; the networks stay.
        state.replicas = None
        # Fitted models keep the default layout: it is what save, export and scoring expect.
        networks.to(memory_format=torch.contiguous_format)
        networks.train(False)
    return state.history


def epochs_for_observed(epochs: int, observed: torch.Tensor) -> int:
    """Passes over the data that show the networks as many observed entries as ``epochs``
    passes over complete rows: ``ceil(epochs / observed share)``, in integers so that a share
    that divides ``epochs`` exactly gets no extra pass. A row with a third of its entries
    missing carries less per pass, and its fill (refilled once per visit) needs visits to
    settle (README, missing values: 43 passes instead of 30 at 30% missing gained 0.009
    AUROC, 60 no more)."""
    n_observed = int(observed.sum())
    if n_observed == 0:
        raise ValueError("no entry of the training data is observed")
    return -(-epochs * observed.numel() // n_observed)


def _train_epochs(state: _TrainingState, callbacks: Sequence[EpochCallback],
                  verbose: int) -> None:
    networks, optimizers, config, history = (
        state.networks, state.optimizers, state.config, state.history)
    networks.train()
    good = state.snapshot()
    epoch = len(history.epochs)  # > 0 when resuming
    progress = tqdm(total=config.epochs, initial=epoch, desc=f"training ({config.objective})",
                    disable=verbose == 0 or not state.is_main, leave=False)
    deadline = (None if config.max_training_seconds is None
                else time.perf_counter() + config.max_training_seconds)
    while epoch < config.epochs:
        started = time.perf_counter()
        metrics = _run_epoch(state, deadline)
        finite_params = metrics is not None and all(
            torch.isfinite(p).all() for p in networks.parameters())
        if not finite_params:
            history.rollbacks += 1
            if history.rollbacks > config.max_rollbacks:
                progress.close()
                raise TrainingDivergedError(
                    f"training diverged at epoch {epoch + 1}: losses stayed non-finite after "
                    f"{config.max_rollbacks} rollbacks with halved learning rates; lower the "
                    "learning rates or raise decoder_sigma"
                )
            logger.warning("non-finite loss at epoch %d: rolling back, halving learning rates",
                           epoch + 1)
            # The restored state holds the last good epoch's rates; halving the rates in force
            # instead lets repeated rollbacks go on lowering them (lr/2, lr/4, ...).
            rates = optimizers.learning_rates()
            state.restore(good)
            optimizers.set_learning_rates([0.5 * rate for rate in rates])
            continue
        for scheduler in state.schedulers:
            scheduler.step()
        metrics["seconds"] = time.perf_counter() - started
        metrics["epoch"] = epoch + 1
        history.epochs.append(metrics)
        good = state.snapshot()
        if state.is_main and state.checkpointer is not None and (
                (epoch + 1) % state.checkpointer.every == 0 or epoch + 1 == config.epochs):
            state.save_checkpoint(good)
        for callback in callbacks if state.is_main else ():
            callback(epoch + 1, metrics)
        logger.debug("epoch %d: %s", epoch + 1, metrics)
        progress.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()
                              if k in ("reconstruction", "energy_gap", "encoder_variance")})
        progress.update(1)
        epoch += 1
        late = deadline is not None and time.perf_counter() > deadline
        if state.shard is not None:
            (late,) = state.shard.agree(late)
        if late:
            logger.info("time budget of %.0f s reached in epoch %d", config.max_training_seconds,
                        epoch)
            break
    progress.close()
