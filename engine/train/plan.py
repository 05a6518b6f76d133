"""``dv3 plan``: how much memory a run needs on each device, before it runs.

Model states follow ZeRO's accounting per parameter (what each stage partitions, what offload
moves to the host), counted over the model's own parameters (built on the ``meta`` device, so
planning ``large`` allocates nothing). Activations are the bytes autograd keeps between the
forward and the backward, term by term for dv3's model (see ``layer_activation_bytes``):
``engine.train.memory.saved_activation_bytes`` measures the same quantity exactly, and the
tests hold the two together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.config import EncoderConfig, RTDConfig
from engine.model import RTDModel
from kernels import used_slots

GIB = 2**30
ATTENTION_PATHS = ("fused", "reference")
DTYPES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class PlanInput:
    encoder: EncoderConfig
    rtd: RTDConfig
    seq_len: int
    micro_batch: int
    world_size: int
    zero_stage: int
    dtype: str = "bf16"  # training dtype of the weights and activations
    attention: str = "fused"  # fused (GPU) or reference (HF-equivalent eager, CPU)
    activation_checkpointing: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    device: str = "cuda"  # where the activations live: dropout masks are 1 byte on CUDA, a float on CPU


@dataclass(frozen=True)
class Plan:
    parameters_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    parameter_count: int

    @property
    def total_gib(self) -> float:
        return self.parameters_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib


def parameter_sizes(encoder: EncoderConfig, rtd: RTDConfig) -> list[int]:
    """Element counts of the RTD model's parameters (each once), built on the meta device."""
    with torch.device("meta"):
        model = RTDModel(encoder, rtd)
    return [p.numel() for p in model.parameters()]


def model_state_bytes(sizes: list[int], plan: PlanInput) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes on one device under ``plan``'s ZeRO stage.

    Weights and gradients take the training dtype's bytes (DeepSpeed accumulates gradients in the
    weights' dtype unless ``data_types.grad_accum_dtype`` says otherwise); the optimizer keeps an
    fp32 master copy and Adam's two moments, 12 bytes (ZeRO keeps the master partition even for
    fp32 weights). Stage 1 partitions the optimizer states, 2 also the gradients, 3 also the
    weights, each parameter's partition padded to ``ceil(numel / world)``. Checked exactly against
    a ZeRO-3 engine's own tensors (tests/workers/model_states.py); stages 0-2 follow ZeRO's
    accounting without its flat-buffer alignment padding.
    """
    world, stage = plan.world_size, plan.zero_stage
    weight = DTYPES[plan.dtype]
    total = sum(sizes)
    partitioned = sum(-(-n // world) for n in sizes) if stage == 3 else -(-total // world)
    parameters = (partitioned if stage == 3 else total) * weight
    gradients = (partitioned if stage >= 2 else total) * weight  # accumulated in the weights' dtype
    optimizer = (partitioned if stage >= 1 else total) * 12
    if plan.offload_optimizer:
        optimizer = 0
    if plan.offload_parameters and stage == 3:
        parameters = 0
    return parameters, gradients, optimizer


def layer_activation_bytes(encoder: EncoderConfig, batch: int, length: int, plan: PlanInput,
                           query_separate: bool = False) -> int:
    """What one encoder layer keeps for the backward (training mode), term by term.

    B sequences of L tokens, hidden h, FFN width f, n heads, R = 2 * position_buckets relative
    rows (W of them reached at length L); t bytes per activation, m per dropout-mask element (t on
    a CPU, 1 on CUDA).
    """
    B, L, h, f, n = batch, length, encoder.hidden_size, encoder.intermediate_size, encoder.num_attention_heads
    R = 2 * encoder.relative_span
    first, last = used_slots(L, encoder.position_buckets, encoder.relative_max_positions)
    W = last - first + 1  # the relative rows this length reaches: the ones projected and scored
    t = DTYPES[plan.dtype]
    dropout = encoder.hidden_dropout_prob > 0 or encoder.attention_probs_dropout_prob > 0
    m = (t if plan.device == "cpu" else 1) if dropout else 0
    stats = 2 * B * L * 4  # a LayerNorm's mean and rstd, fp32
    # The block around the attention and the FFN, whichever attention path: the projections' input;
    # the context into the output dense, its dropout mask, the LayerNorm's input and stats; the FFN's
    # input, its GELU input and output, the dropout mask, the LayerNorm's input and stats.
    block = (B * L * h * t * (1 + (1 if query_separate else 0)) + B * L * h * (t + m + t) + stats
             + B * L * h * t + 2 * B * L * f * t + B * L * h * (m + t) + stats)
    # The relative table's dropout mask and its dropped copy (the projections read a window of it,
    # which keeps the whole copy alive).
    block += R * h * (t + m)
    if plan.attention == "reference":
        # Q, K (twice, one transposed), V and Q again as [B*n, L, d]; the windows of the relative
        # keys and queries expanded to [B*n, W, d]; the c2p and p2c tables [B, n, L, W]; the slot
        # index [L, L] (int64); the softmax output, its dropout mask and the dropped probabilities
        # [B, n, L, L].
        core = (5 * B * L * h * t + 2 * B * W * h * t + 2 * n * B * L * W * t + 8 * L * L
                + n * B * L * L * (t + (m + t if dropout else 0)))
    else:
        # The fused kernels keep Q, K, V, the output and the rows' log-sum-exp (fp32), and the
        # projected relative tables.
        core = 4 * B * L * h * t + 4 * n * B * L + 2 * R * h * t
    return block + core


def activation_bytes(plan: PlanInput) -> int:
    """The whole RTD forward's saved activations on one device (one micro-batch)."""
    encoder, B, L = plan.encoder, plan.micro_batch, plan.seq_len
    h, V, t = encoder.hidden_size, encoder.vocab_size, DTYPES[plan.dtype]
    R = 2 * encoder.relative_span
    generator_layers = plan.rtd.generator_layers or max(1, encoder.num_hidden_layers // 2)
    masked = round(B * L * plan.rtd.mask_prob)
    dropout = encoder.hidden_dropout_prob > 0
    m = (t if plan.device == "cpu" else 1) if dropout else 0
    layer = layer_activation_bytes(encoder, B, L, plan)
    every = plan.activation_checkpointing

    def stack(layers: int) -> int:
        if not every:
            return layers * layer
        kept = (layers + every - 1) // every  # layers that keep only their input
        return kept * B * L * h * t + (layers - kept) * layer

    # Token ids, the embedding LayerNorm's input and stats, its dropout mask; the relative table's
    # index, LayerNorm input and stats.
    embeddings = 8 * B * L + B * L * h * t + 8 * B * L + B * L * h * m + 8 * R + R * h * t + 8 * R
    generator = embeddings + stack(generator_layers)
    if plan.rtd.enhanced_mask_decoder:  # the last layer twice more, its query apart from its keys
        generator += 2 * layer_activation_bytes(encoder, B, L, plan, query_separate=True) + 8 * L
    # MLM head on the masked tokens: their index, dense/GELU/LayerNorm inputs, stats, the LayerNorm
    # output into the logits, and cross-entropy's fp32 log-softmax [masked, vocabulary] and targets.
    generator += 8 * masked + 4 * masked * h * t + 8 * masked + masked * V * 4 + 8 * masked
    discriminator = embeddings + stack(encoder.num_hidden_layers)
    # RTD head: the LayerNorm input (h + h_[CLS]) and stats, dense/GELU/classifier inputs; BCE's
    # logits and labels.
    discriminator += 4 * B * L * h * t + 8 * B * L + 2 * B * L * 4
    # With checkpointing, the backward recomputes one layer at a time: its activations come back at the peak.
    recomputed = layer if every else 0
    return generator + discriminator + recomputed


def plan(inputs: PlanInput, sizes: list[int] | None = None) -> Plan:
    sizes = sizes if sizes is not None else parameter_sizes(inputs.encoder, inputs.rtd)
    parameters, gradients, optimizer = model_state_bytes(sizes, inputs)
    return Plan(parameters / GIB, gradients / GIB, optimizer / GIB, activation_bytes(inputs) / GIB, sum(sizes))


def largest_micro_batch(inputs: PlanInput, device_gib: float, reserve_gib: float, limit: int = 4096) -> int:
    """The largest micro-batch whose plan fits ``device_gib`` with ``reserve_gib`` left over (0: none)."""
    sizes = parameter_sizes(inputs.encoder, inputs.rtd)
    fits = 0
    low, high = 1, limit
    while low <= high:  # activations grow with the micro-batch; model states do not
        middle = (low + high) // 2
        if plan(dataclasses.replace(inputs, micro_batch=middle), sizes).total_gib + reserve_gib <= device_gib:
            fits, low = middle, middle + 1
        else:
            high = middle - 1
    return fits
