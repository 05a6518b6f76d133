"""Tile configurations for the fused kernels: bounded candidates, length buckets, a JSON cache.

Each pass (``forward``, ``backward_dq``, ``backward_dkv``) picks its own tile shape. The
choice is keyed by GPU name, pass, dtype, head dim, sequence-length bucket (the next power
of two, so a new length rarely means a new search) and the kernel's flags; sequence length
itself is not a compile-time constant, so lengths in one bucket share compiled kernels.

* Under ``TRITON_INTERPRET=1`` one small fixed config is used (no timing in the interpreter).
* Otherwise the first call for a key times every candidate (a handful; one the compiler
  rejects for its registers or shared memory is skipped) on the real inputs, keeps the fastest, and writes it to
  ``$DV3_KERNEL_CACHE`` (default ``~/.cache/dv3/kernel_configs.json``), so later runs
  skip the search. ``DV3_KERNEL_AUTOTUNE=0`` uses the first candidate without timing.
* The backward has two variants (``kernels.config.BACKWARD_VARIANTS``). ``DV3_KERNEL_BACKWARD``
  (or the ``backward=`` argument of the fused entry points) forces one; ``auto`` (default) times
  both on the GPU, each with its own tuned configs, and caches the faster per key. Without a
  GPU measurement (interpreter, ``DV3_KERNEL_AUTOTUNE=0``) the first, ``slices``, is used.
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

from kernels.config import BACKWARD_VARIANTS, PHASES, KernelConfig, interpreter_active

__all__ = [
    "BACKWARD_VARIANTS", "PHASES", "ConfigCache", "FixedTuner", "KernelConfig", "Tuner", "backward_from_env",
    "candidate_configs", "length_bucket", "tuner_for",
]

logger = logging.getLogger(__name__)

# The interpreter runs each program in numpy: larger tiles mean fewer Python-level steps.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# Candidates per pass, best guess first, kept short (each one is a compile and a timing on the
# GPU). Chosen from `python -m kernels.compile_report` (sm_90, specialised as a launch is; the
# figures are in benchmarks/results/compile/): no spills, >= 2 stages where K/V (or Q/dO) are
# streamed, wgmma where the tile has 64 rows per warpgroup.
_PHASE_GROUP = {
    "forward": "forward",
    "backward_dq": "slices",
    "backward_dkv": "slices",
    "backward_band_dq": "band",
    "backward_far_dq": "far_dq",
    "backward_band_dkv": "band",
    "backward_far_dkv": "far_dkv",
}

# Operands twice as wide (head dim 128, or fp32 with exact ieee dots): the smallest tiles that
# still use the tensor cores.
_SMALL_TILES = (
    KernelConfig(32, 32, 8, 1),
    KernelConfig(32, 16, 4, 1),
    KernelConfig(16, 32, 4, 1),
)
_CANDIDATES: dict[tuple[str, str], tuple[KernelConfig, ...]] = {
    # 64 query rows per warpgroup: wgmma throughout; 64x64 holds 255 registers without spilling.
    ("forward", "half"): (
        KernelConfig(64, 32, 8, 2),
        KernelConfig(64, 32, 8, 3),
        KernelConfig(64, 64, 8, 2),
    ),
    # The first backward: only 32x32 tiles keep its band math in registers (64-row tiles spill
    # 200-500 bytes); the second stage pipelines the streamed tiles at no register cost.
    ("slices", "half"): (
        KernelConfig(32, 32, 8, 2),
        KernelConfig(32, 32, 8, 1),
    ),
    # Band kernels of the split backward: 32x32 is spill-free (mma.sync for the 32-row dots);
    # 64x32 uses wgmma but spills about 100 bytes. The GPU decides.
    ("band", "half"): (
        KernelConfig(32, 32, 8, 2),
        KernelConfig(32, 32, 8, 3),
        KernelConfig(64, 32, 8, 2),
    ),
    # Far kernels: flash-attention backward with a rank-1 bias. dQ owns 128 rows (wgmma, no spill).
    ("far_dq", "half"): (
        KernelConfig(128, 64, 8, 2),
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 32, 8, 3),
        KernelConfig(64, 64, 4, 3),
    ),
    # dK/dV owns 128 key columns and streams 32 query rows (as Triton's fused-attention tutorial
    # does); 64x64 uses wgmma for every dot but spills about 270 bytes.
    ("far_dkv", "half"): (
        KernelConfig(32, 128, 8, 3),
        KernelConfig(32, 128, 8, 2),
        KernelConfig(64, 64, 8, 3),
    ),
    # Head dim 128's forward still has room for a second stage and 64-wide tiles.
    ("forward", "half-d128"): (
        KernelConfig(32, 32, 8, 2),
        KernelConfig(32, 64, 8, 2),
        KernelConfig(64, 32, 8, 1),
    ),
    ("slices", "half-d128"): _SMALL_TILES,
    ("band", "half-d128"): _SMALL_TILES,
    ("far_dq", "half-d128"): (KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2)),
    ("far_dkv", "half-d128"): (KernelConfig(64, 64, 8, 2), KernelConfig(32, 64, 4, 2)),
    ("forward", "fp32"): _SMALL_TILES,
    ("slices", "fp32"): _SMALL_TILES,
    ("band", "fp32"): _SMALL_TILES,
    ("far_dq", "fp32"): _SMALL_TILES,
    ("far_dkv", "fp32"): _SMALL_TILES,
}


def length_bucket(length: int) -> int:
    """Next power of two >= ``length`` (at least 64): the tuning key's length."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    bucket = 64
    while bucket < length:
        bucket *= 2
    return bucket


def candidate_configs(phase: str, head_dim: int, dtype: torch.dtype) -> list[KernelConfig]:
    """The candidates for ``phase``. One that does not fit the GPU fails to compile and the search skips it."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    family = "fp32" if dtype == torch.float32 else ("half-d128" if head_dim > 64 else "half")
    return list(_CANDIDATES[(_PHASE_GROUP[phase], family)])


def backward_from_env() -> str:
    """The ``DV3_KERNEL_BACKWARD`` setting (``auto`` or a variant), validated."""
    value = os.environ.get("DV3_KERNEL_BACKWARD", "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKWARD_VARIANTS:
        raise ValueError(f"DV3_KERNEL_BACKWARD={value!r} is not one of auto, {', '.join(BACKWARD_VARIANTS)}")
    return value


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

    def get_choice(self, key: str) -> str | None:
        """A remembered choice among named alternatives (the backward variant)."""
        with self._lock:
            entry = self._load().get(key)
        choice = entry.get("choice") if isinstance(entry, dict) else None
        return choice if choice in BACKWARD_VARIANTS else None

    def put(self, key: str, config: KernelConfig, milliseconds: float) -> None:
        self._write(key, {**asdict(config), "ms": round(milliseconds, 4)})

    def put_choice(self, key: str, choice: str, milliseconds: dict[str, float]) -> None:
        self._write(key, {"choice": choice, "ms": {name: round(ms, 4) for name, ms in milliseconds.items()}})

    def _write(self, key: str, entry: dict) -> None:
        with self._lock:
            entries = self._load()
            entries[key] = entry
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

    def __init__(self, cache: ConfigCache | None = None, backward: str | None = None) -> None:
        self.cache = cache
        self.backward = backward
        self._memory: dict[str, KernelConfig] = {}
        self._variants: dict[str, str] = {}

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

    def backward_variant(self, q, layout, has_mask, dropout, geometry, run: Callable[[str], object]) -> str:
        """The backward variant: forced, remembered, or the faster of the two by measured time on this GPU."""
        forced = self.backward or backward_from_env()
        if forced != "auto":
            return forced
        if interpreter_active() or q.device.type != "cuda" or os.environ.get("DV3_KERNEL_AUTOTUNE", "1").strip() == "0":
            return BACKWARD_VARIANTS[0]
        key = tuning_key("backward_variant", q, layout, has_mask, dropout, geometry)
        if key in self._variants:
            return self._variants[key]
        cache = self.cache if self.cache is not None else _shared_cache()
        choice = cache.get_choice(key)
        if choice is None:
            import triton.testing

            timings = {}
            for name in BACKWARD_VARIANTS:
                run(name)  # tunes this variant's own configs first
                timings[name] = triton.testing.do_bench(lambda name=name: run(name), warmup=5, rep=20, return_mode="median")
            choice = min(timings, key=timings.get)
            logger.info("backward variant: %s (%s)", choice, ", ".join(f"{n} {ms:.3f} ms" for n, ms in timings.items()))
            cache.put_choice(key, choice, timings)
        self._variants[key] = choice
        return choice

    @staticmethod
    def _search(phase, q, layout, geometry, launch) -> tuple[KernelConfig, float | None]:
        candidates = candidate_configs(phase, layout.head_dim, q.dtype)
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
    """Given configs, no search (tests, benchmarks of a single shape): one for every pass, or one per phase."""

    def __init__(self, config: KernelConfig | dict[str, KernelConfig], backward: str | None = None) -> None:
        if isinstance(config, dict):
            unknown = set(config) - set(PHASES)
            if unknown or not config:
                raise ValueError(f"per-phase configs need phases from {PHASES}, got {sorted(config)}")
        self.config = config
        self.backward = backward

    def __call__(self, phase, q, layout, has_mask, dropout, geometry, launch) -> KernelConfig:
        if isinstance(self.config, dict):
            return self.config.get(phase) or next(iter(self.config.values()))
        return self.config

    def backward_variant(self, q, layout, has_mask, dropout, geometry, run) -> str:
        forced = self.backward or backward_from_env()
        return BACKWARD_VARIANTS[0] if forced == "auto" else forced


_SHARED: dict[str, object] = {}


def _shared_cache() -> ConfigCache:
    path = default_cache_path()
    cache = _SHARED.get(str(path))
    if cache is None:
        cache = _SHARED[str(path)] = ConfigCache(path)
    return cache  # type: ignore[return-value]


_DEFAULT_TUNER = Tuner()


def tuner_for(config: KernelConfig | dict[str, KernelConfig] | None, backward: str | None = None) -> Callable:
    """The tuner a call uses: fixed when a config is given, else the process-wide one (its backward variant forced if given)."""
    if backward is not None and backward not in BACKWARD_VARIANTS:
        raise ValueError(f"backward must be one of {BACKWARD_VARIANTS}, got {backward!r}")
    if config is not None:
        return FixedTuner(config, backward)
    return _DEFAULT_TUNER if backward is None else Tuner(backward=backward)
