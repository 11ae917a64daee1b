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


def make_dlm(family: str = "llama", peaked: float = 1.0, **diffusion) -> DiffusionLM:
    """A tiny random model as a DiffusionLM. ``peaked`` scales the (tied) embeddings, which scales the logits
    through the pre-norm stack, so confidences spread out like a trained model's instead of sitting at 1/V."""
    model, tokenizer = tiny_model(family, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(peaked)
    return DiffusionLM.from_ar(model, tokenizer, DiffusionConfig(**diffusion)).eval()
