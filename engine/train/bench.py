"""``dv3 bench train``: training steps of dv3's model against the same model with HF eager attention.

The contenders are the same RTD model (generator, sampling, discriminator, heads, losses, GDES)
under the same DeepSpeed engine, built by the trainer's own pieces (``parallelize``,
``train_step``), fed the same batches; they differ only in the encoder inside generator and
discriminator:

- ``dv3``: ``engine.model.DebertaV3Model`` (attention through ``kernels.disentangled_attention``:
  the fused Triton kernels on a GPU, the reference path on a CPU unless ``DV3_ATTENTION`` says);
- ``dv3_compiled``: the same with every encoder layer under ``torch.compile`` (``train.compile``);
  its warm-up steps include the compilation;
- ``hf_eager``: ``transformers.DebertaV2Model`` with eager attention, loaded with the same weights.

The machine may be shared and noisy, so the contenders are interleaved: after warm-up, each
round times ``--steps`` steps of every contender in turn (the order rotates), ``--repeats``
rounds in all. Reported per contender: the median over rounds of the forward+backward time and
of the optimizer step time per step, their spread (min and max over rounds), tokens/s, model
TFLOP/s and MFU (``engine.train.metrics``' FLOP count) and peak memory; and the ratio to HF eager
per round (median, min, max). A ratio whose min-max range contains 1 is not a result.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from engine.config import PRESETS, DataSection, OptimSection, RTDConfig, RunConfig, TrainSection, encoder_config_to_hf
from engine.config.run import ModelSection
from engine.model import DebertaV3Model, EncoderOutput, RTDModel
from engine.resources import resolve_resource_path
from engine.train import metrics


class HFEncoder(nn.Module):
    """A ``transformers.DebertaV2Model`` behind dv3's encoder interface (same weights, same word
    embedding module, so ES/GDES sharing is unchanged)."""

    def __init__(self, ours: DebertaV3Model) -> None:
        super().__init__()
        from transformers import DebertaV2Config, DebertaV2Model  # optional extra (the test and bench extras)

        self.config = ours.config
        self.model = DebertaV2Model(DebertaV2Config(**encoder_config_to_hf(ours.config)))
        state = {k: v for k, v in ours.state_dict().items() if not k.startswith("embeddings.word_embeddings")}
        missing = self.model.load_state_dict(state, strict=False).missing_keys
        if [k for k in missing if not k.startswith("embeddings.word_embeddings")]:
            raise RuntimeError(f"HF twin is missing weights: {missing}")
        self.model.embeddings.word_embeddings = ours.embeddings.word_embeddings
        self.embeddings = self.model.embeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                check_inputs=True):  # the RTD model checked the batch already
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        hidden = list(output.hidden_states) if output_hidden_states else None
        return EncoderOutput(output.last_hidden_state, hidden, None)


def hf_twin(model: RTDModel) -> RTDModel:
    """The same RTD model with HF encoders in place of dv3's."""
    model.generator.deberta = HFEncoder(model.generator.deberta)
    model.discriminator.deberta = HFEncoder(model.discriminator.deberta)
    return model


def compiled(model: RTDModel) -> RTDModel:
    model.compile_layers()
    return model


# name -> how the contender is made from dv3's model (same initial weights for all)
CONTENDERS = {"dv3": lambda model: model, "dv3_compiled": compiled, "hf_eager": hf_twin}
BASELINE = "hf_eager"


def bench_config(preset: str, vocab_size: int | None, sharing: str, micro_batch: int, world_size: int,
                 deepspeed_config: str, steps: int) -> RunConfig:
    """A run configuration as ``dv3 pretrain`` would build it, for one micro-batch per rank and step."""
    # The Enhanced Mask Decoder is off for every contender: HF's DebertaV2 has none, and the
    # comparison is of the encoders.
    return RunConfig(
        model=ModelSection(preset=preset, vocab_size=vocab_size),
        rtd=RTDConfig(sharing=sharing, enhanced_mask_decoder=False),
        data=DataSection(dirs=["synthetic"]), optim=OptimSection(warmup_steps=0),
        train=TrainSection(steps=steps, micro_batch=micro_batch, global_batch=micro_batch * world_size,
                           deepspeed_config=deepspeed_config))


def synthetic_batches(count: int, micro_batch: int, length: int, model: RTDModel, seed: int) -> list[dict]:
    """Random tokens of the model's vocabulary, masked with the model's own RTD masking."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        ids = torch.randint(4, model.config.vocab_size - 1, (micro_batch, length), generator=generator)
        ids[:, 0], ids[:, -1] = 1, 2
        mask = torch.ones_like(ids)
        masked, labels = model.mask(ids, mask, torch.arange(micro_batch) + index * micro_batch, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "masked_input_ids": masked, "mlm_labels": labels})
    return batches


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "rounds": len(samples)}


def bench_preset(preset: str, names: list[str], *, vocab_size: int | None, sharing: str, micro_batch: int, length: int,
                 steps: int, repeats: int, warmup: int, ds_path: str, world_size: int, rank: int,
                 peak: float | None) -> dict:
    """Interleaved, repeated timing of every contender at one preset; the report's entry for it."""
    from engine.train.parallel import parallelize  # DeepSpeed: see run()
    from engine.train.step import seed_step, train_step

    gpu = torch.cuda.is_available()
    config = bench_config(preset, vocab_size, sharing, micro_batch, world_size,
                          str(resolve_resource_path(ds_path)), warmup + steps * repeats)
    ds_config = config.deepspeed_config(world_size, gpu)
    parallel = {}
    for name in names:
        torch.manual_seed(0)  # the same initial weights for every contender
        model = CONTENDERS[name](RTDModel(config.encoder_config(), config.rtd))
        parallel[name] = parallelize(model, config, copy.deepcopy(ds_config))
    batches = synthetic_batches(max(warmup, steps), micro_batch, length, parallel[names[0]].model, seed=0)
    masked = sum(int((b["mlm_labels"] != -100).sum()) for b in batches) / len(batches)
    step_flops = metrics.rtd_step_flops(parallel[names[0]].model.config, parallel[names[0]].model.generator_config,
                                        micro_batch, length, round(masked))
    timings = {name: {"forward_backward_s": [], "optimizer_s": []} for name in names}
    final_loss = {}

    def timed_steps(name: str, count: int, record: bool) -> None:
        for index in range(count):
            seed_step(0, index, rank)  # the same dropout and sampling draws for every contender
            result = train_step(parallel[name], iter(batches[index:index + 1]), 1, timed=True)
            if result.skipped:  # a timing of a step that did not happen would mean nothing
                raise RuntimeError(f"{preset}: {name}'s step {index + 1} had a non-finite gradient and was "
                                   f"skipped (norms {result.clip.norms}); try another --deepspeed-config dtype")
            final_loss[name] = float(result.losses[0])
            if record:
                timings[name]["forward_backward_s"].append(result.forward_backward_s)
                timings[name]["optimizer_s"].append(result.optimizer_s)

    for name in names:
        timed_steps(name, warmup, record=False)
    per_round = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            before = len(timings[name]["forward_backward_s"])
            timed_steps(name, steps, record=True)
            per_round[name].append(statistics.mean(timings[name]["forward_backward_s"][before:]))

    entry = {}
    for name in names:
        forward_backward = spread(per_round[name])
        optimizer_ms = 1000 * statistics.median(timings[name]["optimizer_s"])
        step_s = forward_backward["median"] + optimizer_ms / 1000
        tflops = step_flops / step_s / 1e12
        entry[name] = {
            "forward_backward_ms": {k: (1000 * v if k != "rounds" else v) for k, v in forward_backward.items()},
            "optimizer_ms": optimizer_ms,
            "step_ms": 1000 * step_s,
            "tokens_per_s": micro_batch * length / step_s,
            "model_tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_memory_gib": metrics.peak_memory_gib(),
            "final_loss": final_loss[name],
        }
    if BASELINE in names:
        # Per round, HF eager's forward+backward time over each contender's: the speed-up and its spread.
        entry["speedup_tokens_per_s"] = entry["dv3"]["tokens_per_s"] / entry[BASELINE]["tokens_per_s"]
        for name in names:
            if name != BASELINE:
                key = "speedup_forward_backward" + ("" if name == "dv3" else f"_{name.removeprefix('dv3_')}")
                entry[key] = spread([theirs / ours for ours, theirs in
                                     zip(per_round[name], per_round[BASELINE], strict=True)])
    for engine_parts in parallel.values():
        engine_parts.engine.destroy()
    return entry


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="model preset (repeat for several; default: tiny on CPU, base on GPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 128 CPU, 512 GPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: 4 CPU, 32 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender and round (default: 3 CPU, 10 GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 5 CPU, 3 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender first (default: 2 CPU, 5 GPU)")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    parser.add_argument("--sharing", default="gdes", choices=("es", "nes", "gdes"))
    parser.add_argument("--deepspeed-config", help="default: ds_configs/zero2_bf16.json on GPU, ds_configs/cpu.json on CPU")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--skip-hf", action="store_true", help="do not time HF eager")
    parser.add_argument("--skip-compiled", action="store_true", help="do not time the compiled layers")
    parser.add_argument("--output", help="JSON file to write (default: print only)")


def run(args: argparse.Namespace) -> int:
    # The trainer's parts bring DeepSpeed; imported here so `dv3 --help` (which builds this parser) stays quick.
    from engine.train import distributed
    from engine.train.logger import setup_logging
    from kernels.attention import attention_path_from_env

    gpu = torch.cuda.is_available()
    presets = args.preset or (["base"] if gpu else ["tiny"])
    length = args.seq_len or (512 if gpu else 128)
    micro_batch = args.micro_batch or (32 if gpu else 4)
    steps = args.steps or (10 if gpu else 3)
    repeats = args.repeats or (3 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    ds_path = args.deepspeed_config or ("ds_configs/zero2_bf16.json" if gpu else "ds_configs/cpu.json")
    peak = metrics.device_peak_tflops(args.peak_tflops)
    names = [name for name in CONTENDERS
             if not (args.skip_hf and name == BASELINE) and not (args.skip_compiled and name == "dv3_compiled")]

    env = distributed.discover()
    setup_logging(env.rank)  # quiets DeepSpeed's per-step deprecation warnings
    distributed.init_process_group(env)
    report = {
        "benchmark": "dv3 bench train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "deepspeed_config": str(ds_path), "seq_len": length, "micro_batch": micro_batch, "timed_steps": steps,
        "repeats": repeats, "warmup_steps": warmup, "sharing": args.sharing, "enhanced_mask_decoder": False,
        "dv3_attention": attention_path_from_env(), "peak_tflops": peak, "world_size": env.world_size,
        "figures": "per rank and step: medians over interleaved rounds, min/max over rounds",
        "results": {},
    }
    try:
        import deepspeed
        import transformers

        report["versions"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    for preset in presets:
        entry = bench_preset(preset, names, vocab_size=args.vocab_size, sharing=args.sharing, micro_batch=micro_batch,
                             length=length, steps=steps, repeats=repeats, warmup=warmup, ds_path=ds_path,
                             world_size=env.world_size, rank=env.rank, peak=peak)
        report["results"][preset] = entry
        if not env.is_main:
            continue
        for name in names:
            r = entry[name]
            fb = r["forward_backward_ms"]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{preset:>7} L={length} {name:>12}: fwd+bwd {fb['median']:8.1f} ms [{fb['min']:.1f}, {fb['max']:.1f}] "
                  f"optimizer {r['optimizer_ms']:6.1f} ms | {r['tokens_per_s']:9.0f} tok/s {r['model_tflops']:7.3f} "
                  f"TFLOP/s MFU {mfu:>6} peak {r['peak_memory_gib']:.2f} GiB")
        for key in (k for k in entry if k.startswith("speedup_forward_backward")):
            ratio, who = entry[key], "dv3 " + (key.removeprefix("speedup_forward_backward").strip("_") or "eager")
            print(f"{preset:>7} {who} / HF eager fwd+bwd speed: {ratio['median']:.2f}x "
                  f"[{ratio['min']:.2f}, {ratio['max']:.2f}] over {ratio['rounds']} rounds")
        if "speedup_tokens_per_s" in entry:
            print(f"{preset:>7} dv3 / HF eager tokens/s: {entry['speedup_tokens_per_s']:.2f}x")
    if args.output and env.is_main:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    distributed.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.train.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
