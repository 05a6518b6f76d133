"""Compile the fused kernels for a GPU architecture without a GPU, and report their resources.

``python -m kernels.compile_report [--arch 90] [--dtype bfloat16] [--head-dim 64] [--json PATH]``
compiles every attention kernel for every tuning candidate (``kernels.tuning``) the way a real
launch specialises it, then reads what the compiler made of it:

* specialisation: a launch marks every pointer whose address is a multiple of 16 and every
  integer argument that is a multiple of 16 as 16-divisible, and turns an integer equal to 1
  into a constant (Triton's own ``native_specialize_impl`` decides, on the scalar values the
  launchers pass, ``kernels.fused.launch_scalars``, at a representative shape; tensors from
  PyTorch's allocators are 16-byte aligned). Without these hints loads are not vectorised and
  nothing is pipelined, so a report without them describes a kernel no GPU runs;
* registers and spill bytes per thread (``ptxas -v``; the ptxas inside the Triton package);
* shared memory per block (the compiler's own figure, ``metadata.shared``);
* ``wgmma`` and ``mma.sync`` instructions in the PTX (Hopper's warpgroup MMA versus the older
  per-warp MMA), ``cp.async`` (asynchronous copies: software pipelining) and TMA
  (``cp.async.bulk.tensor``);
* blocks per SM from registers, shared memory and warps (sm_90: 64K registers, 228 KB shared,
  1 KB reserved per block, 64 warps, 32 blocks).

No device is needed, so this is the first check of a kernel change. It must run without
``TRITON_INTERPRET`` (cleared here before Triton is imported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import fused  # noqa: E402
from kernels.config import FUSED_HEAD_DIMS, Layout, band_rows, dot_precision  # noqa: E402
from kernels.relative_position import slot_geometry  # noqa: E402
from kernels.row_kernels import ROW_BLOCK, delta_kernel, edge_dots_kernel, keep_mask_kernel  # noqa: E402
from kernels.tuning import candidate_configs  # noqa: E402

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointer arguments by name: the data tensors are in the input dtype ("data"), the rest fixed.
POINTER_TYPES = {
    "EDGE_Q": "*fp32", "EDGE_K": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", "DKR_PART": "*fp32", "DQR_PART": "*fp32",
    "DQ_ACC": "*fp32", "DK_ACC": "*fp32", "DV_ACC": "*fp32", "EDGE_G": "*fp32", "EDGE": "*fp32",
    "MASK": "*i8", "CU": "*i32", "SLOT": "*i32", "FIRST": "*i32", "LAST": "*i32",
}
DATA_POINTERS = ("Q", "K", "V", "KR", "QR", "OUT", "DO", "DQ", "DK", "DV", "DC2P", "DP2C", "X", "TABLE")

# sm_90 per-SM limits (CUDA occupancy rules for compute capability 9.0).
SM90 = {"registers": 65536, "shared": 233472, "shared_reserved_per_block": 1024, "warps": 64, "blocks": 32}


def _ptxas() -> Path:
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas"))
    if not found:
        raise FileNotFoundError("ptxas not found inside the Triton package")
    return found[0]


def specialise(kernel, scalars: dict, constants: dict, element: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``kernel`` as a launch with these scalar values would compile it."""
    signature: dict[str, str] = {}
    constexprs = dict(constants)
    attrs: dict[tuple[int], list] = {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name in scalars:
            kind, key = native_specialize_impl(BaseBackend, scalars[name], False, not param.do_not_specialize, True)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constexprs[name] = key
                continue
            signature[name] = kind
        else:
            signature[name] = f"*{element}" if name in DATA_POINTERS else POINTER_TYPES.get(name, "")
            if not signature[name]:
                raise KeyError(f"{kernel.fn.__name__}: no value or pointer type for argument {name!r}")
            key = "D"  # PyTorch's allocations are aligned far beyond 16 bytes
        if key == "D" and not param.do_not_specialize_on_alignment:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def blocks_per_sm(registers: int, warps: int, shared: int) -> tuple[int, str]:
    """Resident blocks per sm_90 multiprocessor and what limits them."""
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    limits = {
        "registers": SM90["registers"] // max(per_warp * warps, 1),
        "shared": SM90["shared"] // (shared + SM90["shared_reserved_per_block"]),
        "warps": SM90["warps"] // warps,
        "blocks": SM90["blocks"],
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def compile_kernel(kernel, scalars: dict, constants: dict, dtype: torch.dtype, arch: int, num_warps: int,
                   num_stages: int) -> dict:
    """Compile one kernel as launched; returns the compiler's figures."""
    signature, constexprs, attrs = specialise(kernel, scalars, constants, TRITON_TYPES[dtype])
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
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

    registers = number(r"Used (\d+) registers")
    shared = int(compiled.metadata.shared)
    blocks, limiter = blocks_per_sm(registers, num_warps, shared)
    return {
        "registers": registers,
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared": shared,
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "blocks_per_sm": blocks,
        "limited_by": limiter,
        "hinted_arguments": len(attrs),
    }


def representative_layout(head_dim: int) -> Layout:
    # The pretraining shape (32 x 512 tokens, 12 heads); only which scalars are multiples of 16 matters.
    return Layout(varlen=False, sequences=32, heads=12, max_len=512, head_dim=head_dim)


def attention_launches(dtype: torch.dtype, head_dim: int, has_mask: bool, dropout: bool,
                       position_buckets: int = 256, max_relative_positions: int = 512) -> list[dict]:
    """Every attention kernel and tuning candidate: ``{phase, kernel, config, scalars, constants}``."""
    geometry = slot_geometry(position_buckets, max_relative_positions)
    layout = representative_layout(head_dim)
    scalars = fused.launch_scalars(layout, geometry, 0, (3 * head_dim) ** -0.5, 0.1 if dropout else 0.0, 12345)
    scalars.update(items=1000, blocks=8)  # per-launch counts (not specialised on)
    launches = []
    for phase, kernel in fused.KERNELS.items():
        for config in candidate_configs(phase, head_dim, dtype):
            constants = dict(
                ROWS=geometry.rows, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BAND=band_rows(geometry, config.block_m, config.block_n), VARLEN=False, HAS_MASK=has_mask,
                DROPOUT=dropout, DOT_PRECISION=dot_precision(dtype),
            )
            constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
            launches.append({"phase": phase, "kernel": kernel, "config": config, "scalars": scalars, "constants": constants})
    return launches


def helper_launches(head_dim: int) -> list[dict]:
    scalars = {"total_rows": 32 * 12 * 512, "num_heads": 12, "length": 512, "tokens": 0, "seed": 1, "dropout_p": 0.1,
               "rng_len": 512}
    return [
        {"phase": "edge_dots", "kernel": edge_dots_kernel, "scalars": scalars,
         "constants": {"ROWS": 512, "HEAD_DIM": head_dim, "BLOCK_R": ROW_BLOCK, "VARLEN": False}},
        {"phase": "delta", "kernel": delta_kernel, "scalars": scalars,
         "constants": {"HEAD_DIM": head_dim, "BLOCK_R": ROW_BLOCK, "VARLEN": False}},
        {"phase": "keep_mask", "kernel": keep_mask_kernel, "scalars": scalars, "constants": {"BLOCK": 32}},
    ]


def _row(launch: dict, flags: str, figures: dict) -> dict:
    config = launch.get("config")
    tile = {} if config is None else {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
                                      "num_stages": config.num_stages, "band": launch["constants"].get("BAND")}
    return {"phase": launch["phase"], "kernel": launch["kernel"].fn.__name__, "flags": flags, **tile, **figures}


def markdown_table(rows: list[dict]) -> str:
    header = ("| kernel | flags | tile | warps | stages | band | regs | spill st/ld | shared B | wgmma | mma.sync "
              "| cp.async | TMA | blocks/SM |")
    lines = [header, "|" + " --- |" * 14]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['phase']} | {r['flags']} | {r.get('block_m')}x{r.get('block_n')} | | | | FAILED: "
                         f"{r['error'][:80]} | | | | | | | |")
            continue
        tile = f"{r['block_m']}x{r['block_n']}" if "block_m" in r else "-"
        lines.append(
            f"| {r['phase']} | {r['flags']} | {tile} | {r.get('num_warps', '')} | {r.get('num_stages', '')} "
            f"| {r.get('band') or ''} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} "
            f"| {r['wgmma']} | {r['mma_sync']} | {'yes' if r['cp_async'] else 'no'} | {'yes' if r['tma'] else 'no'} "
            f"| {r['blocks_per_sm']} ({r['limited_by']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--head-dim", type=int, choices=FUSED_HEAD_DIMS, default=64)
    parser.add_argument("--phases", nargs="+", choices=tuple(fused.KERNELS), help="kernels to compile (default: all)")
    parser.add_argument("--flags", nargs="+", choices=("plain", "mask", "dropout", "mask+dropout"), default=["plain"],
                        help="kernel variants: padding mask and/or in-kernel dropout compiled in")
    parser.add_argument("--limit", type=int, help="only the first N candidates of each phase")
    parser.add_argument("--no-helpers", action="store_true", help="skip the row kernels (edge dots, Delta, keep-mask)")
    parser.add_argument("--json", type=Path, help="write the figures (with the Triton version and date) as JSON")
    parser.add_argument("--markdown", type=Path, help="write the figures as a markdown table")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"sm_{args.arch}, {args.dtype}, head_dim {args.head_dim}, triton {triton.__version__}", flush=True)
    rows: list[dict] = []
    failed = 0
    for flags in args.flags:
        launches = attention_launches(dtype, args.head_dim, "mask" in flags, "dropout" in flags)
        if args.phases:
            launches = [launch for launch in launches if launch["phase"] in args.phases]
        if args.limit:
            counts: dict[str, int] = {}
            kept = []
            for launch in launches:
                counts[launch["phase"]] = counts.get(launch["phase"], 0) + 1
                if counts[launch["phase"]] <= args.limit:
                    kept.append(launch)
            launches = kept
        for launch in launches:
            config = launch["config"]
            try:
                figures = compile_kernel(launch["kernel"], launch["scalars"], launch["constants"], dtype, args.arch,
                                         config.num_warps, config.num_stages)
            except Exception as error:  # report and go on: one config failing says nothing of the others
                failed += 1
                rows.append(_row(launch, flags, {"error": f"{type(error).__name__}: {str(error)[:300]}"}))
                print(f"{launch['phase']:18} {flags:12} {config.block_m}x{config.block_n}: FAILED {rows[-1]['error']}")
                continue
            rows.append(_row(launch, flags, figures))
            r = rows[-1]
            print(f"{r['phase']:18} {flags:12} {r['block_m']:>3}x{r['block_n']:<3} w{r['num_warps']} s{r['num_stages']} "
                  f"band {r['band'] or '-':>3} regs {r['registers']:>3} spill {r['spill_stores']}/{r['spill_loads']} "
                  f"shared {r['shared']:>6} wgmma {r['wgmma']:>3} mma.sync {r['mma_sync']:>3} cp.async {r['cp_async']:>3} "
                  f"tma {r['tma']} blocks/SM {r['blocks_per_sm']} ({r['limited_by']})", flush=True)
    if not args.no_helpers:
        for launch in helper_launches(args.head_dim):
            try:
                figures = compile_kernel(launch["kernel"], launch["scalars"], launch["constants"], dtype, args.arch, 4, 3)
                rows.append(_row(launch, "plain", figures))
                print(f"{launch['phase']:18} helper ok: regs {figures['registers']} spill {figures['spill_stores']}/"
                      f"{figures['spill_loads']}", flush=True)
            except Exception as error:
                failed += 1
                rows.append(_row(launch, "plain", {"error": f"{type(error).__name__}: {str(error)[:300]}"}))
                print(f"{launch['phase']:18} helper FAILED: {rows[-1]['error']}")
    meta = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "arch": f"sm_{args.arch}", "dtype": args.dtype, "head_dim": args.head_dim,
            "specialisation": "16-byte aligned pointers; scalars as kernels.fused.launch_scalars passes them",
            "limits": SM90}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        title = (f"# Static figures: sm_{args.arch}, {args.dtype}, head dim {args.head_dim}\n\n"
                 f"Triton {triton.__version__}, {meta['date']}; compiled here without a GPU, specialised as a launch is. "
                 f"Spills in bytes per thread; shared memory is the compiler's figure.\n\n")
        args.markdown.write_text(title + markdown_table(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
