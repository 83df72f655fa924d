"""Shared fixtures: a tiny random Qwen2 on the toy tokenizer, and the cached warm-started toy model."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every test runs on local data
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 + the toy tokenizer, saved like any hub model."""
    import toy

    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_model_dir():
    """The warm-started toy model (built once per machine, then cached)."""
    import toy

    return toy.ensure_toy_model()
