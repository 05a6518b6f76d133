"""The DeBERTa-v3 encoder, readable top to bottom.

Module and parameter names are Hugging Face's ``DebertaV2Model`` names (``embeddings``,
``encoder.layer.N.attention.self.query_proj`` ...), so a HF checkpoint loads by name and an
export is a plain ``state_dict``. What differs from HF is only how attention is computed: one
call to ``kernels.disentangled_attention`` (reference or fused Triton), which never receives
a parameter, only activations (ZeRO-3 partitions parameters outside their module's forward).

    ids -> Embeddings (word embedding, LayerNorm, * mask, dropout)
        -> Layer x N:  DisentangledSelfAttention -> ResidualOutput (dense, dropout, LN(+residual))
                       -> Intermediate (dense, gelu) -> ResidualOutput
    relative table R = LayerNorm(rel_embeddings), projected per layer by that layer's
    query_proj / key_proj (``share_att_key``) into rel_query / rel_key.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config.encoder import EncoderConfig
from kernels import disentangled_attention, used_slots

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_python": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


def check_token_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
    """Reject inputs that would otherwise fail deep inside an embedding lookup or a kernel."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )


class Embeddings(nn.Module):
    """``LayerNorm(word_embedding(ids)) * mask``, then dropout (no absolute positions in v3).

    ``word_embeddings`` may be passed in: the RTD model hands the discriminator either the
    generator's own module (ES) or a gradient-disentangled view of it (GDES).
    ``absolute_positions`` adds a position table that the input does not use; the Enhanced
    Mask Decoder reads it (Microsoft's checkpoints store it at this name).
    """

    def __init__(self, config: EncoderConfig, word_embeddings: nn.Module | None = None,
                 absolute_positions: bool = False) -> None:
        super().__init__()
        size = config.word_embedding_size
        self.word_embeddings = word_embeddings or nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_biased_input = config.position_biased_input
        needs_positions = config.position_biased_input or absolute_positions
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size) if needs_positions else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(size, config.hidden_size, bias=False) if size != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def absolute_position_states(self, length: int, device: torch.device) -> torch.Tensor:
        return self.position_embeddings(torch.arange(length, device=device))[None]

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, token_type_ids: torch.Tensor | None = None):
        embeddings = self.word_embeddings(input_ids)
        if self.position_biased_input:
            embeddings = embeddings + self.absolute_position_states(input_ids.shape[1], input_ids.device)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            embeddings = self.embed_proj(embeddings)
        embeddings = self.LayerNorm(embeddings)
        if mask is not None:
            embeddings = embeddings * mask.unsqueeze(-1).to(embeddings.dtype)
        return self.dropout(embeddings)


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.position_buckets = config.position_buckets
        self.max_relative_positions = config.relative_max_positions
        self.query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _split_relative(self, x: torch.Tensor) -> torch.Tensor:  # [2k, H*D] -> [H, 2k, D]
        return x.view(x.shape[0], self.num_heads, self.head_dim).transpose(0, 1)

    def forward(self, hidden_states, attention_mask, rel_embeddings, query_states=None):
        if query_states is None:
            query_states = hidden_states
        q = self._split_heads(self.query_proj(query_states))
        k = self._split_heads(self.key_proj(hidden_states))
        v = self._split_heads(self.value_proj(hidden_states))
        # share_att_key: the relative table is projected by this layer's own query/key projections.
        # Only the window of rows this length reaches is projected (at L=128, 255 of 512 rows);
        # the rows outside it are never read, and stay zero. The dropout is drawn over the whole
        # table, as Hugging Face draws it, so both consume the same random numbers.
        first, last = used_slots(hidden_states.shape[1], self.position_buckets, self.max_relative_positions)
        rel = self.pos_dropout(rel_embeddings)[first:last + 1]
        outside = (0, 0, first, rel_embeddings.shape[0] - 1 - last)
        rel_query = self._split_relative(F.pad(self.query_proj(rel), outside))
        rel_key = self._split_relative(F.pad(self.key_proj(rel), outside))
        context = disentangled_attention(
            q, k, v, rel_key, rel_query, attention_mask,
            position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


class ResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: HF's ``SelfOutput`` (after attention, ``in_size``
    = hidden) and ``Output`` (after the FFN, ``in_size`` = intermediate) are this one module."""

    def __init__(self, config: EncoderConfig, in_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = ResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, attention_mask, rel_embeddings, query_states=None):
        context = self.self(hidden_states, attention_mask, rel_embeddings, query_states)
        return self.output(context, hidden_states if query_states is None else query_states)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states))


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, attention_mask, rel_embeddings, query_states=None):
        attention_output = self.attention(hidden_states, attention_mask, rel_embeddings, query_states)
        return self.output(self.intermediate(attention_output), attention_output)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        # Activation checkpointing: every k-th layer keeps only its input and recomputes the rest
        # in the backward (0: off). A training setting, not part of the model's structure.
        self.checkpoint_every = 0
        self.norm_rel_ebd = config.norm_rel_ebd
        if config.norm_rel_ebd == "layer_norm":
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def relative_embeddings(self, device: torch.device) -> torch.Tensor:
        # A lookup through the module (not `.weight`) so ZeRO-3 gathers the table in its own hooks.
        table = self.rel_embeddings(torch.arange(self.rel_embeddings.num_embeddings, device=device))
        return self.LayerNorm(table) if self.norm_rel_ebd == "layer_norm" else table

    def forward(self, hidden_states, attention_mask, output_hidden_states: bool = False):
        rel_embeddings = self.relative_embeddings(hidden_states.device)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        recompute = self.checkpoint_every > 0 and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layer):
            if recompute and index % self.checkpoint_every == 0:
                # The RNG state is restored for the recomputation, so its dropout masks (the fused
                # kernel's seed included) are the forward's.
                hidden_states = checkpoint(layer, hidden_states, attention_mask, rel_embeddings, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attention_mask, rel_embeddings)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return hidden_states, all_hidden_states, rel_embeddings


class EncoderOutput(NamedTuple):
    # A NamedTuple (not a dataclass) so DeepSpeed ZeRO-3's module hooks can see the tensors in it.
    last_hidden_state: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None  # embedding output, then each layer's output
    rel_embeddings: torch.Tensor | None = None  # the LayerNormed relative table (the EMD reuses it)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT/DeBERTa initialisation: normal(0, std) matrices, zero biases, unit LayerNorms.

    A module whose parameters are empty partitions (built under ZeRO-3's ``zero.Init``) is left
    alone: ``engine.train.parallel.construct`` initialises it once its parameters are gathered."""
    if any(parameter.numel() == 0 for parameter in module.parameters(recurse=False)):
        return
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DebertaV3Model(nn.Module):
    """The encoder; ``state_dict()`` keys are those of HF ``DebertaV2Model``."""

    def __init__(self, config: EncoderConfig, word_embeddings: nn.Module | None = None,
                 absolute_positions: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, word_embeddings, absolute_positions)
        self.encoder = Encoder(config)
        owned_word_embeddings = word_embeddings is None
        for name, module in self.named_modules():
            if owned_word_embeddings or not name.startswith("embeddings.word_embeddings"):
                init_weights(module, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        check_inputs: bool = True,
    ) -> EncoderOutput:
        """``check_inputs=False`` skips the token-range check (a host sync on GPU) for callers
        that checked the batch already, as the RTD model does once per micro-batch."""
        if check_inputs:
            check_token_batch(input_ids, attention_mask, self.config.vocab_size)
        input_ids = input_ids.long()
        # No mask means no padding: the attention then takes its cheaper unmasked path.
        hidden_states = self.embeddings(input_ids, attention_mask, token_type_ids)
        last, all_hidden, rel_embeddings = self.encoder(hidden_states, attention_mask, output_hidden_states)
        return EncoderOutput(last_hidden_state=last, hidden_states=all_hidden, rel_embeddings=rel_embeddings)
