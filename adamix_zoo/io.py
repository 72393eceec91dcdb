"""The old path of the on-disk formats, now in ``adamix_zoo.formats``.

Kept only for ``adamix_zoo.serving`` and its tests until they import ``adamix_zoo.formats``; new
code imports from there.
"""

from adamix_zoo.formats.files import ADAPTER_WEIGHTS_FILE, HEAD_FILE, METADATA_FILE, read_safetensors
from adamix_zoo.formats.merged import ADAPTER_PEFT_TYPE, read_adapter_config

__all__ = [
    "ADAPTER_PEFT_TYPE", "ADAPTER_WEIGHTS_FILE", "HEAD_FILE", "METADATA_FILE", "read_adapter_config",
    "read_safetensors",
]
