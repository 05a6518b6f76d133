"""The model: the DeBERTa-v3 encoder, its heads, RTD with ES/NES/GDES, and Hugging Face interchange.

    encoder.py        DebertaV3Model, module for module and weight for weight HF's DebertaV2Model
    heads.py          the MLM head (with the Enhanced Mask Decoder) and the RTD head
    rtd.py            RTDModel: generator -> sampling -> discriminator, and the GDES embedding
    hf_io.py          HF model folders in and out
    init_from_hf.py   continued pretraining from public DeBERTa-v3 weights

The model never imports training: it is plain PyTorch, usable without DeepSpeed.
"""

from engine.model.encoder import DebertaV3Model, EncoderOutput
from engine.model.rtd import GradientDisentangledEmbedding, MaskedLMModel, ReplacedTokenDetectionModel, RTDModel

__all__ = ["DebertaV3Model", "EncoderOutput", "GradientDisentangledEmbedding", "MaskedLMModel",
           "ReplacedTokenDetectionModel", "RTDModel"]
