"""``dv3 plan``: the memory a run needs on each device, and whether it fits, before it runs."""

from __future__ import annotations

import argparse

from engine.config import PRESETS

DESCRIPTION = """\
Print the per-device memory a pretraining run needs: parameters, gradients and optimizer states
(ZeRO's accounting for the stage, with offload), and the activations one micro-batch keeps for
the backward (term by term for dv3's model and attention path, with activation checkpointing);
whether that fits --device-memory with --reserve left for the framework (CUDA context, ZeRO's
buckets, allocator slack); and the largest micro-batch that would. Settings come from a run
configuration (--config, its DeepSpeed config included) or flags; flags win.

Example: dv3 plan --preset large --seq-len 512 --micro-batch 8 --world-size 8 --device-memory 80
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="per-device memory of a run, and the largest micro-batch that fits",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a run configuration (model, rtd, train and its DeepSpeed config)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default: the config's, else base)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, help="sequences per device and micro-step (default: the config's)")
    parser.add_argument("--world-size", type=int, default=8, help="devices (default: %(default)s)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default: the DeepSpeed config's")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: the DeepSpeed config's")
    parser.add_argument("--offload", choices=("none", "optimizer", "all"),
                        help="ZeRO offload to host memory (default: the DeepSpeed config's)")
    parser.add_argument("--activation-checkpointing", type=int, help="recompute every k-th layer (0: off)")
    parser.add_argument("--attention", choices=("fused", "reference"), default="fused",
                        help="fused kernels (GPU) or the reference path (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where activations live "
                        "(dropout masks are bytes on CUDA, floats on a CPU; default: %(default)s)")
    parser.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (default: %(default)s)")
    parser.add_argument("--reserve", type=float, default=4.0, help="GiB kept free for the framework "
                        "(default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.config import build_run_config, load_run_config
    from engine.errors import InputError
    from engine.train.plan import PlanInput, largest_micro_batch, plan

    overrides = {key: value for key, value in (("model.preset", args.preset), ("model.vocab_size", args.vocab_size),
                                               ("train.activation_checkpointing", args.activation_checkpointing))
                 if value is not None}
    config = load_run_config(args.config, overrides) if args.config else build_run_config(
        {"model": {"preset": "base"}}, overrides)
    micro_batch = args.micro_batch or config.train.micro_batch
    if min(micro_batch, args.seq_len, args.world_size) < 1 or args.device_memory <= 0:
        raise InputError("--micro-batch, --seq-len and --world-size must be >= 1, --device-memory > 0")
    world = args.world_size
    ds = config.deepspeed_config(world, cuda_available=True) if config.train.global_batch % (
        config.train.micro_batch * world) == 0 else None
    zero = (ds or {}).get("zero_optimization", {})
    stage = args.zero_stage if args.zero_stage is not None else int(zero.get("stage", 3))
    dtype = args.dtype or ("bf16" if (ds or {}).get("bf16", {}).get("enabled", True) else "fp32")
    offload = args.offload or ("all" if zero.get("offload_param") else "optimizer" if zero.get("offload_optimizer")
                               else "none")
    inputs = PlanInput(encoder=config.encoder_config(), rtd=config.rtd, seq_len=args.seq_len, micro_batch=micro_batch,
                       world_size=world, zero_stage=stage, dtype=dtype, attention=args.attention,
                       activation_checkpointing=config.train.activation_checkpointing,
                       offload_optimizer=offload != "none", offload_parameters=offload == "all", device=args.device)
    result = plan(inputs)
    total = result.total_gib + args.reserve
    every = inputs.activation_checkpointing
    print(f"dv3 plan: {config.model.preset}, {result.parameter_count / 1e6:.0f}M parameters (generator, "
          f"discriminator, E_Delta), {args.seq_len} tokens x micro-batch {micro_batch} per device, {world} devices, "
          f"ZeRO-{stage}, {dtype}, offload {offload}, {args.attention} attention, activation checkpointing "
          f"{'every ' + str(every) + ' layer(s)' if every else 'off'}")
    for label, value in (("parameters", result.parameters_gib), ("gradients", result.gradients_gib),
                         ("optimizer states", result.optimizer_gib), ("activations (one micro-batch)",
                                                                      result.activations_gib),
                         ("reserve (framework, buckets)", args.reserve)):
        print(f"  {label:32}{value:9.2f} GiB")
    verdict = "fits" if total <= args.device_memory else "does NOT fit"
    print(f"  {'total':32}{total:9.2f} GiB of {args.device_memory:g} GiB: {verdict}")
    print(f"  largest micro-batch that fits: {largest_micro_batch(inputs, args.device_memory, args.reserve)}")
    return 0 if total <= args.device_memory else 1
