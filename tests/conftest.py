"""Fixtures every test file shares: the checkout's root, the real Gemma 3 tokenizer (read from
the packaged GGUF once per session) and the tiny random models' data."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
from kaggle_pipeline.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def gemma3_tokenizer() -> Tokenizer:
    """Gemma 3's tokenizer, rebuilt from the packaged GGUF (about 4 s) once per session."""
    return Tokenizer.from_gguf(gemma3_270m_gguf())
