"""Counter-based random streams: every random draw is a pure function of (seed, stream, step).

This makes a run independent of the process count (every rank draws the GLOBAL batch's noise and keeps its
slice) and makes resume exact without saving any RNG state (the step counter is the state).
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("init", "critic_z", "generator_z", "penalty", "flip", "data_order", "sample_z", "eval",
           "augment_critic", "augment_generator", "augment_heldout", "heldout_batch")  # fmt: skip


def stream_seed(seed: int, stream: str, step: int = 0) -> int:
    """A 63-bit seed for draw `step` of `stream`, decorrelated across streams and steps by hashing."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}")
    digest = hashlib.blake2b(f"{seed}/{stream}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Streams:
    """One torch.Generator per (stream, device), re-seeded for each draw; `get` is cheap enough per step."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[tuple[str, str], torch.Generator] = {}

    def get(self, stream: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        key = (stream, str(device))
        generator = self._generators.get(key)
        if generator is None:
            generator = self._generators[key] = torch.Generator(device=device)
        generator.manual_seed(stream_seed(self.seed, stream, step))
        return generator

    def normal(self, stream: str, step: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        return torch.randn(shape, generator=self.get(stream, step, device), device=device)
