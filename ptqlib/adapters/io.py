"""One way to store an adapter that is not peft's: a safetensors file of its tensors and a JSON
file of its configuration, side by side in a directory (Q-BLoRA / QA-BLoRA, QAT-LoRA's branch)."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor


def save_adapter(path: str | Path, tensors: dict[str, Tensor], config: dict,
                 weights: str = "adapter_model.safetensors", config_name: str = "adapter_config.json") -> Path:
    """Write ``tensors`` (contiguous CPU copies) and ``config`` into the directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / weights))
    (path / config_name).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def load_adapter(path: str | Path, weights: str = "adapter_model.safetensors",
                 config_name: str = "adapter_config.json") -> tuple[dict[str, Tensor], dict]:
    """``(tensors, config)`` as :func:`save_adapter` wrote them."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in (weights, config_name):
        if not (path / f).exists():
            raise FileNotFoundError(f"{path}: no {f} (not an adapter saved by ptqlib)")
    return load_file(str(path / weights)), json.loads((path / config_name).read_text())
