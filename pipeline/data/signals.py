"""What a batch carries of the teacher at its targets: a typed signal, one of four kinds.

- `NoTeacher`: labels only (SFT): the loss is cross-entropy alone;
- `TopK(ids, logprobs)`, (M, N, k): each of M routing samples' top-k ids and
  log-probs, normalised over the whole vocabulary (a top-k cache, the
  teacher run online); the mass beyond them is what the losses' tail treats;
- `Dense(logprobs)`, (M, N, V): whole distributions (SAR's adapted teacher);
- `Sampled(ids, weights)`, (1, N, K): a sampled cache's distinct draws per
  target and their shares of the draws (0 on padding), which already mix
  the M samples.

Every signal is indexed by target on its second axis: `chunk` takes some
targets, `to` moves it to a device; `samples` is M. The losses take each kind
by its type (`student.losses.sample_mean_divergence`), as DistillKit's signal
sources are typed, instead of reading the kind from which fields are None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Signal:
    """A teacher signal: its tensors are its fields, each (samples, targets, ...)."""

    def to(self, device: torch.device) -> Signal:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self)})

    def chunk(self, targets: slice) -> Signal:
        """The signal at some of the targets."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[:, targets]
                                            for f in dataclasses.fields(self)})

    @property
    def samples(self) -> int:
        """M: the teacher samples it holds (1 where they are mixed; 0 without a teacher)."""
        fields = dataclasses.fields(self)
        return getattr(self, fields[0].name).shape[0] if fields else 0


@dataclass(frozen=True)
class NoTeacher(Signal):
    """No teacher: the batch's labels are all there is (SFT)."""


@dataclass(frozen=True)
class TopK(Signal):
    """Each sample's top-k at every target: ids (M, N, k) long, log-probs (M, N, k) float32 normalised over the
    vocabulary."""

    ids: Tensor
    logprobs: Tensor


@dataclass(frozen=True)
class Dense(Signal):
    """Each sample's whole distribution at every target: log-probs (M, N, V)."""

    logprobs: Tensor


@dataclass(frozen=True)
class Sampled(Signal):
    """Tokens drawn from the teacher (the mixture of its samples) at every target: the distinct ids drawn
    (1, N, K) long and their shares of the draws (1, N, K) float32, 0 on padding."""

    ids: Tensor
    weights: Tensor
