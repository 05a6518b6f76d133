"""Benchmark of disentangled attention: dv3's fused kernels against the reference and the peers.

``dv3 bench kernels`` (or ``python -m kernels.bench``). For each sequence length, with a
fixed number of tokens per batch (16,384 by default, ``batch = tokens / length``, as the
peers report), plus a pretraining point (L=512 with v3's attention dropout 0.1), it times
forward, backward and both, and records peak memory, for:

* ``fused``: dv3's Triton kernels (``DV3_ATTENTION=fused``), backward variant chosen by the
  tuner; ``fused-slices`` and ``fused-split`` force one backward variant each;
* ``reference``: dv3's plain PyTorch path, which computes what HF eager computes;
* ``hf``: Hugging Face's own ``DisentangledSelfAttention`` (eager);
* ``flex``: PyTorch FlexAttention, compiled, with a score_mod that gathers c2p/p2c (slow to
  compile per shape: not in the default list);
* ``sdpa``: PyTorch's scaled-dot-product attention (the flash backend on CUDA) with no position
  terms at the same shape: what plain attention costs, the ceiling to chase (attention level only);
* ``disentangled-flash`` (1.1.1) and ``flashdeberta`` (0.0.8), when importable.

Everything is measured at the attention-layer level (the Q/K/V and relative projections
included, the same ``nn.Linear`` weights for all), because that is the unit the peers
expose; dv3's own paths, flex and sdpa are also timed attention-only. TFLOP/s use the count
the peers publish (docs/kernels.md: forward ``B*H*(4*L^2*D + 4*L*R*D)``, backward
``B*H*(10*L^2*D + 12*L*R*D)``, ``R`` = relative rows) for every path, sdpa included, so the
figures compare times at one shape; layer-level figures understate the kernels. Times are medians (``triton.testing.do_bench`` on CUDA). Peak memory is the
allocation peak above what was allocated before the timed call. An implementation that
cannot run prints its reason and is recorded as skipped. Results go to ``--output`` (JSON),
rewritten after every measurement so an interrupted run keeps what it measured; ``--plot``
draws TFLOP/s and peak memory against sequence length (``--plot-from`` redraws a saved JSON).

On a CPU, ``--device cpu`` picks tiny shapes and the paths that make sense there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ALL_PATHS = ("fused", "fused-slices", "fused-split", "reference", "hf", "flex", "sdpa", "disentangled-flash",
             "flashdeberta")
DEFAULT_GPU_PATHS = tuple(p for p in ALL_PATHS if p != "flex")
FUSED_PATHS = ("fused", "fused-slices", "fused-split")
ATTENTION_ONLY = ("sdpa",)
MODES = ("forward", "backward", "forward+backward")
PEERS = ("disentangled-flash", "flashdeberta")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to run (auto: cuda if present)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: 128 512 2048 8192 on cuda, 32 64 on cpu)")
    parser.add_argument("--tokens", type=int, help="tokens per batch; batch = tokens // length (default 16384 on cuda, 128 on cpu)")
    parser.add_argument("--heads", type=int, help="attention heads (default 12 on cuda, 2 on cpu)")
    parser.add_argument("--head-dim", type=int, help="head dimension (default 64 on cuda, 32 on cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--paths", nargs="+", choices=ALL_PATHS,
                        help="implementations (default: all but flex on cuda, reference and hf on cpu)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time")
    parser.add_argument("--position-buckets", type=int, default=256)
    parser.add_argument("--max-relative-positions", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout of the per-length points")
    parser.add_argument("--pretrain-batch", type=int, help="batch of the pretraining point (L=512, dropout 0.1); default tokens/512")
    parser.add_argument("--no-pretrain", action="store_true", help="skip the pretraining point")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (cuda)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time (cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats on cpu")
    parser.add_argument("--no-layer", action="store_true", help="skip the attention-layer measurements")
    parser.add_argument("--no-kernel", action="store_true", help="skip the attention-only measurements")
    parser.add_argument("--output", type=Path, help="JSON file to write (default: benchmarks/results/kernels-<device>-<date>.json)")
    parser.add_argument("--plot", type=Path, help="also draw the figures to this image (PNG or SVG, by its suffix)")
    parser.add_argument("--plot-from", type=Path, metavar="JSON",
                        help="draw the figures of a saved JSON to --plot (default: beside it) and exit; nothing is run")


# ---------------------------------------------------------------------------------------


def flop_count(batch: int, heads: int, length: int, head_dim: int, rel_rows: int, mode: str) -> float:
    """The FLOP count the peers publish (docs/kernels.md)."""
    forward = batch * heads * (4 * length**2 * head_dim + 4 * length * rel_rows * head_dim)
    backward = batch * heads * (10 * length**2 * head_dim + 12 * length * rel_rows * head_dim)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@dataclass
class Shape:
    batch: int
    heads: int
    length: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    position_buckets: int
    max_relative_positions: int
    dropout: float

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def rel_rows(self) -> int:
        from kernels.relative_position import relative_span

        return 2 * relative_span(self.position_buckets, self.max_relative_positions)


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


def _hf_config(shape: Shape):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        hidden_size=shape.hidden, num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
        relative_attention=True, position_buckets=shape.position_buckets,
        max_relative_positions=shape.max_relative_positions, max_position_embeddings=shape.max_relative_positions,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        attention_probs_dropout_prob=shape.dropout, hidden_dropout_prob=0.0, layer_norm_eps=1e-7,
        position_biased_input=False, type_vocab_size=0,
    )


class Projections(nn.Module):
    """The Q/K/V projections of a v3 attention layer, named like HF's (weights are shared with it)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(hidden, hidden)
        self.key_proj = nn.Linear(hidden, hidden)
        self.value_proj = nn.Linear(hidden, hidden)


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _split_rel(x: torch.Tensor, heads: int) -> torch.Tensor:  # [2k, H*D] -> [H, 2k, D]
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [B, L, H*D]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _flex_attention_fn(shape: Shape) -> Callable:
    """FlexAttention (compiled) with a score_mod gathering ``c2p``/``p2c`` by slot."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        raise Skip(f"FlexAttention unavailable in torch {torch.__version__}: {error}") from error
    from kernels.relative_position import slot_of_distance

    compiled = torch.compile(flex_attention, dynamic=False)
    scale = (3 * shape.head_dim) ** -0.5
    table = slot_of_distance(shape.length - 1, shape.position_buckets, shape.max_relative_positions, shape.device).long()
    offset = shape.length - 1

    def attend(q, k, v, rel_key, rel_query):
        c2p = torch.matmul(q, rel_key.transpose(-1, -2).unsqueeze(0))  # [B, H, L, 2k]
        p2c = torch.matmul(k, rel_query.transpose(-1, -2).unsqueeze(0))

        def score_mod(score, b, h, q_idx, kv_idx):
            slot = table[q_idx - kv_idx + offset]
            return score + (c2p[b, h, q_idx, slot] + p2c[b, h, kv_idx, slot]).to(score.dtype) * scale

        return compiled(q, k, v, score_mod=score_mod, scale=scale)

    return attend


def _sdpa_fn(shape: Shape) -> Callable:
    """Plain attention, no position terms (the ceiling): SDPA's flash backend on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = (3 * shape.head_dim) ** -0.5
    backends = [SDPBackend.FLASH_ATTENTION] if shape.device.type == "cuda" else [SDPBackend.MATH]

    def attend(q, k, v, rel_key, rel_query):
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout, scale=scale)

    return attend


def _dv3_attention_fn(shape: Shape, path: str) -> Callable:
    """dv3's fused kernels or its reference, called directly (no dispatch inside the timed call)."""
    backward = {"fused-slices": "slices", "fused-split": "split"}.get(path)
    if path in FUSED_PATHS:
        from kernels.fused import fused_disentangled_attention as implementation
        from kernels.fused import unsupported_reason

        probe = torch.empty(1, 1, 1, shape.head_dim, dtype=shape.dtype, device=shape.device)
        reason = unsupported_reason(probe)
        if reason is not None:
            raise Skip(reason)
    else:
        from kernels.reference import disentangled_attention_reference as implementation

    extra = {"backward": backward} if backward else {}

    def attend(q, k, v, rel_key, rel_query):
        return implementation(q, k, v, rel_key, rel_query, None, position_buckets=shape.position_buckets,
                              max_relative_positions=shape.max_relative_positions, dropout_p=shape.dropout, **extra)

    return attend


def _attention_fn(shape: Shape, path: str) -> Callable:
    if path in (*FUSED_PATHS, "reference"):
        return _dv3_attention_fn(shape, path)
    if path == "sdpa":
        return _sdpa_fn(shape)
    if path == "flex":
        if shape.dropout > 0:
            raise Skip("FlexAttention has no attention dropout")
        return _flex_attention_fn(shape)
    raise Skip(f"{path} has no attention-only entry point")


def _layer_fn(shape: Shape, path: str, hf_layer: nn.Module) -> Callable:
    """``fn(hidden, rel_embeddings, mask_2d) -> [B, L, H*D]`` for one implementation, HF weights."""
    heads = shape.heads
    if path == "hf":
        def run_hf(hidden, rel, mask):
            extended = mask[:, None, None, :] * mask[:, None, :, None]
            return hf_layer(hidden, extended.bool(), rel_embeddings=rel)[0]

        return run_hf
    if path in PEERS:
        module = _peer_layer(shape, path, hf_layer)
        return lambda hidden, rel, mask: module(hidden, mask, rel_embeddings=rel)[0]
    attend = _attention_fn(shape, path)
    proj = hf_layer

    def run_ours(hidden, rel, mask):
        q = _split(proj.query_proj(hidden), heads)
        k = _split(proj.key_proj(hidden), heads)
        v = _split(proj.value_proj(hidden), heads)
        rel_query = _split_rel(proj.query_proj(rel), heads)
        rel_key = _split_rel(proj.key_proj(rel), heads)
        return _merge(attend(q, k, v, rel_key, rel_query))

    return run_ours


def _peer_layer(shape: Shape, path: str, hf_layer: nn.Module) -> nn.Module:
    if shape.device.type != "cuda":
        raise Skip(f"{path} needs CUDA")
    config = _hf_config(shape)
    try:
        if path == "disentangled-flash":
            from disentangled_flash import TritonTrainingDisentangledSelfAttention as Peer
        else:
            from flashdeberta.model import FlashDisentangledSelfAttention as Peer
    except ImportError as error:
        raise Skip(f"{path} is not installed ({error}); pip install {_PEER_PINS[path]}") from error
    try:
        module = Peer(config)
    except Exception as error:  # an API change in the peer
        raise Skip(f"{path}: could not build its attention layer: {error}") from error
    missing = module.load_state_dict(hf_layer.state_dict(), strict=False)
    if missing.missing_keys:
        raise Skip(f"{path}: weights do not map onto HF's names ({missing.missing_keys[:3]})")
    return module.to(device=shape.device, dtype=shape.dtype).train(shape.dropout > 0)


_PEER_PINS = {"disentangled-flash": "disentangled-flash==1.1.1", "flashdeberta": "flashdeberta==0.0.8"}


# ---------------------------------------------------------------------------------------
# Timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, args) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
    fn()  # warm-up
    samples = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def _measure(shape: Shape, call: Callable[[list[torch.Tensor]], torch.Tensor], inputs: list[torch.Tensor], args) -> dict:
    """Times forward, backward, both for ``call(inputs)``; returns {mode: {ms, tflops, peak_bytes}}."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    grad_leaves = [t for t in leaves if t.requires_grad]
    out = call(leaves)
    grad_out = torch.randn_like(out)

    def zero_grads() -> None:
        for t in grad_leaves:
            t.grad = None

    def forward() -> None:
        call(leaves)

    def backward() -> None:
        zero_grads()
        out.backward(grad_out, retain_graph=True)

    def both() -> None:
        zero_grads()
        call(leaves).backward(grad_out)

    functions = {"forward": forward, "backward": backward, "forward+backward": both}
    results = {}
    for mode in args.modes:
        fn = functions[mode]
        milliseconds = _time_ms(fn, shape.device, args)
        flops = flop_count(shape.batch, shape.heads, shape.length, shape.head_dim, shape.rel_rows, mode)
        results[mode] = {
            "ms": round(milliseconds, 4),
            "tflops": round(flops / (milliseconds * 1e-3) / 1e12, 3),
            "peak_bytes": _peak_bytes(fn, shape.device),
        }
    return results


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------


def _defaults(args) -> tuple[torch.device, dict]:
    device_name = args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    settings = {
        "lengths": args.lengths or ([128, 512, 2048, 8192] if on_gpu else [32, 64]),
        "tokens": args.tokens or (16384 if on_gpu else 128),
        "heads": args.heads or (12 if on_gpu else 2),
        "head_dim": args.head_dim or (64 if on_gpu else 32),
        "dtype": getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32")),
        "paths": args.paths or (list(DEFAULT_GPU_PATHS) if on_gpu else ["reference", "hf"]),
    }
    return device, settings


def _environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    for name in ("triton", "transformers", "disentangled_flash", "flashdeberta"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def run(args) -> int:
    if args.plot_from is not None:
        target = args.plot or args.plot_from.with_suffix(".png")
        plot_results(json.loads(args.plot_from.read_text()), target)
        print(f"wrote {target}")
        return 0
    device, settings = _defaults(args)
    dtype = settings["dtype"]
    records: list[dict] = []
    print(f"dv3 bench kernels: {device}, {str(dtype).removeprefix('torch.')}, heads {settings['heads']}, "
          f"head_dim {settings['head_dim']}, {settings['tokens']} tokens per batch", flush=True)
    points = [(f"L{length}", length, max(1, settings["tokens"] // length), args.dropout) for length in settings["lengths"]]
    if not args.no_pretrain:
        # Pretraining: v3 trains at 512 tokens with attention dropout 0.1 (tiny on a CPU).
        length = 512 if device.type == "cuda" else min(settings["lengths"])
        points.append(("pretrain", length, args.pretrain_batch or max(1, settings["tokens"] // length), 0.1))
    output = args.output or Path("benchmarks/results") / (
        f"kernels-{device.type}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    environment = _environment(device)

    def write() -> dict:
        # After every measurement: an interrupted run (a timeout, a hang killed) keeps its figures.
        payload = {
            "environment": environment,
            "settings": {**{k: v for k, v in settings.items() if k != "dtype"}, "dtype": str(dtype).removeprefix("torch."),
                         "points": [{"point": p, "length": n, "batch": b, "dropout": d} for p, n, b, d in points],
                         "position_buckets": args.position_buckets, "max_relative_positions": args.max_relative_positions,
                         "dropout": args.dropout, "modes": args.modes,
                         "flop_count": "peers' count: fwd B*H*(4L^2D+4LRD), bwd B*H*(10L^2D+12LRD)"},
            "results": records,
            "ratios": _ratios(records),
        }
        temporary = output.with_name(output.name + ".tmp")
        temporary.write_text(json.dumps(payload, indent=1, default=str))
        temporary.replace(output)
        return payload

    for point, length, batch, dropout in points:
        shape = Shape(batch, settings["heads"], length, settings["head_dim"], dtype, device,
                      args.position_buckets, args.max_relative_positions, dropout)
        torch.manual_seed(length)
        hf_layer = _build_hf_layer(shape)
        hidden = torch.randn(batch, length, shape.hidden, device=device, dtype=dtype)
        rel = torch.nn.functional.layer_norm(torch.randn(shape.rel_rows, shape.hidden, device=device), (shape.hidden,)).to(dtype)
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
        reference_out = None
        levels = ([] if args.no_layer else ["layer"]) + ([] if args.no_kernel else ["attention"])
        for level in levels:
            # HF and the peers exist only as whole attention layers.
            paths = [p for p in settings["paths"] if level == "layer" and p not in ATTENTION_ONLY
                     or level == "attention" and p in (*FUSED_PATHS, "reference", "flex", *ATTENTION_ONLY)]
            # The reference (or HF) first: every other path's output is checked against it.
            paths.sort(key=lambda p: p not in ("reference", "hf"))
            for path in paths:
                record = {"point": point, "path": path, "level": level, "length": length, "batch": batch, "dropout": dropout}
                try:
                    if level == "layer":
                        fn = _layer_fn(shape, path, hf_layer)
                        inputs = [hidden, rel]
                        call = lambda xs, fn=fn, mask=mask: fn(xs[0], xs[1], mask)  # noqa: E731
                    else:
                        attend = _attention_fn(shape, path)
                        inputs = _attention_inputs(shape, hf_layer, hidden, rel)
                        call = lambda xs, attend=attend: attend(*xs)  # noqa: E731
                    with torch.no_grad():
                        out = call(inputs)
                    if level == "layer":
                        if reference_out is None and path in ("reference", "hf"):
                            reference_out = out
                        if reference_out is not None and dropout == 0.0:
                            record["rel_error_vs_reference"] = _relative_error(out, reference_out)
                    del out
                    record.update(_measure(shape, call, inputs, args))
                except Skip as reason:
                    record["skipped"] = str(reason)
                except torch.OutOfMemoryError as error:
                    record["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                except Exception as error:  # keep going: one broken implementation must not hide the others
                    record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                records.append(record)
                _print_record(record)
                write()
    payload = write()
    for line in _summary_lines(payload["ratios"]):
        print(line)
    print(f"wrote {output}")
    if args.plot is not None:
        plot_results(payload, args.plot)
        print(f"wrote {args.plot}")
    failures = [r for r in records if "error" in r and r["path"] in (*FUSED_PATHS, "reference")]
    return 1 if failures else 0


def plot_results(payload: dict, target: Path) -> dict[str, list[str]]:
    """TFLOP/s and peak memory against sequence length, forward and forward+backward, one line per
    implementation and level (the per-length points; the pretraining point is a single length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("forward", "forward+backward") if m in payload["settings"].get("modes", MODES)]
    points = [r for r in payload["results"] if r["point"].startswith("L") and not {"skipped", "error"} & r.keys()]
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8.5), squeeze=False)
    drawn: dict[str, list[str]] = {mode: [] for mode in modes}
    lines = sorted({(r["path"], r["level"]) for r in points})
    for column, mode in enumerate(modes):
        for path, level in lines:
            rows = sorted((r for r in points if (r["path"], r["level"]) == (path, level) and mode in r),
                          key=lambda r: r["length"])
            if not rows:
                continue
            lengths = [r["length"] for r in rows]
            style = "-" if level == "attention" else "--"
            axes[0][column].plot(lengths, [r[mode]["tflops"] for r in rows], style, marker="o", label=f"{path} ({level})")
            drawn[mode].append(f"{path} ({level})")
            memory = [r[mode]["peak_bytes"] for r in rows]
            if all(m is not None for m in memory):
                axes[1][column].plot(lengths, [m / 2**30 for m in memory], style, marker="o", label=f"{path} ({level})")
        axes[0][column].set_title(f"{mode}: TFLOP/s (peers' FLOP count)")
        axes[1][column].set_title(f"{mode}: peak memory (GiB, above inputs)")
        for row in (0, 1):
            axis = axes[row][column]
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length (tokens per batch fixed)")
            axis.grid(True, alpha=0.3)
            if axis.get_lines():
                axis.legend(fontsize=7)
            else:
                axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    environment = payload.get("environment", {})
    settings = payload.get("settings", {})
    figure.suptitle(
        f"dv3 bench kernels: {environment.get('gpu') or environment.get('device')}, {settings.get('dtype')}, "
        f"{settings.get('heads')} heads x {settings.get('head_dim')}, {settings.get('tokens')} tokens per batch, "
        f"{environment.get('date', '')}", fontsize=10,
    )
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return drawn


def _build_hf_layer(shape: Shape) -> nn.Module:
    """HF's own attention layer (its weights are the ones every implementation uses)."""
    try:
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

        layer = DisentangledSelfAttention(_hf_config(shape))
    except Exception as error:  # transformers missing or changed: fall back to bare projections
        print(f"  (HF attention layer unavailable: {error}; using bare projections)")
        layer = Projections(shape.hidden)
    return layer.to(device=shape.device, dtype=shape.dtype).train(shape.dropout > 0)


def _attention_inputs(shape: Shape, proj: nn.Module, hidden: torch.Tensor, rel: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        q = _split(proj.query_proj(hidden), shape.heads).contiguous()
        k = _split(proj.key_proj(hidden), shape.heads).contiguous()
        v = _split(proj.value_proj(hidden), shape.heads).contiguous()
        rel_query = _split_rel(proj.query_proj(rel), shape.heads).contiguous()
        rel_key = _split_rel(proj.key_proj(rel), shape.heads).contiguous()
    return [q, k, v, rel_key, rel_query]


def _print_record(record: dict) -> None:
    head = f"{record['point']:>9} L={record['length']:>5} B={record['batch']:>4} {record['level']:<9} {record['path']:<19}"
    if "skipped" in record:
        print(f"{head} skipped: {record['skipped']}", flush=True)
        return
    if "error" in record:
        print(f"{head} ERROR: {record['error']}", flush=True)
        return
    parts = []
    for mode in MODES:
        if mode in record:
            m = record[mode]
            memory = "" if m["peak_bytes"] is None else f" {m['peak_bytes'] / 2**30:.2f}GiB"
            parts.append(f"{mode} {m['ms']:.3f}ms {m['tflops']:.3g}TF/s{memory}")
    error = record.get("rel_error_vs_reference")
    suffix = "" if error is None else f" | err {error:.1e}"
    print(f"{head} " + " | ".join(parts) + suffix, flush=True)


def _ratios(records: list[dict]) -> dict:
    """Speed-up of ``fused`` over every other path (their time / ours), per level, length and mode."""
    table: dict = {}
    timed = [r for r in records if "skipped" not in r and "error" not in r]
    for ours in (r for r in timed if r["path"] in FUSED_PATHS):
        for other in timed:
            if other["path"] in FUSED_PATHS or other["level"] != ours["level"] or other["point"] != ours["point"]:
                continue
            for mode in MODES:
                if mode in ours and mode in other:
                    key = f"{ours['level']}|{ours['point']}|{mode}|{ours['path']} vs {other['path']}"
                    entry = {"speedup": round(other[mode]["ms"] / ours[mode]["ms"], 3)}
                    if ours[mode]["peak_bytes"] is not None and other[mode]["peak_bytes"]:
                        entry["memory_ratio"] = round(ours[mode]["peak_bytes"] / other[mode]["peak_bytes"], 3)
                    table[key] = entry
    return table


def _summary_lines(summary: dict) -> list[str]:
    if not summary:
        return ["(no ratios: the fused path was not timed)"]
    lines = ["speed-up of fused (their ms / our ms) and memory (our peak / theirs):"]
    for key, entry in summary.items():
        memory = f", memory x{entry['memory_ratio']}" if "memory_ratio" in entry else ""
        lines.append(f"  {key}: x{entry['speedup']}{memory}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
