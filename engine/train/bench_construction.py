"""``dv3 bench construction``: per-rank peak host memory while the model is built, whole or
partitioned under ZeRO-3 (``deepspeed.zero.Init``), on several ranks of this machine.

Each (preset, way) pair runs in fresh processes (``torch.distributed.run``), since a process's
peak memory never goes down: every rank records its resident memory before building and its
peak after, and the benchmark reports the largest rank's figures and the ratio partitioned /
whole. The model is dv3's RTD model (generator + discriminator + E_Delta) at the preset's
vocabulary, built by the trainer's own ``construct``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from engine.config import PRESETS

WAYS = ("whole", "partitioned")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="model preset (repeat; default: large and mbase)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default: %(default)s)")
    parser.add_argument("--deepspeed-config", default="ds_configs/zero3_bf16.json",
                        help="the ZeRO-3 config zero.Init reads (default: %(default)s)")
    parser.add_argument("--output", help="JSON file to write (default: print only)")


def measuring_environment() -> dict[str, str]:
    """glibc's malloc raises its mmap threshold each time it frees a large block, after which
    freed tensors stay in the process's heap: the peak would then measure the allocator's habits,
    not what construction needs. A fixed threshold returns every large block when it is freed
    (both ways of building are measured so)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}


def resident_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def worker(preset: str, way: str, ds_path: str, output: Path) -> None:
    """One rank: build the model one way and write this rank's memory figures."""
    import torch

    from engine.config import RTDConfig, RunConfig
    from engine.config.run import ModelSection, TrainSection
    from engine.model import RTDModel
    from engine.train import distributed
    from engine.train.parallel import construct

    env = distributed.discover()
    distributed.init_process_group(env)
    config = RunConfig(model=ModelSection(preset=preset), rtd=RTDConfig(),
                       train=TrainSection(micro_batch=1, global_batch=env.world_size, deepspeed_config=ds_path))
    ds_config = config.deepspeed_config(env.world_size, torch.cuda.is_available())
    before = resident_gib()
    model = construct(lambda: RTDModel(config.encoder_config(), config.rtd), ds_config, partitioned=way == "partitioned")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    (output / f"{preset}-{way}-rank{env.rank}.json").write_text(json.dumps(
        {"rank": env.rank, "before_gib": before, "peak_gib": peak, "after_gib": resident_gib(),
         "parameters": parameters}))
    distributed.shutdown()


def run(args: argparse.Namespace) -> int:
    presets = args.preset or ["large", "mbase"]
    report = {"benchmark": "dv3 bench construction", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "ranks": args.nproc,
              "deepspeed_config": args.deepspeed_config, "environment": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
              "figures": "per rank, GiB of host memory: resident before building, peak while building; the rank "
                         "with the largest peak", "results": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for preset in presets:
            entry = {}
            for way in WAYS:
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                           "--master_port", str(29400 + os.getpid() % 500), "-m", "engine.train.bench_construction",
                           preset, way, args.deepspeed_config, scratch]
                result = subprocess.run(command, capture_output=True, text=True, env=measuring_environment())
                if result.returncode != 0:
                    print(result.stderr[-3000:], file=sys.stderr)
                    return result.returncode
                ranks = [json.loads(Path(scratch, f"{preset}-{way}-rank{r}.json").read_text()) for r in range(args.nproc)]
                worst = max(ranks, key=lambda r: r["peak_gib"])
                entry[way] = {**worst, "growth_gib": worst["peak_gib"] - worst["before_gib"]}
                print(f"{preset:>6} {way:>11}: peak {worst['peak_gib']:.2f} GiB per rank (before building "
                      f"{worst['before_gib']:.2f}, +{entry[way]['growth_gib']:.2f}); "
                      f"{worst['parameters'] / 1e6:.0f}M parameters", flush=True)
            entry["peak_ratio"] = entry["partitioned"]["peak_gib"] / entry["whole"]["peak_gib"]
            entry["growth_ratio"] = entry["partitioned"]["growth_gib"] / entry["whole"]["growth_gib"]
            print(f"{preset:>6} partitioned / whole: peak {entry['peak_ratio']:.2f}, growth while building "
                  f"{entry['growth_ratio']:.2f}")
            report["results"][preset] = entry
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # a rank of one measurement (started by run())
    worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
