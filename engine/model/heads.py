"""Prediction heads, named as in Microsoft's DeBERTa checkpoints (and HF with ``legacy=False``).

- ``MaskedLMHead`` (``lm_predictions.lm_head``): dense -> act -> LayerNorm -> logits tied to the
  word embedding (the weight is passed in; the head owns only ``bias``).
- ``EnhancedMaskDecoder`` (``lm_predictions``): the MLM head, optionally preceded by
  DeBERTa's EMD, which re-applies the encoder's last layer twice with absolute positions
  added to the query.
- ``ReplacedTokenDetectionHead`` (``mask_predictions``): per token, is it replaced?
  ``classifier(act(dense(LayerNorm(h + h_[CLS]))))``, as in Microsoft's RTD model.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config.encoder import EncoderConfig
from engine.model.encoder import ACTIVATIONS, DebertaV3Model, EncoderOutput


class MaskedLMHead(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embedding_weight: torch.Tensor) -> torch.Tensor:
        hidden_states = self.LayerNorm(self.activation(self.dense(hidden_states)))
        return hidden_states @ word_embedding_weight.t() + self.bias


class EnhancedMaskDecoder(nn.Module):
    """MLM logits at the selected positions, with or without DeBERTa's Enhanced Mask Decoder."""

    def __init__(self, config: EncoderConfig, enhanced: bool = False) -> None:
        super().__init__()
        self.enhanced = enhanced
        self.lm_head = MaskedLMHead(config)

    def forward(
        self,
        encoder: DebertaV3Model,
        encoded: EncoderOutput,
        attention_mask: torch.Tensor | None,
        selected_index: torch.Tensor,
        word_embedding_weight: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[N, vocab]`` at the ``N`` flat (row-major) positions ``selected_index``."""
        hidden = encoded.last_hidden_state
        if self.enhanced:
            # Two passes of the last layer over the second-to-last layer's states; the query is
            # those states plus absolute position embeddings (Microsoft's EMD).
            keys = encoded.hidden_states[-2]
            positions = encoder.embeddings.absolute_position_states(keys.shape[1], keys.device)
            query = keys + positions
            last_layer = encoder.encoder.layer[-1]
            for _ in range(2):
                query = last_layer(keys, attention_mask, encoded.rel_embeddings, query_states=query)
            hidden = query
        return self.lm_head(hidden.flatten(0, 1).index_select(0, selected_index), word_embedding_weight)


class ReplacedTokenDetectionHead(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Replaced-token logits ``[B, L]``."""
        states = self.LayerNorm(hidden_states + hidden_states[:, :1])
        return self.classifier(self.activation(self.dense(states))).squeeze(-1)
