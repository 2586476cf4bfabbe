"""Where the randomness that a DP guarantee rests on comes from: secret on the campus, unless a researcher asks otherwise.

Two things must stay unpredictable to the coordinator for the accounted ε to
hold against it: the Gaussian noise (DP-SGD steps and DP statistics), which it
could otherwise recompute and subtract, and, for DP-SGD, the Poisson sampling
of each batch, which privacy amplification by subsampling assumes hidden
(Abadi et al., CCS 2016; Mironov, Talwar and Zhang 2019). Neither may be
derived from anything in the run config (such as its ``seed``), the round or
the campus name.

:data:`SECRET` (every campus run under a policy; the default everywhere):

* DP-SGD noise: AES-128 in counter mode (the block cipher of NIST SP 800-90A's
  CTR_DRBG) keyed with 128 bits from the operating system's CSPRNG
  (:func:`secrets.randbits`, ``getrandom(2)``) for every release, through
  randomgen's ``AESCounter`` bit generator (AES-NI where the CPU has it) and
  NumPy's normal sampler. Each noise value is the sum of four such normals halved, the
  defence against floating-point attacks that Opacus's ``secure_mode`` uses
  (Holohan and Braghin, "Secure Random Sampling in Differential Privacy",
  ESORICS 2021, section 5.1). Opacus's own route, torchcsprng, has no build for
  torch 2.13; torch's CPU generator is a Mersenne Twister, not a CSPRNG.
* DP-SGD batch sampling: a torch generator (the type Opacus's Poisson sampler
  takes) seeded with 63 bits from the same AES-CTR stream; its outputs are
  never released.
* DP statistics: OpenDP's Gaussian mechanism (``make_gaussian``), which
  samples exactly from its own CSPRNG and is safe against floating-point
  attacks (:func:`add_gaussian`).

Keys and seeds live only in memory for one release: no reply, log or ledger
row holds them.

:class:`Randomness` with a ``seed`` (research only, ``reproducible-noise``):
noise and sampling follow the seed, so a run can be repeated bit for bit, and
so can the coordinator, which knows the seed: such a run is not private
against it. Every output of such a run says so (:data:`REPRODUCIBLE_WARNING`),
and every campus policy refuses it.
"""

from __future__ import annotations

import math
import secrets
import zlib
from dataclasses import dataclass

import numpy as np
from randomgen import AESCounter

__all__ = ["REPRODUCIBLE_WARNING", "SECRET", "Randomness", "add_gaussian", "gaussian", "round_seed"]

REPRODUCIBLE_WARNING = "noise reproducible: not private against the coordinator"
"""The mark every output of a run with reproducible noise carries."""


@dataclass(frozen=True)
class Randomness:
    """The source of one release's DP noise and Poisson sampling.

    ``seed`` None: secret (see the module docstring). An int: reproducible from
    it, for research runs only.
    """

    seed: int | None = None

    @property
    def reproducible(self) -> bool:
        return self.seed is not None

    def generator(self) -> np.random.Generator:
        """A NumPy generator for one release: a fresh AES-128 CTR key from OS entropy (secret), or PCG64 from ``seed``."""
        if self.seed is None:
            return np.random.Generator(AESCounter(key=secrets.randbits(128)))
        return np.random.Generator(np.random.PCG64(self.seed))


SECRET = Randomness()


def round_seed(seed: int, campus: str, server_round: int) -> int:
    """A seed for one campus's local training in one round, from the run's ``seed``: distinct per campus and
    round, and public (anyone with the run config can compute it). It orders plain SGD's batches, and under
    ``reproducible-noise`` only, seeds DP noise and sampling (``Randomness(round_seed(...))``)."""
    return (seed * 1_000_003 + server_round * 1009 + zlib.crc32(campus.encode())) % 2**31


def gaussian(rng: np.random.Generator, std: float, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Normal noise of standard deviation ``std``, one float64 array for each of ``shapes``: each value the sum
    of four standard normals from ``rng`` halved, then scaled (Holohan and Braghin 2021, as Opacus's
    ``secure_mode``). The normals come from one draw, in the order of ``shapes`` (the stream of drawing
    ``(4, *shape)`` for each shape in turn), which saves a call into ``rng`` per shape."""
    normals = rng.standard_normal(4 * sum(math.prod(shape) for shape in shapes))
    noises, start = [], 0
    for shape in shapes:
        end = start + 4 * math.prod(shape)
        noises.append(normals[start:end].reshape(4, *shape).sum(axis=0) * (std / 2.0))
        start = end
    return noises


def add_gaussian(values: np.ndarray, sensitivity: float, std: float, randomness: Randomness = SECRET) -> tuple[np.ndarray, float]:
    """``values`` (a vector, shape (n,)) plus Gaussian noise of standard deviation ``std`` on each entry.

    Secret randomness: OpenDP's ``make_gaussian`` over float vectors with L2
    sensitivity ``sensitivity`` (its own CSPRNG, exact sampling); reproducible
    randomness (tests, research): NumPy normals from the seed. Returns the noisy
    vector and the mechanism's zero-concentrated DP ρ at that sensitivity, as
    OpenDP's privacy map states it, ``sensitivity² / (2 std²)`` (Bun and
    Steinke, TCC 2016): Rényi DP α·ρ at every order α, which the ledger's
    Gaussian entry ``(z = std / sensitivity, q = 1, one step)`` accounts exactly.

    Raises
    ------
    ValueError
        Unless ``std`` and ``sensitivity`` are finite and > 0 and ``values`` are finite.
    """
    if not (np.isfinite(std) and std > 0 and np.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"std {std!r} and sensitivity {sensitivity!r} must be finite numbers > 0")
    x = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError("the values to noise must be finite")
    if randomness.reproducible:
        return x + randomness.generator().normal(0.0, std, x.shape), sensitivity**2 / (2 * std**2)
    import opendp.prelude as dp  # loaded where a campus answers a statistic

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=len(x)), dp.l2_distance(T=float)
    measurement = dp.m.make_gaussian(*space, scale=float(std))
    return np.asarray(measurement(x.tolist()), dtype=float), float(measurement.map(float(sensitivity)))  # type: ignore[no-untyped-call]
