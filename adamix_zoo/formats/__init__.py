"""Every on-disk format, written and read in one place; safetensors only (never pickle).

- ``files``: every file name, the one ``FORMAT_VERSION``, safe safetensors / JSON reading.
- ``experts``: the unmerged experts file (to continue training or to federate).
- ``merged``: the merged adapter folder (PEFT LoRA layout, or ``ADAMIX_ADAPTER``) and its reader.
- ``head``: the task head file.
- ``run_folder``: the output folder of a training or federated run, and its ``run_config.json``.
- ``metadata``: ``adamix.json``, an entry's metadata, with its file hashes.
- ``names``: entry names ``namespace/task@version`` and the rule every name part follows.
"""
