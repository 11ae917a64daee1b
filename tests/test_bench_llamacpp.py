import importlib.util
import sys
import types

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
    monkeypatch.setattr("edlm.bench.llamacpp.smollm2_gguf_path", lambda: tmp_path / "smol.gguf")
    (tmp_path / "dlm" / "train_config.yaml").write_text(yaml.safe_dump({"model": None}))  # the embedded default
    assert llamacpp.source_gguf(tmp_path / "dlm") == tmp_path / "smol.gguf"
    assert llamacpp.source_gguf(tmp_path) is None  # not a converted folder


def test_skip_reasons_name_the_missing_piece_and_the_fix(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    assert "pip install llama-cpp-python" in llamacpp.skip_reason(tmp_path / "a.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "llama_cpp" else real(name))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # found but does not import (e.g. a dependency missing)
    assert "does not import" in llamacpp.skip_reason(tmp_path / "a.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    assert "--gguf" in llamacpp.skip_reason(None)
    assert "does not exist" in llamacpp.skip_reason(tmp_path / "missing.gguf")
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert llamacpp.skip_reason(tmp_path / "a.gguf") is None


@pytest.mark.slow
def test_llamacpp_greedy_matches_the_embedded_models_pytorch_greedy_output():
    pytest.importorskip("llama_cpp")
    from edlm.ar import ar_generate
    from edlm.assets.embedded import smollm2_gguf_path
    from edlm.checkpoints import resolve_model
    from edlm.config import DecodeConfig

    model, tok = resolve_model(None)
    ids = [tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)]
    ours = ar_generate(model, ids, DecodeConfig(max_new_tokens=16), eos_id=None, pad_id=tok.pad_token_id).sequences
    theirs = llamacpp.llamacpp_ar(smollm2_gguf_path(), ids, 16, threads=2)
    assert theirs["tokens"] == 16 and theirs["tokens_per_s"] > 0
    # the PyTorch weights are the GGUF's Q4_1 weights de-quantized: the first greedy tokens agree
    assert theirs["sequences"][0][:8] == ours[0][:8]


def test_llamacpp_row_compares_with_the_pytorch_ar_and_the_dlm(tmp_path, monkeypatch):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(llamacpp, "skip_reason", lambda path: None)
    runs = []

    def fake_run(path, ids, max_new_tokens, threads, repeats=1):
        runs.append((path, ids, max_new_tokens, repeats))
        return {"tokens_per_s": 100.0, "seconds": 0.2, "tokens": 20, "sequences": [[1, 2, 3, 9] * 2, [4, 5] * 5]}

    monkeypatch.setattr(llamacpp, "llamacpp_ar", fake_run)
    ceiling = {"by_batch": {"1": {"dlm": [{"dtype": "int8", "tpf_forced": 4, "tokens_per_s": 250.0}]}}}
    row = llamacpp.llamacpp_row(tmp_path, [[7], [8]], 10, 3, ar_reference=[[1, 2, 3, 4], [4, 5, 4, 5, 4, 5]],
                                dlm_tokens_per_s=50.0, ceiling=ceiling, gguf=gguf)
    assert runs == [(gguf, [[7], [8]], 10, 3)]
    assert row["tokens_per_s"] == 100.0 and "sequences" not in row
    # compared up to where the PyTorch AR stopped: 3 of 4 tokens, then 6 of 6
    assert row["agreement_with_ar"] == pytest.approx((3 / 4 + 1.0) / 2)
    assert row["dlm_speedup"] == 0.5 and row["ceiling_speedups"] == {"int8@tpf4": 2.5}
