"""dv3's configuration: the leaf every other part reads; it imports nothing of the model.

    encoder.py   EncoderConfig (HF ``DebertaV2Config`` fields), the size presets, config.json mapping
    run.py       RunConfig: the sections of a run, validated when built; it produces the encoder,
                 RTD, masking and DeepSpeed settings
    loading.py   a RunConfig from a YAML/JSON file and --section.field flags
"""

from engine.config.encoder import (
    PRESETS,
    EncoderConfig,
    encoder_config_from_hf,
    encoder_config_to_hf,
    preset_config,
    read_hf_config,
)
from engine.config.loading import add_config_flags, build_run_config, load_run_config, overrides_from_args
from engine.config.run import (
    SECTIONS,
    SHARING_MODES,
    CheckpointSection,
    DataSection,
    LogSection,
    ModelSection,
    OptimSection,
    RTDConfig,
    RunConfig,
    TrainSection,
)

__all__ = [
    "PRESETS", "SECTIONS", "SHARING_MODES", "CheckpointSection", "DataSection", "EncoderConfig", "LogSection",
    "ModelSection", "OptimSection", "RTDConfig", "RunConfig", "TrainSection", "add_config_flags", "build_run_config",
    "encoder_config_from_hf", "encoder_config_to_hf", "load_run_config", "overrides_from_args", "preset_config",
    "read_hf_config",
]
