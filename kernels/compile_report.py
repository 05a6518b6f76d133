"""Compile the fused kernels for a GPU architecture without a GPU, and report their resources.

``python -m kernels.compile_report [--arch 90] [--dtype bfloat16] [--head-dim 64]`` compiles
the forward, dQ and dK/dV kernels for every tuning candidate (``kernels.tuning``) and
prints shared memory, registers and spill bytes from ``ptxas -v`` (the ptxas that ships
inside Triton). No device is needed, so this is the first check of a change to the kernels:
a config that spills hundreds of bytes per thread is unlikely to win on the GPU.
It must run without ``TRITON_INTERPRET`` (it is cleared here before Triton is imported).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.backward_kernels import backward_dkv_kernel, backward_dq_kernel  # noqa: E402
from kernels.config import FUSED_HEAD_DIMS, band_rows, dot_precision  # noqa: E402
from kernels.forward_kernel import forward_kernel  # noqa: E402
from kernels.relative_position import slot_geometry  # noqa: E402
from kernels.row_kernels import ROW_BLOCK, delta_kernel, edge_dots_kernel, keep_mask_kernel  # noqa: E402
from kernels.tuning import PHASES, KernelConfig, candidate_configs  # noqa: E402

KERNELS = {"forward": forward_kernel, "backward_dq": backward_dq_kernel, "backward_dkv": backward_dkv_kernel}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _ptxas() -> Path:
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas"))
    if not found:
        raise FileNotFoundError("ptxas not found inside the Triton package")
    return found[0]


def compile_one(phase: str, config: KernelConfig, dtype: torch.dtype, head_dim: int, arch: int,
                has_mask: bool = False, dropout: bool = False, position_buckets: int = 256,
                max_relative_positions: int = 512) -> dict:
    """Compile one kernel; returns shared bytes and ptxas' register and spill figures."""
    geometry = slot_geometry(position_buckets, max_relative_positions)
    kernel = KERNELS[phase]
    element = TRITON_TYPES[dtype]
    pointer_types = {
        name: f"*{element}" for name in ("Q", "K", "V", "KR", "QR", "OUT", "DO", "DQ", "DK", "DV")
    } | {name: "*fp32" for name in ("EDGE_Q", "EDGE_K", "LSE", "DELTA", "DKR_PART", "DQR_PART")} | {
        "MASK": "*i8", "CU": "*i32", "SLOT": "*i32", "FIRST": "*i32", "LAST": "*i32", "sm_scale": "fp32", "dropout_p": "fp32",
    }
    constants = dict(
        ROWS=geometry.rows, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BAND=band_rows(geometry, config.block_m, config.block_n), VARLEN=False, HAS_MASK=has_mask,
        DROPOUT=dropout, DOT_PRECISION=dot_precision(dtype),
    )
    signature = {name: "constexpr" if name in constants else pointer_types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(compiled.asm["ptx"])
    try:
        report = subprocess.run(
            [str(_ptxas()), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", handle.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr
    finally:
        os.unlink(handle.name)

    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {
        "phase": phase, "config": config, "band": constants["BAND"], "shared": compiled.metadata.shared,
        "registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def compile_helpers(dtype: torch.dtype, head_dim: int, arch: int) -> list[str]:
    """Compile the small kernels (edge dots, Delta, keep-mask); returns their names."""
    element = TRITON_TYPES[dtype]
    helpers = (
        (edge_dots_kernel, {"X": f"*{element}", "TABLE": f"*{element}", "EDGE": "*fp32"},
         {"ROWS": 512, "HEAD_DIM": head_dim, "BLOCK_R": ROW_BLOCK, "VARLEN": True}),
        (delta_kernel, {"OUT": f"*{element}", "DO": f"*{element}", "DELTA": "*fp32"},
         {"HEAD_DIM": head_dim, "BLOCK_R": ROW_BLOCK, "VARLEN": False}),
        (keep_mask_kernel, {"OUT": "*i8", "dropout_p": "fp32"}, {"BLOCK": 32}),
    )
    names = []
    for kernel, types, constants in helpers:
        signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=GPUTarget("cuda", arch, 32))
        names.append(kernel.fn.__name__)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--head-dim", type=int, choices=FUSED_HEAD_DIMS, default=64)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--mask", action="store_true", help="compile the padding-mask variant")
    parser.add_argument("--dropout", action="store_true", help="compile the dropout variant")
    parser.add_argument("--limit", type=int, help="only the first N candidates of each phase")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"sm_{args.arch}, {args.dtype}, head_dim {args.head_dim}, mask={args.mask}, dropout={args.dropout}")
    print(f"{'phase':13} {'tile':>7} {'warps':>5} {'stages':>6} {'band':>4} {'shared':>7} {'regs':>4} {'spill st/ld':>12}")
    failed = 0
    for phase in args.phases:
        for config in candidate_configs(phase, args.head_dim, dtype, lambda m, n: 0, "cpu")[: args.limit]:
            try:
                r = compile_one(phase, config, dtype, args.head_dim, args.arch, args.mask, args.dropout)
            except Exception as error:  # report and go on: one config failing says nothing of the others
                failed += 1
                print(f"{phase:13} {config.block_m}x{config.block_n}: FAILED {type(error).__name__}: {str(error)[:300]}")
                continue
            print(f"{phase:13} {config.block_m:>3}x{config.block_n:<3} {config.num_warps:>5} {config.num_stages:>6} "
                  f"{r['band']:>4} {r['shared']:>7} {r['registers']:>4} {r['spill_stores']:>5}/{r['spill_loads']:<6}", flush=True)
    try:
        print("helpers ok: " + ", ".join(compile_helpers(dtype, args.head_dim, args.arch)))
    except Exception as error:
        failed += 1
        print(f"helpers FAILED: {type(error).__name__}: {str(error)[:300]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
