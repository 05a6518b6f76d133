"""``dv3 bench train``: training-step throughput of dv3's model against HF eager attention.

Both contenders are the same RTD model (generator, sampling, discriminator, heads, losses,
GDES) under the same DeepSpeed engine and the same batches; they differ only in the encoder
inside generator and discriminator:

- ``dv3``: ``engine.model.DebertaV3Model`` (attention through ``kernels.disentangled_attention``:
  the fused Triton kernels on a GPU, the reference path on a CPU unless ``DV3_ATTENTION`` says);
- ``hf_eager``: ``transformers.DebertaV2Model`` with eager attention, loaded with the same weights.

It prints and writes (JSON) tokens/s, step time, model TFLOP/s and MFU (the FLOP count of
``engine.metrics``) and peak memory, and the ratio dv3 / HF, all measured in one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from engine import metrics
from engine.config import PRESETS, preset_config
from engine.model import DebertaV3Model, EncoderOutput
from engine.rtd import RTDConfig, RTDModel


class HFEncoder(nn.Module):
    """A ``transformers.DebertaV2Model`` behind dv3's encoder interface (same weights, same word
    embedding module, so ES/GDES sharing is unchanged)."""

    def __init__(self, ours: DebertaV3Model) -> None:
        super().__init__()
        from transformers import DebertaV2Config, DebertaV2Model

        from engine.hf_io import encoder_config_to_hf

        self.config = ours.config
        hf_config = DebertaV2Config(**encoder_config_to_hf(ours.config))
        self.model = DebertaV2Model(hf_config)
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


def build_model(preset: str, vocab_size: int | None, sharing: str, seed: int) -> RTDModel:
    torch.manual_seed(seed)
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    return RTDModel(preset_config(preset, **overrides), RTDConfig(sharing=sharing))


def deepspeed_config(path: Path, micro_batch: int, world_size: int = 1) -> dict:
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch * world_size, gradient_clipping=1.0)
    config.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"].update(
        lr=1e-4, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01)
    return config


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


def time_training(model: RTDModel, ds_config: dict, batches: list[dict], warmup: int, peak_tflops: float | None) -> dict:
    import deepspeed

    from engine.metrics import rtd_step_flops
    from engine.optim import build_param_groups
    from engine.run_config import OptimSection

    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        for module, parameter in model.external_parameter_uses():
            deepspeed.zero.register_external_parameter(module, parameter)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=build_param_groups(model, OptimSection()),
                                           config=ds_config)
    device = next(p.device for p in engine.module.parameters())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def train_step(batch: dict) -> torch.Tensor:
        # No mask for an unpadded batch, as the trainer does: the attention then takes its unmasked path.
        mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"].to(device)
        output = engine(batch["input_ids"].to(device), mask, batch["masked_input_ids"].to(device),
                        batch["mlm_labels"].to(device))
        engine.backward(output.loss)
        engine.step()
        return output.loss

    for batch in batches[:warmup]:
        train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = None
    for batch in batches[warmup:]:
        loss = train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    steps = len(batches) - warmup
    micro_batch, length = batches[0]["input_ids"].shape
    masked = int(sum((b["mlm_labels"] != -100).sum() for b in batches[warmup:]) / steps)
    step_time = elapsed / steps
    tflops = rtd_step_flops(model.config, model.generator_config, micro_batch, length, masked) / step_time / 1e12
    result = {
        "step_ms": 1000 * step_time,
        "tokens_per_s": micro_batch * length / step_time,
        "model_tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_memory_gib": metrics.peak_memory_gib(),
        "final_loss": loss.item(),
    }
    engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="model preset (repeat for several; default: tiny on CPU, base on GPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 128 CPU, 512 GPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: 4 CPU, 32 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 GPU)")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    parser.add_argument("--sharing", default="gdes", choices=("es", "nes", "gdes"))
    parser.add_argument("--deepspeed-config", help="default: ds_configs/zero2_bf16.json on GPU, ds_configs/cpu.json on CPU")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--skip-hf", action="store_true", help="time dv3 only")
    parser.add_argument("--output", help="JSON file to write (default: print only)")


def run(args: argparse.Namespace) -> int:
    from engine import distributed
    from engine.metrics import device_peak_tflops
    from engine.run_config import resolve_repo_path

    gpu = torch.cuda.is_available()
    presets = args.preset or (["base"] if gpu else ["tiny"])
    length = args.seq_len or (512 if gpu else 128)
    micro_batch = args.micro_batch or (32 if gpu else 4)
    steps = args.steps or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    ds_path = resolve_repo_path(args.deepspeed_config or ("ds_configs/zero2_bf16.json" if gpu else "ds_configs/cpu.json"))
    peak = device_peak_tflops(args.peak_tflops)

    env = distributed.discover()
    distributed.init_process_group(env)
    from kernels.attention import attention_path_from_env

    report = {
        "benchmark": "dv3 bench train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "deepspeed_config": str(ds_path), "seq_len": length, "micro_batch": micro_batch, "timed_steps": steps,
        "warmup_steps": warmup, "sharing": args.sharing, "dv3_attention": attention_path_from_env(),
        "peak_tflops": peak, "world_size": env.world_size,
        "figures": "per rank: step time, tokens/s, TFLOP/s and peak memory of one rank's micro-batch",
        "results": {},
    }
    try:
        import deepspeed
        import transformers

        report["versions"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    for preset in presets:
        ds_config = deepspeed_config(ds_path, micro_batch, env.world_size)
        probe = build_model(preset, args.vocab_size, args.sharing, seed=0)
        batches = synthetic_batches(warmup + steps, micro_batch, length, probe, seed=0)
        del probe
        entry = {"dv3": time_training(build_model(preset, args.vocab_size, args.sharing, 0), ds_config, batches, warmup, peak)}
        if not args.skip_hf:
            entry["hf_eager"] = time_training(hf_twin(build_model(preset, args.vocab_size, args.sharing, 0)),
                                              deepspeed_config(ds_path, micro_batch, env.world_size), batches, warmup,
                                              peak)
            entry["speedup_tokens_per_s"] = entry["dv3"]["tokens_per_s"] / entry["hf_eager"]["tokens_per_s"]
        report["results"][preset] = entry
        if not env.is_main:
            continue
        for name in ("dv3", "hf_eager"):
            if name in entry:
                r = entry[name]
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                print(f"{preset:>7} L={length} {name:>8}: {r['step_ms']:9.1f} ms/step {r['tokens_per_s']:10.0f} tok/s "
                      f"{r['model_tflops']:8.3f} TFLOP/s MFU {mfu:>6} peak {r['peak_memory_gib']:.2f} GiB")
        if "speedup_tokens_per_s" in entry:
            print(f"{preset:>7} dv3 / HF eager tokens/s: {entry['speedup_tokens_per_s']:.2f}x")
    if args.output and env.is_main:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    distributed.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
