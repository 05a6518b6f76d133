"""The model and per-rank batches shared by the ZeRO-3 worker and its single-process reference."""

import torch

from data_pipeline.masking import MaskingConfig, mask_batch
from engine.config import RTDConfig
from engine.config.encoder import EncoderConfig
from engine.model import RTDModel

VOCAB = 157


def build_model(sharing: str) -> RTDModel:
    torch.manual_seed(1234)
    config = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, position_buckets=8, max_relative_positions=32,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RTDModel(config, RTDConfig(sharing=sharing))


def rank_batch(rank: int):
    """Rank-specific tokens, masking, and the seed of the generator's sampling."""
    generator = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(4, VOCAB - 1, (3, 20), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    ids[mask == 0] = 0
    masked = mask_batch(ids, mask, torch.arange(3) + 3 * rank, seed=0, epoch=0, config=MaskingConfig(),
                        mask_token_id=VOCAB - 1, vocab_size=VOCAB)
    return ids, mask, masked.masked_input_ids, masked.mlm_labels, 100 + rank
