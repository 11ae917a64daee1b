import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from edlm.checkpoints import tiny_model  # noqa: E402
from edlm.config import DiffusionConfig  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma"]

# The integration tier (marker "integration"): whole pipelines, servers over HTTP, programs in the sandbox, several
# processes. Plain `pytest` runs the unit tests; the README's test command (and CI) runs both tiers.
INTEGRATION_MODULES = {
    "test_serve_app", "test_bench_load", "test_distributed", "test_headline", "test_study", "test_reproducible",
    "test_evals_isolation", "test_evals_sandbox", "test_cli", "test_evals_run", "test_evals_lm_eval",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


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


# ------------------------------------------------------------------------------------------------ server tests
# A tiny model served over real HTTP (uvicorn on a loopback port) and the official client, for the tests of
# edlm.serve and edlm.bench.load (which mark themselves pytest.mark.usefixtures("one_thread")).


@pytest.fixture(scope="module")
def one_thread():
    # Two intra-op threads plus the server's threads oversubscribe a 2-core machine; tiny models gain nothing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dlm")
    make_dlm("llama", block_size=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from serve_helpers import TEMPLATE

    path = tmp_path_factory.mktemp("tiny_dlm_chat")
    dlm = make_dlm("llama", block_size=4)
    dlm.tokenizer.chat_template = TEMPLATE
    dlm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second copy of the model for expected outputs (the server's copy belongs to its worker thread)."""
    return DiffusionLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir):
    from serve_helpers import KEY, start

    srv, engine, settings = start(model_dir, api_key=KEY, max_prompt_tokens=64)
    with srv:
        yield srv, engine, settings
    assert not engine.running  # the lifespan stopped the worker


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    from serve_helpers import KEY

    return OpenAI(base_url=f"{server[0].base_url}/v1", api_key=KEY, max_retries=0)
