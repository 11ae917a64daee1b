import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from edlm.assets import tiny_model  # noqa: E402
from edlm.config import DiffusionConfig  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def make_dlm(family: str = "llama", **diffusion) -> DiffusionLM:
    model, tokenizer = tiny_model(family, seed=0)
    return DiffusionLM.from_ar(model, tokenizer, DiffusionConfig(**diffusion)).eval()
