"""What a run measures: model FLOPs and MFU, peak memory, the paper's embedding similarity.

FLOP count (multiply-add = 2 FLOPs), per encoder forward over ``B`` sequences of ``L`` tokens,
hidden ``h``, FFN width ``f``, ``n`` layers, ``R = 2 * position_buckets`` relative rows::

    n * [ B*L * 2*(4*h*h + 2*h*f)            q, k, v, output and the two FFN matmuls
        + B * (4*L*L*h + 4*L*R*h)            QK^T and PV; c2p (Q.Kr^T) and p2c (K.Qr^T) tables
        + 2*2*R*h*h ]                        the relative table through query_proj and key_proj

The attention term is the count the fused-kernel peers publish (docs/kernels.md). An RTD
step runs the generator (its own depth), the discriminator, the MLM head on the ``N`` masked
tokens (``2*N*(h*h + h*V)``) and the RTD head on every token (``2*B*L*(h*h + h)``);
training costs 3x the forward (backward = 2x forward). MFU divides achieved model FLOP/s
by the device's dense bf16 peak.
"""

from __future__ import annotations

import resource

import torch

from engine.config import EncoderConfig

# Dense bf16 tensor-core peak per device (TFLOP/s), by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0, "V100": 125.0}


def peak_memory_gib() -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS (Linux reports KiB),
    which never goes down."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def encoder_forward_flops(config: EncoderConfig, batch: int, length: int) -> float:
    h, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    relative_rows = 2 * config.relative_span
    tokens = batch * length
    linear = tokens * 2 * (4 * h * h + 2 * h * f)
    attention = batch * (4 * length * length * h + 4 * length * relative_rows * h)
    relative_projection = 2 * 2 * relative_rows * h * h
    return n * (linear + attention + relative_projection)


def rtd_step_flops(discriminator: EncoderConfig, generator: EncoderConfig, batch: int, length: int,
                   masked_tokens: int) -> float:
    """Training FLOPs of one RTD forward+backward over ``batch`` sequences."""
    h, vocab = discriminator.hidden_size, discriminator.vocab_size
    forward = (
        encoder_forward_flops(generator, batch, length)
        + encoder_forward_flops(discriminator, batch, length)
        + 2 * masked_tokens * (h * h + h * vocab)
        + 2 * batch * length * (h * h + h)
    )
    return 3.0 * forward


def device_peak_tflops(override: float | None = None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def embedding_sample_rows(vocab_size: int, count: int, seed: int = 0, first_regular_id: int = 4) -> torch.Tensor:
    """A fixed sample of vocabulary rows (special tokens excluded) for the similarity statistic."""
    population = vocab_size - first_regular_id - 1  # the last id is [MASK]
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(population, generator=generator)[: min(count, population)]
    return torch.sort(chosen + first_regular_id).values


def embedding_similarities(parameters: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, float]:
    """Table 1 for ``RTDModel.embedding_parameters()`` (gathered): E_G, E_D and, under GDES, E_Delta
    and E_D = E_G + E_Delta."""
    result = {name: average_pairwise_cosine(p, rows) for name, p in parameters.items()}
    if "E_Delta" in parameters:
        combined = parameters["E_G"].detach().float() + parameters["E_Delta"].detach().float()
        result["E_D"] = average_pairwise_cosine(combined, rows)
    return result


def average_pairwise_cosine(weight: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct sampled rows (the paper's Table 1).

    A zero row (``E_Delta`` at initialisation) has no direction and contributes 0.
    """
    vectors = torch.nn.functional.normalize(weight.detach()[rows.to(weight.device)].float(), dim=-1)
    count = vectors.shape[0]
    similarity = vectors @ vectors.t()
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return float(off_diagonal / (count * (count - 1)))
