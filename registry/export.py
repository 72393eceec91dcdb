"""Export an entry as a plain PEFT adapter folder (for PEFT, vLLM, TGI or any PEFT-compatible server)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adamix_zoo.formats.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE
from adamix_zoo.formats.merged import read_adapter_config
from registry.entry import head_files
from registry.store import EntryInfo, Store


def export_peft(store: Store, ref: str, destination: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (+ the card and task heads).

    Raises:
        ValueError: the entry is a mixture of adapters (PEFT has no such layer), or the destination
            exists and is not empty.
    """
    folder = store.get(ref)
    info: EntryInfo = store.resolve(ref)
    config = read_adapter_config(folder)
    if config["peft_type"] != "LORA":
        raise ValueError(
            f"{info.ref} is a mixture of adapters ({config['peft_type']}): PEFT has no such layer; "
            "load it with adamix_zoo.load_merged (its format is documented in the entry's README.md)"
        )
    out = Path(destination)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export destination {out} is a file: give a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"export destination {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, MODEL_CARD_FILE):
        shutil.copyfile(folder / name, out / name)
    meta_tasks = store.show(info.ref)["tasks"]
    for head in head_files(meta_tasks).values():  # heads travel along; PEFT ignores extra files
        (out / head).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / head, out / head)
    return out
