"""lm-evaluation-harness adapter: ``--model edlm`` scores and decodes with a converted model (or its AR source).

Registration. lm-eval 0.4.x has no plugin discovery (no entry-point group; ``--model NAME`` is looked up in an
in-process registry), so ``edlm`` is registered when this module is imported. From the shell, run lm-eval through
this module; it registers the adapter, puts edlm's offline tasks (``edlm/lm_eval_tasks``) on ``--include_path``
when none is given, and hands every other argument to lm-eval's own CLI unchanged::

    python -m edlm.lm_eval_adapter --model edlm --model_args pretrained=runs/convert,mode=dlm \\
        --tasks edlm_arith_mc,edlm_arc_easy --batch_size 8

From Python: ``import edlm.lm_eval_adapter`` and then ``lm_eval.simple_evaluate(model="edlm", ...)``.

Model arguments (``--model_args key=value,...``) are the fields of :class:`AdapterConfig`; the decoding batch size
is lm-eval's own ``--batch_size``.

Requests:
    ``loglikelihood``          dlm: the Monte-Carlo block-diffusion ELBO (:func:`edlm.evaluate.dlm_elbo`,
                               ``elbo_samples`` draws, the same seed for every request, so the choices of a question
                               are compared under the same noise); ``is_greedy``: every continuation token is the
                               argmax of one teacher-forced forward in which each continuation block is fully masked
                               (greedy one-block-per-step decoding given a correct prefix; the threshold decoder may
                               commit in another order). ar: the exact log-likelihood and exact greedy check.
    ``loglikelihood_rolling``  lm-eval's rolling windows with the prefix token (BOS, else EOS) as the one-token
                               context, so every token of the text is scored; dlm: the sum of the windows' ELBOs (a
                               lower bound), ar: exact. (``edlm eval ppl:FILE`` conditions on the first text token.)
    ``generate_until``         dlm: :func:`edlm.decode.iter_blocks` in batches, a row stops at the first block
                               boundary where a stop string has appeared; ar: :func:`edlm.baseline.ar_generate`. The
                               text is cut at the earliest stop string. ``max_gen_toks``, ``do_sample``,
                               ``temperature`` and ``top_p`` are honoured; other generation kwargs are ignored.

Tokenisation follows lm-eval's convention for causal models (``TemplateLM``): trailing whitespace of a context
moves to its continuation, context + continuation is encoded whole and split, no special tokens are added, an empty
context becomes the prefix token. Too long inputs lose context tokens from the left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edlm.config import DECODE_MODES
from edlm.errors import EdlmError
from edlm.evaluate import ar_score
from edlm.text import cut_at_stop

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise EdlmError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5'") from e

logger = logging.getLogger(__name__)

MODEL_NAME = "edlm"
"""The name lm-eval resolves (``--model edlm``)."""

MODES = ("dlm", "ar")

# Arguments lm-eval's evaluator passes to every model besides --model_args; accepted, the unused ones ignored.
_HARNESS_ARGS = ("batch_size", "max_batch_size", "device")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AdapterConfig:
    """The ``--model_args`` of ``--model edlm``."""

    pretrained: str
    """A converted model folder (``edlm convert`` output)."""
    mode: str = "dlm"
    """``dlm``: the converted model (ELBO, block-diffusion decoding). ``ar``: the AR source recorded in the folder's
    ``train_config.yaml`` (exact likelihoods, AR decoding); the converted weights used causally when unknown."""
    elbo_samples: int = 8
    """Monte-Carlo draws per ELBO estimate (dlm)."""
    seed: int = 0
    """Seeds the ELBO noise (the same for every request) and sampled decoding."""
    threshold: float = 0.9
    """Decoding: commit every masked position at least this confident (dlm)."""
    decode_mode: str = "diffusion"
    """How the converted model generates (dlm): ``diffusion``, ``ar`` or ``speculative`` (``DecodeConfig.mode``)."""
    block_size: int | None = None
    """Decoding block size; None uses the model's training block size. Likelihoods always use the training one."""
    max_new_tokens: int = 256
    """Generated tokens per request when the task sets no ``max_gen_toks``."""
    dtype: str = "float32"
    """``float32``, ``bfloat16`` or ``float16``."""
    attn_implementation: str = "sdpa"
    """Attention backend passed to transformers (``sdpa``, ``eager``, ``flex_attention``)."""
    max_length: int | None = None
    """Longest sequence scored or decoded; None uses the model's ``max_position_embeddings`` (else 2048)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EdlmError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.decode_mode not in DECODE_MODES:
            raise EdlmError(f"decode_mode must be one of {list(DECODE_MODES)}, got {self.decode_mode!r}")
        if self.elbo_samples < 1:
            raise EdlmError(f"elbo_samples must be >= 1, got {self.elbo_samples}")
        if not 0.0 < self.threshold <= 1.0:
            raise EdlmError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.max_new_tokens < 1:
            raise EdlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.dtype not in DTYPES:
            raise EdlmError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_length is not None and self.max_length < 2:
            raise EdlmError(f"max_length must be >= 2, got {self.max_length}")
        if not Path(self.pretrained).is_dir():
            raise EdlmError(f"pretrained={self.pretrained!r} is not a folder; give a converted model folder")


# ----------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def dlm_is_greedy(dlm, context: list[int], continuation: list[int]) -> bool:
    """Whether every continuation token is the argmax at its position when all continuation tokens are masked.

    One forward of the training construction ``[xt ; x0]`` (as the ELBO at t = 1): each continuation block is
    all-mask and sees the true earlier blocks through the clean copy, e.g. block 4, context ``a b c``,
    continuation ``d e f g h``::

        x0:  a b c d | e f g h | M M M M
        xt:  a b c M | M M M M | M M M M     scored: the argmax at d..h must equal d..h

    The mask token is excluded.
    """
    if not continuation:
        return True
    block = dlm.config.block_size
    start, end = len(context), len(context) + len(continuation)
    length = -(-end // block) * block
    x0 = torch.tensor(context + continuation + [dlm.mask_id] * (length - end), device=dlm.device)  # (L,)
    xt = x0.clone()
    xt[start:] = dlm.mask_id
    logits = dlm.training_logits(xt[None], x0[None])[0, start:end].float()  # (C, V)
    logits[:, dlm.mask_id] = float("-inf")
    return bool((logits.argmax(-1) == x0[start:end]).all())


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
        pretrained, ...: the fields of :class:`AdapterConfig` (lm-eval's ``--model_args``).
        batch_size: rows per decoding batch (lm-eval's ``--batch_size``; ``auto`` means 16). Likelihoods are scored
            one request per forward (the ELBO batches its Monte-Carlo draws).
        device: torch device; ``cuda*`` falls back to the CPU when no GPU is present.
        max_batch_size: accepted for lm-eval's interface; unused.
    """

    backend = "causal"

    def __init__(self, pretrained: str, batch_size: int | str | None = 1, device: str | None = None,
                 max_batch_size: int | None = None, **model_args: Any):
        super().__init__()
        names = {f.name for f in dataclasses.fields(AdapterConfig)}
        unknown = sorted(set(model_args) - names)
        if unknown:
            raise EdlmError(f"unknown model_args {unknown} for --model edlm; valid: {sorted(names)} (the batch size "
                            "is lm-eval's --batch_size)")
        self.config = AdapterConfig(pretrained=str(pretrained), **model_args)
        self.batch_rows = _batch_rows(batch_size)
        self._device = _pick_device(device)
        self.dlm = None
        self.ar_model = None
        self._ignored_gen_kwargs: set[str] = set()
        if self.config.mode == "dlm":
            self._load_dlm()
        else:
            self._load_ar()
        model = self.dlm.model if self.dlm is not None else self.ar_model
        limit = self.config.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        # Sequences the ELBO scores are padded to whole training blocks.
        self._max_length = (limit // self.train_block) * self.train_block if self.dlm is not None else limit
        logger.info("edlm adapter: %s mode, %s on %s, max length %d", self.config.mode, self.config.pretrained,
                    self._device, self._max_length)

    def _load_dlm(self) -> None:
        from edlm.model import DiffusionLM

        cfg = self.config
        self.dlm = DiffusionLM.from_pretrained(cfg.pretrained, dtype=DTYPES[cfg.dtype], device=self._device,
                                               attn_implementation=cfg.attn_implementation).eval()
        self.tokenizer = self.dlm.tokenizer
        self.mask_id = self.dlm.mask_id
        self.train_block = self.dlm.config.block_size

    def _load_ar(self) -> None:
        """The AR source (or the converted weights used causally) plus the converted folder's tokenizer."""
        from transformers import AutoTokenizer

        from edlm.assets import load_hf, resolve_model
        from edlm.model import read_diffusion_config, source_spec

        cfg = self.config
        diffusion = read_diffusion_config(cfg.pretrained)
        spec = source_spec(cfg.pretrained)
        if spec is None:
            logger.warning("%s records no AR source (no train_config.yaml); mode=ar scores the converted weights "
                           "as a causal LM", cfg.pretrained)
            model, self.tokenizer = load_hf(cfg.pretrained, dtype=DTYPES[cfg.dtype],
                                            attn_implementation=cfg.attn_implementation)
        else:
            logger.info("mode=ar: AR source %s", spec)
            model = resolve_model(spec, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)[0]
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        self.ar_model = model.to(self._device).eval()
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
        return {"edlm": dataclasses.asdict(self.config), "edlm_batch_rows": self.batch_rows}

    # ------------------------------------------------------------------------------------------- likelihoods

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fits ``max_length``."""
        keep = self.max_length - len(continuation)
        if keep < 1:
            raise EdlmError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                            f"{self.max_length} with at least one context token")
        return context[-keep:]

    def _score(self, context: list[int], continuation: list[int], greedy: bool = True) -> tuple[float, bool]:
        """(log-likelihood or ELBO, is_greedy) of one request (is_greedy is False when not asked for in dlm mode)."""
        context = self._fit(context, continuation)
        if self.ar_model is not None:
            return ar_score(self.ar_model, context, continuation, banned=self.mask_id)
        from edlm.evaluate import dlm_elbo

        value = dlm_elbo(self.dlm, context, continuation, n_samples=self.config.elbo_samples, seed=self.config.seed)
        return value, greedy and dlm_is_greedy(self.dlm, context, continuation)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        results = []
        for key, context, continuation in tqdm(requests, desc="edlm loglikelihood", disable=disable_tqdm):
            result = self._score(context, continuation)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (dlm: ELBO) of whole texts, scored in lm-eval's disjoint rolling windows."""
        from tqdm import tqdm

        # A disjoint window holds (window length + 1) tokens; that must fit max_length.
        window = self.max_length - 1
        results = []
        for (text,) in tqdm([req.args for req in requests], desc="edlm rolling", disable=disable_tqdm):
            pairs = map(make_disjoint_window,
                        get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, window, 1))
            total = sum(self._score(context, continuation, greedy=False)[0] for context, continuation in pairs)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # -------------------------------------------------------------------------------------------- generation

    def decode_config(self, gen_kwargs: dict[str, Any]) -> Any:
        """The :class:`edlm.config.DecodeConfig` of one request's generation kwargs (``stop`` holds ``until``)."""
        from edlm.config import DecodeConfig

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.config.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        do_sample = kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)  # as lm-eval's HF model
        ignored = set(kwargs) - self._ignored_gen_kwargs
        if ignored:
            logger.warning("edlm ignores the generation kwargs %s", sorted(ignored))
            self._ignored_gen_kwargs |= ignored
        return DecodeConfig(max_new_tokens=max_new, mode=self.config.decode_mode, block_size=self.config.block_size,
                            threshold=self.config.threshold,
                            temperature=(temperature or 1.0) if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
                            seed=self.config.seed, stop=until)

    def _fit_prompt(self, prompt: list[int], cfg: Any) -> list[int]:
        """A non-empty prompt cut from the left so that it, the new tokens (and a dlm's last block) fit."""
        from edlm.generation import decode_block_size

        prompt = prompt or [self.prefix_token_id]
        room = self.max_length - cfg.max_new_tokens - (decode_block_size(self.dlm, cfg) if self.dlm is not None else 0)
        if room < 1:
            raise EdlmError(f"max_gen_toks={cfg.max_new_tokens} leaves no room for a prompt in max_length "
                            f"{self.max_length}")
        if len(prompt) > room:
            logger.debug("prompt of %d tokens cut to its last %d", len(prompt), room)
        return prompt[-room:]

    def _decode(self, prompts: list[list[int]], cfg: Any) -> list[str]:
        """Decoded continuations of a batch of prompts, cut at the stop strings."""
        tok = self.tokenizer
        if self.ar_model is not None:
            from edlm.baseline import ar_generate

            vocab = self.ar_model.get_input_embeddings().weight.shape[0]
            sequences = ar_generate(self.ar_model, prompts, cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                    banned=[self.mask_id] if self.mask_id < vocab else None).sequences
        else:
            from edlm.decode import iter_blocks

            sequences = [[] for _ in prompts]

            def seen_stop(row: int) -> bool:  # asked at block boundaries: a row that printed a stop string is done
                text = tok.decode(sequences[row], skip_special_tokens=True) if cfg.stop else ""
                return cut_at_stop(text, cfg.stop) != text

            with torch.no_grad():
                for new, _ in iter_blocks(self.dlm, prompts, cfg, should_stop=seen_stop):
                    for seq, part in zip(sequences, new):
                        seq.extend(part)
        return [cut_at_stop(tok.decode(seq, skip_special_tokens=True), cfg.stop) for seq in sequences]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generated continuations, ``batch_size`` rows at a time (requests grouped by equal generation settings,
        longest prompts first); a row's text never depends on its batch neighbours."""
        from tqdm import tqdm

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
    from edlm.lm_eval_tasks import TASKS_DIR

    if not args or args in (["run"], ["ls"], ["validate"]) or any(a in ("-h", "--help") for a in args) \
            or any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return args
    return [*args, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """``python -m edlm.lm_eval_adapter [lm-eval arguments]``: lm-eval's CLI with ``--model edlm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *with_edlm_tasks(list(sys.argv[1:] if argv is None else argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    # Run through the importable module, so the registered class is edlm.lm_eval_adapter.EdlmLM, not __main__'s.
    from edlm.lm_eval_adapter import main as _main

    _main()
else:
    register()
