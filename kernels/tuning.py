"""Tile configurations for the fused kernels: bounded candidates, length buckets, a JSON cache.

Each pass (``forward``, ``backward_dq``, ``backward_dkv``) picks its own tile shape. The
choice is keyed by GPU name, pass, dtype, head dim, sequence-length bucket (the next power
of two, so a new length rarely means a new search) and the kernel's flags; sequence length
itself is not a compile-time constant, so lengths in one bucket share compiled kernels.

* Under ``TRITON_INTERPRET=1`` one small fixed config is used (no timing in the interpreter).
* Otherwise the first call for a key times every candidate that fits the GPU (a handful,
  filtered by shared memory) on the real inputs, keeps the fastest, and writes it to
  ``$DV3_KERNEL_CACHE`` (default ``~/.cache/dv3/kernel_configs.json``), so later runs
  skip the search. ``DV3_KERNEL_AUTOTUNE=0`` uses the first candidate without timing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from kernels.config import PHASES, KernelConfig, band_rows, interpreter_active

__all__ = ["PHASES", "ConfigCache", "KernelConfig", "Tuner", "FixedTuner", "candidate_configs", "length_bucket", "tuner_for"]

logger = logging.getLogger(__name__)

# The interpreter runs each program in numpy: larger tiles mean fewer Python-level steps.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# Candidates per pass, best guess first, kept short (each one is a compile and a timing).
# Chosen from `python -m kernels.compile_report` (sm_90, ptxas -v): band tiles hold two
# [tile, BAND] fp32 products and the backward also dS and its slot reduction, so at
# 16-bit D<=64 these spill nothing or a few bytes, while 4-warp 64x64 tiles spill 0.7-5 KB.

# Operands twice as wide (head dim 128, or fp32 with exact ieee dots): the smallest tiles that
# still use the tensor cores.
_SMALL_TILES = (
    KernelConfig(32, 32, 8, 1),
    KernelConfig(32, 16, 4, 1),
    KernelConfig(16, 32, 4, 1),
)
_CANDIDATES: dict[tuple[str, str], tuple[KernelConfig, ...]] = {
    ("forward", "half"): (
        KernelConfig(64, 32, 8, 2),
        KernelConfig(32, 64, 8, 2),
        KernelConfig(64, 64, 8, 2),
        KernelConfig(64, 64, 8, 3),
        KernelConfig(32, 32, 4, 2),
    ),
    ("backward", "half"): (
        KernelConfig(32, 32, 8, 1),
        KernelConfig(64, 32, 8, 1),
        KernelConfig(32, 64, 8, 1),
        KernelConfig(64, 64, 8, 1),
        KernelConfig(32, 32, 4, 1),
    ),
    # Head dim 128's forward still has room for a second stage and 64-wide tiles.
    ("forward", "half-d128"): (
        KernelConfig(32, 32, 8, 2),
        KernelConfig(32, 64, 8, 2),
        KernelConfig(64, 32, 8, 1),
    ),
    ("backward", "half-d128"): _SMALL_TILES,
    ("forward", "fp32"): _SMALL_TILES,
    ("backward", "fp32"): _SMALL_TILES,
}


def length_bucket(length: int) -> int:
    """Next power of two >= ``length`` (at least 64): the tuning key's length."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    bucket = 64
    while bucket < length:
        bucket *= 2
    return bucket


def _estimated_shared_bytes(config: KernelConfig, head_dim: int, band: int, element: int) -> int:
    # Operand tiles of the dots (q, k, v, the two bands) staged per pipeline stage, plus the
    # fp32 band products the gathers read: a rough bound used only to drop hopeless configs.
    tiles = (config.block_m + 2 * config.block_n + 2 * band) * head_dim * element
    gathers = (config.block_m + config.block_n) * band * 4
    return tiles * max(config.num_stages, 1) + gathers


def candidate_configs(phase: str, head_dim: int, dtype: torch.dtype, band_of: Callable[[int, int], int], device) -> list[KernelConfig]:
    """The candidates for ``phase`` that fit this GPU's shared memory (at least one)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    family = "fp32" if dtype == torch.float32 else ("half-d128" if head_dim > 64 else "half")
    candidates = _CANDIDATES[("forward" if phase == "forward" else "backward", family)]
    limit = None
    if torch.cuda.is_available() and getattr(device, "type", str(device)) == "cuda":
        limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    element = 4 if dtype == torch.float32 else 2
    fitting = [
        config for config in candidates
        if limit is None or _estimated_shared_bytes(config, head_dim, band_of(config.block_m, config.block_n), element) <= limit
    ]
    return fitting or [candidates[-1]]


def default_cache_path() -> Path:
    override = os.environ.get("DV3_KERNEL_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dv3" / "kernel_configs.json"


class ConfigCache:
    """Chosen configs by key, persisted as one JSON object (written atomically)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_cache_path()
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
                if not isinstance(self._entries, dict):
                    raise ValueError("top level is not an object")
            except FileNotFoundError:
                self._entries = {}
            except (OSError, ValueError) as error:
                logger.warning("ignoring unreadable kernel config cache %s: %s", self.path, error)
                self._entries = {}
        return self._entries

    def get(self, key: str) -> KernelConfig | None:
        with self._lock:
            entry = self._load().get(key)
        if entry is None:
            return None
        try:
            return KernelConfig(**{name: int(entry[name]) for name in ("block_m", "block_n", "num_warps", "num_stages")})
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("ignoring bad cache entry %s: %s", key, error)
            return None

    def put(self, key: str, config: KernelConfig, milliseconds: float) -> None:
        with self._lock:
            entries = self._load()
            entries[key] = {**asdict(config), "ms": round(milliseconds, 4)}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
                    json.dump(entries, handle, indent=1, sort_keys=True)
                os.replace(handle.name, self.path)
            except OSError as error:
                logger.warning("could not write kernel config cache %s: %s", self.path, error)


def tuning_key(phase: str, q: torch.Tensor, layout, has_mask: bool, dropout: bool, geometry) -> str:
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else "cpu"
    return "|".join(
        [
            name,
            phase,
            str(q.dtype).removeprefix("torch."),
            f"d{layout.head_dim}",
            f"L{length_bucket(layout.max_len)}",
            "varlen" if layout.varlen else ("mask" if has_mask else "dense"),
            f"drop{int(dropout)}",
            f"pb{geometry.position_buckets}",
            f"mp{geometry.max_relative_positions}",
        ]
    )


class Tuner:
    """Picks (and remembers) the config of each pass; called by the launchers in ``kernels.fused``."""

    def __init__(self, cache: ConfigCache | None = None) -> None:
        self.cache = cache
        self._memory: dict[str, KernelConfig] = {}

    def __call__(self, phase, q, layout, has_mask, dropout, geometry, launch: Callable[[KernelConfig], None]) -> KernelConfig:
        if interpreter_active() or q.device.type != "cuda":
            return INTERPRETER_CONFIG
        key = tuning_key(phase, q, layout, has_mask, dropout, geometry)
        if key in self._memory:
            return self._memory[key]
        cache = self.cache if self.cache is not None else _shared_cache()
        config = cache.get(key)
        if config is None:
            config, milliseconds = self._search(phase, q, layout, geometry, launch)
            if milliseconds is not None:
                cache.put(key, config, milliseconds)
        self._memory[key] = config
        return config

    @staticmethod
    def _search(phase, q, layout, geometry, launch) -> tuple[KernelConfig, float | None]:
        candidates = candidate_configs(phase, layout.head_dim, q.dtype, lambda m, n: band_rows(geometry, m, n), q.device)
        if os.environ.get("DV3_KERNEL_AUTOTUNE", "1").strip() == "0":
            return candidates[0], None
        import triton.testing

        timings: list[tuple[float, KernelConfig]] = []
        for config in candidates:
            try:
                milliseconds = triton.testing.do_bench(lambda config=config: launch(config), warmup=5, rep=20, return_mode="median")
            except Exception as error:  # a config the compiler rejects (resources) is skipped
                logger.info("kernel config %s rejected for %s: %s", config, phase, str(error).splitlines()[0][:200])
                continue
            timings.append((milliseconds, config))
        if not timings:
            raise RuntimeError(f"no kernel config compiled for {phase} (head_dim={layout.head_dim}, dtype={q.dtype})")
        milliseconds, config = min(timings, key=lambda item: item[0])
        logger.info("tuned %s: %s at %.3f ms", phase, config, milliseconds)
        return config, milliseconds


class FixedTuner:
    """Every pass uses one given config (tests, benchmarks of a single shape)."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config

    def __call__(self, phase, q, layout, has_mask, dropout, geometry, launch) -> KernelConfig:
        return self.config


_SHARED: dict[str, object] = {}


def _shared_cache() -> ConfigCache:
    path = default_cache_path()
    cache = _SHARED.get(str(path))
    if cache is None:
        cache = _SHARED[str(path)] = ConfigCache(path)
    return cache  # type: ignore[return-value]


_DEFAULT_TUNER = Tuner()


def tuner_for(config: KernelConfig | None) -> Callable:
    """The tuner a call uses: fixed when a config is given, else the process-wide one."""
    return FixedTuner(config) if config is not None else _DEFAULT_TUNER
