import importlib.util

import pytest
import yaml

from edlm.bench import llamacpp


def _converted(tmp_path, model):
    folder = tmp_path / "dlm"
    folder.mkdir()
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"model": model}))
    return folder


def test_source_gguf_follows_the_converted_folders_source(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    assert llamacpp.source_gguf(_converted(tmp_path, str(source))) is None  # a source folder without GGUF
    (source / "model.Q8_0.gguf").write_bytes(b"x")
    assert llamacpp.source_gguf(tmp_path / "dlm") == source / "model.Q8_0.gguf"
    (source / "model.Q4_0.gguf").write_bytes(b"x")
    assert llamacpp.source_gguf(tmp_path / "dlm") is None  # two GGUFs: ambiguous, the user names one
    assert llamacpp.source_gguf(tmp_path / "dlm", gguf="x.gguf").name == "x.gguf"
    monkeypatch.setattr("edlm._embedded.smollm2_gguf_path", lambda: tmp_path / "smol.gguf")
    (tmp_path / "dlm" / "train_config.yaml").write_text(yaml.safe_dump({"model": None}))  # the embedded default
    assert llamacpp.source_gguf(tmp_path / "dlm") == tmp_path / "smol.gguf"
    assert llamacpp.source_gguf(tmp_path) is None  # not a converted folder


def test_skip_reasons_name_the_missing_piece_and_the_fix(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    assert "pip install llama-cpp-python" in llamacpp.skip_reason(tmp_path / "a.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "llama_cpp" else real(name))
    assert "--gguf" in llamacpp.skip_reason(None)
    assert "does not exist" in llamacpp.skip_reason(tmp_path / "missing.gguf")
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert llamacpp.skip_reason(tmp_path / "a.gguf") is None


@pytest.mark.slow
def test_llamacpp_greedy_matches_the_embedded_models_pytorch_greedy_output():
    pytest.importorskip("llama_cpp")
    from edlm._embedded import smollm2_gguf_path
    from edlm.assets import resolve_model
    from edlm.baseline import ar_generate
    from edlm.config import DecodeConfig

    model, tok = resolve_model(None)
    ids = [tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)]
    ours = ar_generate(model, ids, DecodeConfig(max_new_tokens=16), eos_id=None, pad_id=tok.pad_token_id).sequences
    theirs = llamacpp.llamacpp_ar(smollm2_gguf_path(), ids, 16, threads=2)
    assert theirs["tokens"] == 16 and theirs["tokens_per_s"] > 0
    # the PyTorch weights are the GGUF's Q4_1 weights de-quantized: the first greedy tokens agree
    assert theirs["sequences"][0][:8] == ours[0][:8]
