"""adamix-zoo: AdaMix mixtures of LoRA and adapter experts on frozen transformers."""

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.consistency import consistency_loss
from adamix_zoo.formats.experts import load_experts, save_experts
from adamix_zoo.formats.merged import load_merged, save_merged
from adamix_zoo.model import AdaMixModel

__all__ = [
    "AdaMixConfig",
    "AdaMixModel",
    "consistency_loss",
    "load_experts",
    "load_merged",
    "save_experts",
    "save_merged",
]
__version__ = "0.1.0"
