"""Shared fixtures: a tiny 2-layer model built from SmolLM2's real tokenizer and config shape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    # Nothing may reach a hub at test time; torch on 2 cores is fastest with few threads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from solopo.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", num_layers=2, hidden_size=64)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def keep_logging():
    """The CLI points logging at CliRunner's stream, which closes after invoke: restore the handlers."""
    import logging

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = saved, level
