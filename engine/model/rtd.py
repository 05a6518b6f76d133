"""Replaced token detection (ELECTRA-style) with DeBERTaV3's embedding sharing modes.

One module holds the generator (an MLM model) and the discriminator (an RTD model); its
forward runs generator -> sampling (no gradient) -> discriminator and returns
``loss = mlm_loss + rtd_lambda * rtd_loss``. One backward, one optimizer step: with GDES no
parameter receives gradient from both losses, so this equals training the two separately,
and it is the layout that works under DeepSpeed ZeRO-3 (docs/gdes.md).

Embedding sharing (the paper's Figure 1):

- ``es``:   the discriminator uses the generator's embedding module itself; it is updated
            by ``mlm_loss + rtd_lambda * rtd_loss``.
- ``nes``:  two independent embeddings.
- ``gdes``: ``E_D = sg(E_G) + E_Delta`` with ``E_Delta`` starting at zero: MLM alone trains
            ``E_G``, RTD alone trains ``E_Delta``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.masking import IGNORE_INDEX, mask_batch
from data_pipeline.tokenizer import CLS_ID, PAD_ID, SEP_ID
from engine.config import EncoderConfig, RTDConfig
from engine.model.encoder import DebertaV3Model, Layer, check_token_batch, init_weights
from engine.model.heads import EnhancedMaskDecoder, ReplacedTokenDetectionHead

# [PAD], [CLS], [SEP]: never masked (the masker also leaves [UNK] and [MASK] alone).
SPECIAL_TOKEN_IDS = (PAD_ID, CLS_ID, SEP_ID)


class GradientDisentangledEmbedding(nn.Module):
    """The discriminator's word embedding under GDES: ``sg(E_G) + E_Delta``.

    ``E_G`` stays owned by the generator: this module keeps a plain (non-submodule) reference
    to the generator's embedding module, so the parameter is registered once. Under ZeRO-3
    the engine registers ``E_G`` as an external parameter of this module so it is gathered in
    this module's hooks. ``E_Delta`` is created with an explicit shape (a ``zeros_like`` of a
    partitioned weight would have shape ``[0]``).
    """

    def __init__(self, shared: nn.Embedding) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule on purpose
        self.num_embeddings = shared.num_embeddings
        self.embedding_dim = shared.embedding_dim
        self.padding_idx = shared.padding_idx
        self.delta_weight = nn.Parameter(torch.zeros(self.num_embeddings, self.embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Gathering is linear, so gather(E_G)[ids] + gather(E_Delta)[ids] equals gather(E_G + E_Delta)[ids]
        # exactly, without materialising a [vocab, dim] sum each step.
        shared = F.embedding(input_ids, self.shared.weight.detach(), self.padding_idx)
        return shared + F.embedding(input_ids, self.delta_weight, self.padding_idx)


class MaskedLMModel(nn.Module):
    """The generator: ``deberta`` + ``lm_predictions`` (HF ``DebertaV2ForMaskedLM`` names, legacy=False)."""

    def __init__(self, config: EncoderConfig, enhanced_mask_decoder: bool = False) -> None:
        super().__init__()
        self.config = config
        self.deberta = DebertaV3Model(config, absolute_positions=enhanced_mask_decoder)
        self.lm_predictions = EnhancedMaskDecoder(config, enhanced=enhanced_mask_decoder)
        self.lm_predictions.apply(lambda m: init_weights(m, config.initializer_range))

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.deberta.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask, selected=None, selected_index=None) -> torch.Tensor:
        """MLM logits ``[N, vocab]`` at the positions where ``selected`` ([B, L] bool) is true, or
        at the flat positions ``selected_index`` (no wait for the device)."""
        if selected_index is None:
            selected_index = flat_positions(selected)
        # The ids come from RTDModel.forward, which checked the batch once.
        encoded = self.deberta(input_ids, attention_mask, output_hidden_states=self.lm_predictions.enhanced,
                               check_inputs=False)
        return self.lm_predictions(self.deberta, encoded, attention_mask, selected_index, self.word_embeddings.weight)


class ReplacedTokenDetectionModel(nn.Module):
    """The discriminator: ``deberta`` + ``mask_predictions`` (Microsoft's RTD checkpoint names)."""

    def __init__(self, config: EncoderConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.deberta = DebertaV3Model(config, word_embeddings=word_embeddings)
        self.mask_predictions = ReplacedTokenDetectionHead(config)
        self.mask_predictions.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """Replaced-token logits ``[B, L]``."""
        return self.mask_predictions(self.deberta(input_ids, attention_mask, check_inputs=False).last_hidden_state)


class RTDOutput(NamedTuple):
    # A NamedTuple so DeepSpeed ZeRO-3's module hooks can find its tensors.
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    rtd_loss: torch.Tensor
    # Detached counts, summable across steps and ranks before dividing (no host sync here).
    counts: dict[str, torch.Tensor]
    discriminator_input_ids: torch.Tensor
    rtd_labels: torch.Tensor
    rtd_logits: torch.Tensor

    def statistics(self) -> dict[str, float]:
        return rtd_statistics({name: float(value) for name, value in self.counts.items()})


def rtd_statistics(counts: dict[str, float]) -> dict[str, float]:
    """Rates from (possibly summed) counts: what a run logs."""

    def ratio(numerator: str, denominator: str) -> float:
        return counts[numerator] / counts[denominator] if counts[denominator] else float("nan")

    return {
        "generator_accuracy": ratio("masked_correct", "masked"),
        "discriminator_accuracy": ratio("rtd_correct", "tokens"),
        "discriminator_precision": ratio("true_positive", "predicted_replaced"),
        "discriminator_recall": ratio("true_positive", "replaced"),
        "replaced_fraction": ratio("replaced", "tokens"),
        "masked_fraction": ratio("masked", "tokens"),
    }


def flat_positions(selected: torch.Tensor) -> torch.Tensor:
    """The flat (row-major) indices where a ``[B, L]`` bool tensor is true, as boolean indexing
    would visit them. On a GPU this waits for the device; the trainer computes them on the host."""
    return selected.flatten().nonzero().squeeze(1)


def sample_rows(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``weights`` (``[N, V]``, non-negative, each row with a positive sum),
    drawn with probability proportional to its weight: the inverse of the cumulative sum at one
    uniform draw per row.

    ``torch.multinomial`` draws one exponential per element instead, which on a CPU cost 225 ms
    a step at a 128k vocabulary (76 rows); this is one vectorised cumulative sum. A zero weight
    is never drawn: the draw stays below the row's total, and the first cumulative sum above it
    is where a positive weight ends."""
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:]
    uniform = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device)
    # u * total can round up to total itself; the largest float below it keeps the draw inside.
    draw = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1)


def replace_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    selected: torch.Tensor,
    generator_logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    selected_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's input and labels.

    Selected positions (``selected``, or their flat indices ``selected_index``, in the order of the
    logits' rows) get a token sampled from ``softmax(logits / temperature)`` (no gradient); a
    position is labelled replaced only if the sample differs from the original, so a lucky sample
    counts as original. Padding is never replaced. Non-finite logits (a diverging generator) do
    not stop the sampling: such rows are sampled uniformly, and the step's non-finite loss makes
    the trainer skip the update.
    """
    if selected_index is None:
        selected_index = flat_positions(selected)
    with torch.no_grad():
        probabilities = torch.softmax(generator_logits.detach().float() / temperature, dim=-1)
        probabilities = torch.nan_to_num(probabilities, nan=0.0, posinf=0.0, neginf=0.0)
        usable = probabilities.sum(dim=-1, keepdim=True) > 0
        probabilities = torch.where(usable, probabilities, torch.ones_like(probabilities))
        sampled = sample_rows(probabilities, generator)
        discriminator_ids = input_ids.clone()
        discriminator_ids.view(-1).index_copy_(0, selected_index, sampled.to(input_ids.dtype))
        labels = (discriminator_ids != input_ids) & attention_mask.bool()
    return discriminator_ids, labels


class RTDModel(nn.Module):
    """Generator + discriminator with ES / NES / GDES embedding sharing."""

    def __init__(self, config: EncoderConfig, rtd: RTDConfig | None = None, mask_token_id: int | None = None) -> None:
        """``mask_token_id``: the data's ``[MASK]`` (None: the last id of the vocabulary, where
        dv3's tokenizer puts it)."""
        super().__init__()
        self.config = config
        self.rtd = rtd or RTDConfig()
        self.mask_token_id = mask_token_id if mask_token_id is not None else config.vocab_size - 1
        if not 0 <= self.mask_token_id < config.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary [0, {config.vocab_size})")
        generator_layers = self.rtd.generator_layers or max(1, config.num_hidden_layers // 2)
        self.generator_config = config.replace(num_hidden_layers=generator_layers)
        self.generator = MaskedLMModel(self.generator_config, self.rtd.enhanced_mask_decoder)

        generator_embeddings = self.generator.word_embeddings
        if self.rtd.sharing == "es":
            discriminator_embeddings = generator_embeddings
        elif self.rtd.sharing == "gdes":
            discriminator_embeddings = GradientDisentangledEmbedding(generator_embeddings)
        else:
            discriminator_embeddings = None
        self.discriminator = ReplacedTokenDetectionModel(config, discriminator_embeddings)

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute every ``every``-th encoder layer of both models in the backward (0: off)."""
        for model in (self.generator, self.discriminator):
            model.deberta.encoder.checkpoint_every = every

    def encoder_layers(self) -> list[nn.Module]:
        """Every encoder layer of both models (dv3's own; an encoder swapped in has none)."""
        return [module for module in self.modules() if isinstance(module, Layer)]

    def layers_run_once(self) -> list[nn.Module]:
        """The encoder layers that run once per forward: all but the generator's last one when the
        Enhanced Mask Decoder runs it twice more."""
        generator_layers = [module for module in self.generator.modules() if isinstance(module, Layer)]
        reused = generator_layers[-1:] if self.rtd.enhanced_mask_decoder else []
        return [layer for layer in self.encoder_layers() if all(layer is not other for other in reused)]

    def compile_layers(self) -> None:
        """``torch.compile`` the forward of every encoder layer that runs once per forward, in
        place (names and weights unchanged).

        The forward is compiled, not the module's call: the hooks around the call (ZeRO-3's
        parameter gathering, one unit per such layer: ``engine.train.parallel``) stay eager and
        outside the graph. The layer the Enhanced Mask Decoder runs three times stays eager: under
        ZeRO-3 it cannot be one unit, and its sub-modules' hooks would break its graph. Layers of
        one shape share one compiled graph; the attention is one op in it (the fused kernels as a
        custom op, ``kernels.custom_op``; the reference path traced)."""
        for layer in self.layers_run_once():
            layer.forward = torch.compile(layer.forward, dynamic=False)

    # -- what rebuilds this model (a checkpoint stores it; export reads it) ---------------------
    def describe(self) -> dict:
        return {"encoder_config": self.config.to_dict(), "rtd_config": self.rtd.to_dict(),
                "mask_token_id": self.mask_token_id}

    @classmethod
    def from_description(cls, description: dict) -> RTDModel:
        rtd = description["rtd_config"]
        # Checkpoints written before the rtd section became the model's RTDConfig kept the id in it.
        mask_token_id = description.get("mask_token_id", rtd.get("mask_token_id"))
        return cls(EncoderConfig.from_dict(description["encoder_config"]), RTDConfig.from_dict(rtd), mask_token_id)

    # -- what ZeRO-3 needs to know -------------------------------------------------------------
    def external_parameter_uses(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module's forward reads a parameter it does not own.

        Under ZeRO-3 each pair must be registered with
        ``deepspeed.zero.register_external_parameter`` so the parameter is gathered in that
        module's hooks.
        """
        uses = [(self.generator.lm_predictions.lm_head, self.generator.word_embeddings.weight)]
        discriminator_words = self.discriminator.deberta.embeddings.word_embeddings
        if isinstance(discriminator_words, GradientDisentangledEmbedding):
            uses.append((discriminator_words, discriminator_words.shared.weight))
        return uses

    def embedding_parameters(self) -> dict[str, nn.Parameter]:
        """``E_G``, ``E_D`` (its own parameter under ES/NES) and, under GDES, ``E_Delta``."""
        generator_words = self.generator.word_embeddings.weight
        discriminator_words = self.discriminator.deberta.embeddings.word_embeddings
        if isinstance(discriminator_words, GradientDisentangledEmbedding):
            return {"E_G": generator_words, "E_Delta": discriminator_words.delta_weight}
        return {"E_G": generator_words, "E_D": discriminator_words.weight}

    def discriminator_word_embedding(self) -> torch.Tensor:
        """``E_D`` as the discriminator sees it (``E_G + E_Delta`` under GDES), detached."""
        with torch.no_grad():
            parameters = self.embedding_parameters()
            if "E_Delta" in parameters:
                return parameters["E_G"].detach() + parameters["E_Delta"].detach()
            return parameters["E_D"].detach().clone()

    def discriminator_encoder(self) -> DebertaV3Model:
        """The discriminator as a plain encoder with ``E_G + E_Delta`` folded in, for export."""
        encoder = DebertaV3Model(self.config)
        state = {k: v for k, v in self.discriminator.deberta.state_dict().items() if "word_embeddings" not in k}
        state["embeddings.word_embeddings.weight"] = self.discriminator_word_embedding()
        encoder.load_state_dict(state)
        return encoder.train(self.training)

    # -- the objective -------------------------------------------------------------------------------
    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sample_indices: torch.Tensor,
             seed: int = 0, epoch: int = 0):
        """Dynamic masking with this model's settings (the data loader normally does this)."""
        masked = mask_batch(
            input_ids, attention_mask, sample_indices, seed=seed, epoch=epoch, config=self.rtd.masking_config,
            mask_token_id=self.mask_token_id, vocab_size=self.config.vocab_size, special_token_ids=SPECIAL_TOKEN_IDS,
        )
        return masked.masked_input_ids.to(input_ids.device), masked.mlm_labels.to(input_ids.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        sampling_generator: torch.Generator | None = None,
        selected_index: torch.Tensor | None = None,
        valid_index: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> RTDOutput:
        """``input_ids`` are the original tokens; pass the loader's ``masked_input_ids`` and
        ``mlm_labels`` (``IGNORE_INDEX`` where not selected), or let the model mask with random
        sample indices drawn from torch's RNG. ``attention_mask=None`` means no padding.

        ``selected_index`` / ``valid_index``: the flat indices of the masked and of the
        non-padding positions (``flat_positions``), when the caller has them; given, the forward
        never waits for the device (the trainer computes them on the host from the CPU batch).
        ``check_inputs=False`` skips the token-range check, for a caller that checked the batch.
        """
        if check_inputs:
            check_token_batch(input_ids, attention_mask, self.config.vocab_size)
        input_ids = input_ids.long()
        # The encoders get None for an unpadded batch (the attention's cheaper path); losses and
        # labels need the explicit mask.
        encoder_mask = attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (masked_input_ids is None) != (mlm_labels is None):
            raise ValueError("pass both masked_input_ids and mlm_labels, or neither")
        if masked_input_ids is None:
            sample_indices = torch.randint(0, 2**62, (input_ids.shape[0],), generator=sampling_generator)
            masked_input_ids, mlm_labels = self.mask(input_ids, attention_mask, sample_indices)
            selected_index = None
        elif masked_input_ids.shape != input_ids.shape or mlm_labels.shape != input_ids.shape:
            raise ValueError(
                f"masked_input_ids {tuple(masked_input_ids.shape)} and mlm_labels {tuple(mlm_labels.shape)} "
                f"must have the shape of input_ids {tuple(input_ids.shape)}"
            )
        selected = mlm_labels != IGNORE_INDEX
        if selected_index is None:
            selected_index = flat_positions(selected)
        targets = mlm_labels.view(-1).index_select(0, selected_index)

        mlm_logits = self.generator(masked_input_ids, encoder_mask, selected_index=selected_index)
        if targets.numel() > 0:
            mlm_loss = F.cross_entropy(mlm_logits.float(), targets)
        else:  # nothing to predict: a zero that still touches the graph
            mlm_loss = mlm_logits.float().sum() * 0.0

        discriminator_ids, rtd_labels = replace_tokens(
            input_ids, attention_mask, selected, mlm_logits, self.rtd.temperature, sampling_generator, selected_index
        )
        rtd_logits = self.discriminator(discriminator_ids, encoder_mask)
        valid = attention_mask.bool()
        if encoder_mask is None:  # every position counts
            valid_logits, valid_labels = rtd_logits.reshape(-1), rtd_labels.reshape(-1)
        else:
            if valid_index is None:
                valid_index = flat_positions(valid)
            valid_logits = rtd_logits.reshape(-1).index_select(0, valid_index)
            valid_labels = rtd_labels.reshape(-1).index_select(0, valid_index)
        rtd_loss = F.binary_cross_entropy_with_logits(valid_logits.float(), valid_labels.float())
        loss = mlm_loss + self.rtd.rtd_lambda * rtd_loss

        with torch.no_grad():
            predicted = (rtd_logits > 0) & valid
            counts = {
                "masked": selected.sum(),
                "masked_correct": (mlm_logits.argmax(-1) == targets).sum(),
                "tokens": valid.sum(),
                "replaced": rtd_labels.sum(),
                "predicted_replaced": predicted.sum(),
                "true_positive": (predicted & rtd_labels).sum(),
                "rtd_correct": ((predicted == rtd_labels) & valid).sum(),
            }
        return RTDOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            rtd_loss=rtd_loss,
            counts=counts,
            discriminator_input_ids=discriminator_ids,
            rtd_labels=rtd_labels,
            rtd_logits=rtd_logits.detach(),
        )
