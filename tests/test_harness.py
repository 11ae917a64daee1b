"""The comparison harness (edlm.harness): rotation, bookkeeping, repeats, warm-up, on fake systems."""

import pytest

from edlm.harness import cycled, run_interleaved
from edlm.sampling import DecodeOutput, DecodeStats


def _system(name: str, calls: list, forwards_per_row: int = 2):
    """A fake system: each prompt's continuation is [its first id, its length], two tokens per row in
    ``forwards_per_row`` forwards; it records (name, first ids of the rows) per call."""

    def run(rows: list[list[int]]) -> DecodeOutput:
        calls.append((name, [r[0] for r in rows]))
        seqs = [[r[0], len(r)] for r in rows]
        return DecodeOutput(sequences=seqs, stats=DecodeStats(forwards=forwards_per_row, tokens=2 * len(rows),
                                                              rows=len(rows)))

    return run


def test_systems_take_turns_and_the_first_one_rotates():
    calls: list = []
    prompts = [[10], [11], [12], [13], [14]]
    runs = run_interleaved({"a": _system("a", calls), "b": _system("b", calls, 1)}, prompts, batch=2)
    assert calls == [("a", [10, 11]), ("b", [10, 11]), ("b", [12, 13]), ("a", [12, 13]), ("a", [14]), ("b", [14])]
    a, b = runs["a"], runs["b"]
    assert a.sequences == [[10, 1], [11, 1], [12, 1], [13, 1], [14, 1]]
    assert (a.tokens, a.forwards, a.row_forwards, len(a.chunks)) == (10, 6, 10, 3)
    assert (b.forwards, b.row_forwards) == (3, 5)
    assert a.tokens_per_forward == 1.0 and b.tokens_per_forward == 2.0
    assert a.seconds == sum(c[2] for c in a.chunks) > 0
    assert set(a.summary()) == {"tokens_per_s", "latency_s", "tokens", "forwards", "tokens_per_forward"}


def test_order_places_outputs_by_prompt_and_texts_come_from_detokenize():
    calls: list = []
    runs = run_interleaved({"a": _system("a", calls)}, [[5], [6], [7]], batch=1, order=[2, 0, 1],
                           detokenize=lambda ids: f"<{ids[0]}>")
    assert [c[1] for c in calls] == [[7], [5], [6]]
    assert runs["a"].sequences[0] == [5, 1] and runs["a"].texts == ["<5>", "<6>", "<7>"]
    assert [c[0] for c in runs["a"].chunks] == [2, 2, 2]


def test_warmup_decodes_the_first_batch_untimed_and_repeats_keep_the_median_run():
    calls: list = []
    runs = run_interleaved({"a": _system("a", calls)}, [[1], [2], [3]], batch=2, repeats=3, warmup=True)
    assert calls[0] == ("a", [1, 2]) and len(calls) == 1 + 3 * 2  # one warm-up call, three passes of two batches
    assert len(runs["a"].chunks) == 2 and runs["a"].tokens == 6  # one pass's bookkeeping, not three


def test_cycled_fills_a_batch_larger_than_the_prompts():
    assert cycled([[1], [2]], 5) == [[1], [2], [1], [2], [1]]
    assert cycled([[1], [2], [3]], 2) == [[1], [2], [3]]


def test_a_warmup_pass_decodes_every_batch_untimed_first():
    calls: list = []
    runs = run_interleaved({"a": _system("a", calls)}, [[1], [2], [3]], batch=2, warmup="pass")
    assert calls == [("a", [1, 2]), ("a", [3]), ("a", [1, 2]), ("a", [3])]
    assert len(runs["a"].chunks) == 2


def test_one_table_renders_the_same_rows_as_cli_text_and_as_markdown():
    from edlm.table import Table, pct

    t = Table("batch", "<system", "tokens/s", "<note").add(1, "ar", "42.0", None).add(16, "dLM spec", "181.5", "")
    assert t.text().splitlines() == ["batch system   tokens/s note",
                                     "    1 ar           42.0 n/a",
                                     "   16 dLM spec    181.5"]
    assert t.markdown().splitlines() == ["| batch | system | tokens/s | note |", "| ---: | --- | ---: | --- |",
                                         "| 1 | ar | 42.0 | n/a |", "| 16 | dLM spec | 181.5 |  |"]
    with pytest.raises(ValueError, match="a row of 2 cells for 4 columns"):
        t.add(1, "ar")
    assert pct(0.5) == "50.0%" and pct(0.123, ".0f") == "12%" and pct(None) is None


def test_versus_reports_each_side_at_its_fastest_dtype():
    from edlm.harness import versus

    row = versus({"fp32": {"tokens_per_s": 10.0}, "int8": {"tokens_per_s": 20.0}},
                 {"fp32": {"tokens_per_s": 50.0}, "bf16": {"tokens_per_s": 40.0}}, threshold=0.9)
    assert row["ar"]["dtype"] == "int8" and row["dlm"]["dtype"] == "fp32" and row["speedup"] == 2.5
    assert row["dlm"]["threshold"] == 0.9 and set(row["dlm"]["all_dtypes"]) == {"fp32", "bf16"}
