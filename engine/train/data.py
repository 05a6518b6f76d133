"""The training data of a run: the data pipeline's loader, opened with the run's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline import PretrainLoader
from data_pipeline.errors import DataPipelineError
from engine.config import RunConfig
from engine.errors import ConfigError


@dataclass
class TrainingData:
    loader: PretrainLoader

    @property
    def vocab_size(self) -> int:
        return self.loader.info.vocab_size

    @property
    def mask_token_id(self) -> int:
        return self.loader.info.mask_token_id

    @property
    def seq_len(self) -> int:
        return self.loader.info.seq_len

    @property
    def tokenizer_path(self) -> Path:
        return self.loader.info.tokenizer_path

    def describe(self) -> str:
        info = self.loader.info
        languages = ", ".join(f"{k} {v:.2f}" for k, v in info.language_probabilities.items())
        return (f"{', '.join(map(str, info.data_dirs))}: {info.rows} sequences of {info.seq_len} tokens "
                f"({info.tokens / 1e6:.2f}M tokens), vocabulary {info.vocab_size}, languages [{languages}]")


def open_training_data(config: RunConfig, rank: int, world_size: int, split: str = "train") -> TrainingData:
    """This rank's loader: micro-batches of ``train.micro_batch``, masked by the RTD settings."""
    try:
        loader = PretrainLoader(
            [Path(d) for d in config.data.dirs],
            batch_size=config.train.micro_batch,
            rank=rank,
            world_size=world_size,
            seed=config.train.seed,
            shuffle=config.data.shuffle,
            num_workers=config.data.num_workers,
            split=split,
            weights=config.data.weights,
            language_alpha=config.data.language_alpha,
            masking=config.rtd.masking_config,
        )
    except DataPipelineError as error:
        raise ConfigError(f"data.dirs: {error}") from error
    return TrainingData(loader)
