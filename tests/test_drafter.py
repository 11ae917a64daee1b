"""The block-diffusion drafter over a frozen source: its view of the context, its artefact, its training, and the
guarantee of speculative decoding with it (greedy output == the unmodified source's ``generate``)."""

import json

import pytest
import torch

import edlm.demo as demo
import edlm.drafter as drafter_mod
import edlm.speculative as spec
from edlm.ar import ar_generate
from edlm.checkpoints import tiny_model
from edlm.compat import new_cache
from edlm.config import DecodeConfig
from edlm.distill import DistillConfig, distill, generate_with_features, load_features, rebuild_features
from edlm.drafter import DraftContext, Drafter, DrafterConfig, position_weights, training_mask
from edlm.drafter_train import DrafterTrainConfig, load_answers, score, train_drafter
from edlm.engine import compile_model
from edlm.errors import EdlmError
from edlm.speculative import drafted_generate, iter_drafted

PROMPTS = [[5, 17, 99, 3], [120, 44, 8, 61, 200, 7, 19, 33, 2, 90, 14], [250]]
LAYERS = [0, 1, 2]


def varied_source(family: str = "llama", seed: int = 1):
    """A tiny random source with a random (untied) head: with the tied head its greedy output just repeats the last
    token, which would make "drafted == source" nearly vacuous."""
    model, tok = tiny_model(family, seed=seed, layers=4)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    model.lm_head = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=g) * 2)
    model.config.tie_word_embeddings = False
    return model.eval(), tok


def make_drafter(model, block: int = 4, **settings) -> Drafter:
    cfg = DrafterConfig.for_source(model, source="tiny", target_layer_ids=LAYERS, block_size=block, **settings)
    return Drafter(cfg, model).eval()


def reference(model, prompts, budget):
    """Hugging Face ``generate`` of the unmodified source, greedy, no EOS stop."""
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=budget, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        out.append(g[0, len(p):].tolist())
    return out


def oracle(monkeypatch, truth: dict[tuple, list[int]], prompts, wrong_every: int):
    """Make the drafter guess the source's continuation, wrong at every ``wrong_every``-th generated position, so
    drafts are accepted whole, in part or not at all (a random drafter is never right)."""
    real = DraftContext.draft

    def draft(self, rows, first):
        logits = real(self, rows, first)
        for k, r in enumerate(rows):
            p = prompts[r]
            start = self.length[r] + 1 - len(p)  # generated index of the block's first guess
            cont = truth[tuple(p)]
            for j in range(1, logits.shape[1]):
                g = start + j - 1
                if g < len(cont):
                    t = cont[g] if not wrong_every or g % wrong_every else (cont[g] + 1) % 250
                    logits[k, j] = -10.0
                    logits[k, j, t] = 10.0
        return logits

    monkeypatch.setattr(DraftContext, "draft", draft)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_drafted_output_equals_hugging_face_generate(monkeypatch, family):
    model, _ = varied_source(family)
    drafter = make_drafter(model)
    for budget in (1, 6, 13):  # 6 and 13 end mid-block
        truth = reference(model, PROMPTS, budget)
        assert len({t for row in truth for t in row}) > budget // 2  # varied continuations, not one token repeated
        for wrong_every in (None, 0, 3):  # None: the drafter's own (random) guesses
            if wrong_every is not None:
                oracle(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, truth)}, PROMPTS, wrong_every)
            for cut in (({}, {"draft_cut": 0.5}, {"verify_costs": (1, 1.2, 1.4, 2.5)}) if wrong_every == 3
                        else ({},)):
                cfg = DecodeConfig(max_new_tokens=budget, mode="speculative", **cut)
                out = drafted_generate(model, drafter, PROMPTS, cfg, eos_id=None)
                assert out.sequences == truth, (budget, wrong_every, cut)
                if wrong_every == 3:  # rows accept different lengths: each row must still equal its lone run
                    alone = [drafted_generate(model, drafter, [p], cfg, eos_id=None).sequences[0] for p in PROMPTS]
                    assert alone == truth
                if wrong_every == 0 and budget == 13:  # perfect drafts: a whole block per forward
                    assert out.stats.forwards <= -(-budget // 4) + 1
                    assert out.stats.accepted_per_verify > 2
            monkeypatch.undo()


def test_drafted_decoding_on_the_compiled_engine_equals_the_source(monkeypatch):
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    truth = reference(model, PROMPTS, 9)
    oracle(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, truth)}, PROMPTS, 3)
    engine = compile_model(model, "fp32", compile=False)
    cfg = DecodeConfig(max_new_tokens=9, mode="speculative")
    assert drafted_generate(engine, drafter, PROMPTS, cfg, eos_id=None).sequences == truth


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_drafted_decoding_at_a_quantized_dtype_gives_that_dtypes_own_ar_text(monkeypatch, dtype):
    # Lossless at quantized dtypes on the engine: at int8 a verify column's forward is bit for bit the AR step's
    # (tests/test_engine.py proves that part on its own); bf16 relies on its margins, as fp32 does.
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    engine = compile_model(model, dtype, compile=False)
    own = [ar_generate(engine, [p], DecodeConfig(max_new_tokens=11), eos_id=None).sequences[0] for p in PROMPTS]
    oracle(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, own)}, PROMPTS, 3)
    cfg = DecodeConfig(max_new_tokens=11, mode="speculative")
    out = drafted_generate(engine, drafter, PROMPTS, cfg, eos_id=None)
    assert out.sequences == own and out.stats.accepted_per_verify > 1


def test_eos_ends_a_row_and_a_stop_request_is_honoured(monkeypatch):
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    truth = reference(model, PROMPTS, 12)
    eos = truth[1][4]  # a token row 1 produces at its 5th step
    oracle(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, truth)}, PROMPTS, 0)
    out = drafted_generate(model, drafter, PROMPTS, DecodeConfig(max_new_tokens=12, mode="speculative"), eos_id=eos)
    for seq, full in zip(out.sequences, truth):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert seq == expected
    produced = [0]
    steps = iter_drafted(model, drafter, [PROMPTS[0]], DecodeConfig(max_new_tokens=12, mode="speculative"), None,
                         should_stop=lambda i: produced[0] >= 3)
    for new, _ in steps:
        produced[0] += len(new[0])
    assert 3 <= produced[0] < 12


def test_draft_logits_come_from_the_committed_prefix_only():
    """What the decoder's drafter sees equals a reference computation from the source's features of the committed
    prefix: no feature of an unverified column, nothing at or after the block's first position."""
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    captured = []
    real = DraftContext.draft

    def spy(self, rows, first):
        out = real(self, rows, first)
        captured.append(([self.length[r] for r in rows], first, out.clone()))
        return out

    DraftContext.draft = spy
    try:
        out = drafted_generate(model, drafter, [PROMPTS[1]], DecodeConfig(max_new_tokens=7, mode="speculative"), None)
    finally:
        DraftContext.draft = real
    seq = PROMPTS[1] + out.sequences[0]
    hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    feats = torch.stack([hs[i + 1][0] for i in LAYERS], dim=1)  # (L, n, D)
    b = drafter.cfg.block_size
    assert captured
    for (length,), (first,), logits in captured:
        assert seq[length] == first  # the block opens on the newest committed token, at the next position
        ctx = drafter.context(feats[None, :length])
        mask = torch.ones(1, b, length + b, dtype=torch.bool)
        ref = drafter(torch.tensor([[first]]), torch.arange(length, length + b)[None], ctx,
                      torch.arange(length)[None], mask)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_draft_length_keeps_the_best_expected_tokens_per_cost_or_the_confident_prefix():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        conf = torch.rand(7, generator=g)
        costs = tuple((1 + torch.rand(8, generator=g).cumsum(0) / 3).tolist())
        value = [(1 + sum(float(conf[:j + 1].prod()) for j in range(k))) / costs[k] for k in range(8)]
        assert spec.draft_length(conf, DecodeConfig(verify_costs=costs)) == max(range(8), key=value.__getitem__)
        want = next((k for k in range(7) if float(conf[:k + 1].prod()) < 0.3), 7)
        assert spec.draft_length(conf, DecodeConfig(draft_cut=0.3)) == want
        assert spec.draft_length(conf, DecodeConfig()) == 7
    short = torch.tensor([0.99, 0.99])  # fewer guesses than costs (the budget ran out): only their lengths compete
    assert spec.draft_length(short, DecodeConfig(verify_costs=(1, 1, 1, 1))) == 2
    with pytest.raises(EdlmError, match="verify_costs"):
        DecodeConfig(verify_costs=(1, 0))


def test_training_mask_matches_a_brute_force_loop():
    anchors = torch.tensor([[2, 4], [0, 5]])
    c, b = 6, 3
    m = training_mask(anchors, c, b)
    for r in range(2):
        for q in range(2 * b):
            for k in range(c + 2 * b):
                a = q // b
                want = k < anchors[r, a] if k < c else (k - c) // b == a
                assert bool(m[r, q, k]) == bool(want)


def test_position_weights_decay_along_the_block():
    w = position_weights(8, 4.0)
    assert w[0] == 0 and w[1] == 1 and torch.all(w[2:] < w[1:-1])
    assert float(w[5]) == pytest.approx(torch.exp(torch.tensor(-1.0)).item())


def test_save_load_round_trip_and_refusal_of_another_source(tmp_path):
    model, _ = varied_source("llama")
    d2t = torch.tensor([0, 3, 5, 7, 9, 11, 40, 250])
    drafter = make_drafter(model, draft_vocab_size=8, init="random")
    drafter = Drafter(drafter.cfg, model, d2t=d2t)
    drafter.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "drafter_config.json").read_text())
    assert cfg["target_layer_ids"] == LAYERS and cfg["block_size"] == 4 and "mask_token_id" in cfg
    again = Drafter.load(tmp_path / "d", model)
    assert torch.equal(again.d2t, d2t)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2, msg=name)  # saved in bf16
    other, _ = varied_source("llama", seed=2)
    with pytest.raises(EdlmError, match="another source"):
        Drafter.load(tmp_path / "d", other)
    with pytest.raises(EdlmError, match="no drafter"):
        Drafter.load(tmp_path / "missing", model)


def test_a_copied_drafter_loads_the_same_and_replaces_the_old_copy(tmp_path):
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    drafter.save(tmp_path / "run")
    (tmp_path / "run" / "stray.txt").write_text("not part of a drafter")
    (tmp_path / "ship").mkdir()
    (tmp_path / "ship" / "old.bin").write_text("old")
    drafter_mod.copy_drafter(tmp_path / "run", tmp_path / "ship")
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["drafter.safetensors", "drafter_config.json"]
    again = Drafter.load(tmp_path / "ship", model)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), Drafter.load(tmp_path / "run", model)
                                                 .state_dict().values()))
    with pytest.raises(EdlmError, match="no drafter"):
        drafter_mod.copy_drafter(tmp_path / "nothing", tmp_path / "x")


def test_config_refuses_the_last_layer_and_bad_sizes():
    model, _ = varied_source("llama")
    with pytest.raises(EdlmError, match="out of range"):
        DrafterConfig.for_source(model, target_layer_ids=[3])
    with pytest.raises(EdlmError, match="draft_vocab_size"):
        DrafterConfig.for_source(model, target_layer_ids=[1], draft_vocab_size=10**6)


def test_distilled_features_are_the_source_hidden_states():
    model, tok = varied_source("llama")
    cfg = DistillConfig(max_new_tokens=6, feature_layers=LAYERS)
    rows, feats = generate_with_features(model, PROMPTS, cfg, eos=None)
    engine_rows, engine_feats = generate_with_features(compile_model(model, "fp32", compile=False), PROMPTS, cfg,
                                                       eos=None)
    assert rows == engine_rows == reference(model, PROMPTS, 6)
    for p, r, f, g in zip(PROMPTS, rows, feats, engine_feats):
        hs = model(torch.tensor([p + r]), output_hidden_states=True).hidden_states
        ref = torch.stack([hs[i + 1][0] for i in LAYERS], dim=1)[:len(p) + len(r) - 1]
        torch.testing.assert_close(f, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def test_distil_train_resume_and_budget_curve(tmp_path, monkeypatch):
    """Distil with features, drop them and rebuild them by prefill, train a few steps, resume, and learn."""
    model, tok = varied_source("llama")
    monkeypatch.setattr("edlm.drafter_train.resolve_model", lambda spec, dtype: (model, tok))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"say {w} {i}" for i, w in enumerate(["a", "bb", "ccc", "dd", "e", "ff"] * 2)))
    out = tmp_path / "d.jsonl"
    distill(model, tok, DistillConfig(prompts=str(prompts), max_new_tokens=24, batch_size=4, chat=False,
                                      feature_layers=LAYERS), out)
    kept = load_features(out)
    assert len(kept) == 12
    for shard in (tmp_path / "d.jsonl.features").glob("shard-*"):
        shard.unlink()
    assert rebuild_features(model, out, LAYERS) == 12
    for i, f in load_features(out).items():
        torch.testing.assert_close(f.float(), kept[i].float(), atol=2e-3, rtol=2e-3)

    def cfg(steps):
        return DrafterTrainConfig(data=str(out), output_dir=str(tmp_path / "run"), steps=steps, batch_size=4,
                                  anchors=4, lr=3e-3, warmup_steps=2, heldout=2, eval_every=10, save_every=10,
                                  drafter={"block_size": 4, "num_hidden_layers": 1, "draft_vocab_size": 64})
    train_drafter(cfg(10))
    first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    folder = train_drafter(cfg(60))  # resumes at step 10
    curve = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [10, 20, 30, 40, 50, 60] and curve[0] == first[0]
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    drafter = Drafter.load(folder, model)
    assert drafter.cfg.draft_vocab_size == 64 and drafter.cfg.target_layer_ids == LAYERS
    trained = score(drafter, load_answers(out)[:10])["tau"]
    fresh = score(make_drafter(model, draft_vocab_size=64), load_answers(out)[:10])["tau"]
    assert trained > fresh


def test_the_training_device_is_checked_with_a_clear_error():
    from edlm.drafter_train import train_device

    with pytest.raises(EdlmError, match="device must be auto, cpu or cuda"):
        DrafterTrainConfig(device="tpu")
    assert train_device("cpu") == torch.device("cpu")
    assert train_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EdlmError, match="no CUDA GPU"):
            train_device("cuda")


def test_source_forward_features_on_hf_and_engine_agree():
    model, _ = varied_source("qwen2")
    ids = torch.tensor([PROMPTS[1]])
    pos = torch.arange(ids.shape[1])[None]
    logits_hf, f_hf = drafter_mod.source_forward(model, ids, pos, None, new_cache(model, 1), (0, 2))
    engine = compile_model(model, "fp32", compile=False)
    logits_e, f_e = drafter_mod.source_forward(engine, ids, pos, None, new_cache(engine, 1), (0, 2))
    torch.testing.assert_close(f_hf, f_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_hf, logits_e, atol=1e-3, rtol=1e-3)


def test_sampled_drafts_carry_the_distribution_they_were_drawn_from():
    """With sampling the acceptance rule needs q over the whole vocabulary: the draft-vocabulary distribution the
    guesses were drawn from, zero elsewhere; the draft is cut where the running confidence falls."""
    d2t = torch.tensor([3, 7, 11, 250])
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    row = spec._Row(seq=[1, 2], prompt_len=2, cached=1)
    cfg = DecodeConfig(mode="speculative", temperature=1.0, max_new_tokens=10)
    spec._set_draft(row, logits, d2t, 257, cfg, torch.Generator().manual_seed(0))
    assert len(row.draft) == 3 and set(row.draft) <= set(d2t.tolist())
    q = torch.softmax(logits, -1)
    assert row.draft_probs.shape == (3, 257)
    torch.testing.assert_close(row.draft_probs[:, d2t], q)
    assert float(row.draft_probs.sum(-1).sub(1).abs().max()) < 1e-6
    greedy = spec._Row(seq=[1, 2], prompt_len=2, cached=1)
    spec._set_draft(greedy, logits, d2t, 257, DecodeConfig(mode="speculative", draft_cut=0.5, max_new_tokens=10),
                    torch.Generator())
    assert greedy.draft == [3, 7]  # confidences ~0.95, ~0.87, 0.25: the running product falls below 0.5 at the third
    budget = spec._Row(seq=[1, 2], prompt_len=2, cached=1)
    spec._set_draft(budget, logits, d2t, 257, DecodeConfig(mode="speculative", max_new_tokens=2), torch.Generator())
    assert budget.draft == [3]  # two tokens left: the source's own next one, and one guess


def test_sampled_drafted_decoding_is_reproducible_per_seed():
    model, _ = varied_source("llama")
    drafter = make_drafter(model)
    cfg = dict(max_new_tokens=10, mode="speculative", temperature=5.0)  # the random head is peaked: flatten it
    a = drafted_generate(model, drafter, PROMPTS, DecodeConfig(seed=1, **cfg), None).sequences
    assert a == drafted_generate(model, drafter, PROMPTS, DecodeConfig(seed=1, **cfg), None).sequences
    assert a != drafted_generate(model, drafter, PROMPTS, DecodeConfig(seed=2, **cfg), None).sequences


def test_the_block_drafter_demo_reports_every_system_and_the_json_keys(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", seed=1, layers=4)
    tok.chat_template = None
    monkeypatch.setattr(demo, "resolve_model", lambda spec, dtype: (model, tok))
    monkeypatch.setattr(demo, "compile_model", lambda m, dtype, **kw: compile_model(m, dtype, compile=False, **kw))
    make_drafter(model).save(tmp_path / "d")
    result = demo.run_block_drafter_demo(tmp_path / "d", [("chat", "hello there"), ("code", "def f(x):")],
                                         max_new_tokens=6, llama_cpp=False, batch=2, draft_cut="auto")
    spec_ = result["speculative"]
    assert set(result["by_domain"]) == {"chat", "code"} and result["by_domain"]["chat"]["prompts"] == 1
    assert result["batch"]["size"] == 2 and result["batch"]["identical"] == 1.0
    costs = spec_["cycle_costs_ms"]  # measured: one per number of drafts, 0 .. block - 1
    assert spec_["draft_cut"] == "auto" and len(costs) == 4 and all(c > 0 for c in costs)
    assert costs == sorted(costs)  # a wider verify never costs less
    assert spec_["identical"] == 1.0 and spec_["tokens_per_forward"] >= 1.0
    assert {"tokens_per_s", "speedup", "accepted_per_verify", "tokens_per_forward"} <= set(spec_)
    assert result["ar"]["dtype"] in ("fp32",) and result["llamacpp_skipped"] == "not asked for"
    assert [r["domain"] for r in result["prompts"]] == ["chat", "code"]
    text = demo.block_drafter_demo_report(result)
    assert "identical to the source" in text and "block drafter" in text


def test_dtype_auto_verifies_at_the_fastest_wide_dtype_and_checks_text_against_that_dtypes_ar(tmp_path, monkeypatch):
    import edlm.bench.engine as bench_engine

    model, tok = tiny_model("llama", seed=1, layers=4)
    tok.chat_template = None
    monkeypatch.setenv("EDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(bench_engine, "compile_model", lambda m, d, **kw: compile_model(m, d, compile=False, **kw))
    drafter = make_drafter(model)
    dtype, record = bench_engine.choose_source_dtype(model, drafter.cfg.source_fingerprint, 4, ("fp32", "int8"))
    assert not record["cached"] and dtype == min(record["forward_ms"], key=record["forward_ms"].get)
    assert bench_engine.choose_source_dtype(model, drafter.cfg.source_fingerprint, 4, ("fp32", "int8"))[1]["cached"]
    # Narrow and wide choices differ: AR runs at the narrow one, and the drafted text is checked against the AR of
    # the verify's own dtype (a third system), not against the other dtype's text.
    monkeypatch.setattr(demo, "choose_source_dtype", lambda m, fp, width, **kw: ("int8" if width > 1 else "fp32", {}))
    monkeypatch.setattr(demo, "resolve_model", lambda spec, dtype: (model, tok))
    monkeypatch.setattr(demo, "compile_model", lambda m, dtype, **kw: compile_model(m, dtype, compile=False, **kw))
    drafter.save(tmp_path / "d")
    result = demo.run_block_drafter_demo(tmp_path / "d", [("chat", "hello there")], max_new_tokens=6,
                                         llama_cpp=False, dtype="auto", batch=2)
    assert result["speculative"]["dtype"] == "int8" and result["ar"]["compiled_dtype"] == "fp32"
    assert "ar_verify_dtype" in result["prompts"][0] and result["speculative"]["identical"] == 1.0
    assert result["batch"]["identical"] == 1.0
    assert "AR (source, compiled int8)" in demo.block_drafter_demo_report(result)


def test_a_served_drafter_streams_the_sources_own_text_and_refuses_other_modes():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from edlm.api import DraftedLM
    from edlm.serve import Engine, ServerThread, ServeSettings, create_app

    model, tok = varied_source("llama")
    tok.chat_template = None
    settings = ServeSettings(model_id="drafted", decode=DecodeConfig(mode="speculative", max_new_tokens=9))
    engine = Engine(DraftedLM(model, make_drafter(model), tok), settings)
    prompt = "hello there, how are you"
    ids = tok(prompt)["input_ids"]
    want_ids = ar_generate(model, [ids], DecodeConfig(max_new_tokens=9), tok.eos_token_id).sequences[0]
    want = tok.decode(want_ids, skip_special_tokens=True)
    with ServerThread(create_app(settings, engine)) as srv:
        url = f"{srv.base_url}/v1/completions"
        body = {"prompt": prompt, "max_tokens": 9}
        whole = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        refused = httpx.post(url, json={**body, "mode": "diffusion"}, timeout=60)
    assert len(want_ids) > 3 and whole == want and "".join(c["choices"][0]["text"] for c in chunks) == want
    assert refused.status_code == 400 and "speculative" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_the_shipped_drafter_on_the_embedded_smollm2_gives_hugging_face_generate_exactly():
    """The real pair: SmolLM2-135M-Instruct and the drafter shipped for it (a fresh one when none is shipped), greedy,
    two chat prompts of different lengths in one batch, eager and on the compiled engine at fp32."""
    from edlm.api import encode_prompt
    from edlm.checkpoints import resolve_model

    source, tok = resolve_model("embedded", dtype=torch.float32)
    source.eval()
    folder = demo.block_drafter_dir()
    if (folder / "drafter_config.json").is_file():
        drafter = Drafter.load(folder, source)
    else:
        drafter = Drafter(DrafterConfig.for_source(source, draft_vocab_size=8192), source).eval()
    prompts = [encode_prompt(tok, p) for p in ("What is a rainbow?", "Write a Python function that adds two "
                                                                     "numbers and explain it in one sentence.")]
    eos = tok.eos_token_id
    truth = []
    for p in prompts:  # Hugging Face generate, greedy, stopping at EOS (kept, as the decoders keep it)
        g = source.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=eos,
                            pad_token_id=eos, attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):]
        row = g.tolist()
        truth.append(row[:row.index(eos) + 1] if eos in row else row)
    cfg = DecodeConfig(max_new_tokens=40, mode="speculative")
    for model in (source, compile_model(source, "fp32")):
        out = drafted_generate(model, drafter, prompts, cfg, eos_id=eos)
        assert out.sequences == truth
