"""``dv3 bench kernels|data|train``: each benchmark lives beside what it measures; this wires them."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "kernels": ("kernels.bench", "fused disentangled attention vs the reference, FlexAttention and the peers"),
    "data": ("data_pipeline.bench", "tokenization and loader throughput vs Hugging Face datasets"),
    "train": ("engine.train.bench", "training steps of dv3's model vs HF eager attention"),
    "construction": ("engine.train.bench_construction", "host memory while building the model, whole vs partitioned"),
}


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print figures and write JSON",
                                  description="Benchmarks that print figures and ratios against a baseline "
                                  "measured in the same process, and write JSON.")
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        # Each benchmark module is imported for its parser; the heavy imports wait for `run`.
        module = importlib.import_module(module_name)
        parser = commands.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.configure_parser(parser)
        parser.set_defaults(func=module.run)
