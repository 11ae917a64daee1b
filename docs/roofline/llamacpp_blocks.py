"""Prototype: can llama.cpp run edlm's block decoder, and is that faster than the compiled PyTorch engine?

Issue 26, item 4. llama.cpp's low-level API (through llama-cpp-python) has what a block decoder needs:

- ``llama_set_causal_attn(ctx, False)``: every token of a call attends to every cached cell of its sequence and to
  every token of the call (bidirectional inside the block, the cached clean context before it);
- ``llama_memory_seq_rm``: the noisy block's cells are removed after each step, as ``CachedStepper`` crops them;
- a cell can belong to several sequences (``kv_unified``), and a query sees only the cells of one of its sequences.
  That gives edlm's fused forward exactly: the finished block is encoded as clean context in the same call as the
  first step of the next block. Clean cells belong to sequences {0, 1}; the noisy block's tokens to 1 alone, and
  seq 1 is removed from the noisy cells after each step, which frees them. Measured here (llama.cpp of
  llama-cpp-python 0.3.36): a token given the ids ``[1, 0]`` sees the cells of seq 0 only (the clean context and
  its own block), while ``[0, 1]`` sees those of seq 1 (the noisy block too), so clean tokens get ``[1, 0]``.

What it does (one command, a few minutes on 2 cores):

1. exports a converted folder (default ``runs/smol2``: ``edlm convert --config configs/smollm2-135m.yaml
   --output-dir runs/smol2 --set max_steps=2``) to GGUF F32, mask token included, and lets llama.cpp requantize it
   to Q8_0 (:func:`edlm.bench.llamacpp.q8_0_gguf`);
2. times llama.cpp calls of width 1 (causal) and 8 / 16 (non-causal, against a cached context, cells removed after);
3. decodes the benchmark prompts with the block decoder on llama.cpp (forced k tokens per step, the ``fixed``
   policy, and AR) and compares the tokens with edlm's eager decoder on the same weights;
4. times the same calls and the same forced-TPF decoding on edlm's compiled engine at int8 (``--compile --dtype
   int8``, fbgemm), in the same process, for the side-by-side;
5. writes the numbers to ``docs/roofline/llamacpp-blocks-avx2.json``.

    python docs/roofline/llamacpp_blocks.py --model runs/smol2 --threads 2

Needs ``pip install llama-cpp-python gguf`` (the ``[llamacpp]`` extra).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path
from statistics import median

import numpy as np

# ---------------------------------------------------------------------------------------------------- export


def _rope_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from Hugging Face's rotate-half rotary layout (the two halves of
    each head rotate together) to llama.cpp's interleaved one (neighbouring rows rotate together)."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def export_gguf(model_dir: Path, template: Path, out: Path) -> Path:
    """Write the Llama-architecture weights of ``model_dir`` as a GGUF F32 file, the tokenizer metadata taken from
    ``template`` (the source's GGUF) with the mask token appended."""
    import gguf
    from safetensors.numpy import load_file

    if out.is_file():
        return out
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg["model_type"] not in ("llama", "mistral"):
        raise SystemExit(f"the prototype exports Llama-architecture models only, not {cfg['model_type']!r}")
    edlm_cfg = json.loads((model_dir / "edlm_config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(template))
    writer = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    vocab = cfg["vocab_size"]
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type",
            "llama.vocab_size", "general.quantization_version"}
    for key, field in reader.fields.items():
        if key in skip:
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if key == "tokenizer.ggml.tokens":
            value = value + [edlm_cfg["mask_token"]] * (vocab - len(value))
        elif key == "tokenizer.ggml.token_type":
            value = value + [gguf.TokenType.CONTROL] * (vocab - len(value))
        writer.add_key_value(key, value, kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].astype(np.float32))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].astype(np.float32))
    if "lm_head.weight" in weights and not cfg.get("tie_word_embeddings"):
        writer.add_tensor("output.weight", weights["lm_head.weight"].astype(np.float32))
    for i in range(cfg["num_hidden_layers"]):
        for hf, name in names.items():
            w = weights[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
            if name == "attn_q":
                w = _rope_pairs(w, heads)
            elif name == "attn_k":
                w = _rope_pairs(w, kv_heads)
            writer.add_tensor(f"blk.{i}.{name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".tmp", out)
    return out


# ---------------------------------------------------------------------------------------------------- runtime


CLEAN = [(1, 0)]  # sees seq 0: the clean cells (see the module docstring for the order)
NOISY = [(1,)]  # sees seq 1: the clean cells and the noisy block


class Blocks:
    """A llama.cpp context driven token by token: calls of any width, causal or not, with sequence sets."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int = 1024, kv_f32: bool = False):
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, data: None)  # kept alive with the object
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, 2
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        if kv_f32:  # llama.cpp's default K/V cache is F16: F32 for the comparison with edlm's fp32 tokens
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, 2)

    def reset(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def call(self, tokens: list[int], positions: list[int], seqs: list[tuple[int, ...]], want: list[int],
             causal: bool) -> np.ndarray:
        """One llama_decode; returns the logits (len(want), V) at the call-relative indices ``want``."""
        b, L = self.batch, self.L
        b.n_tokens = len(tokens)
        wanted = set(want)
        for i, (t, p, s) in enumerate(zip(tokens, positions, seqs)):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, p, len(s)
            for j, q in enumerate(s):
                b.seq_id[i][j] = q
            b.logits[i] = i in wanted
        L.llama_set_causal_attn(self.ctx, causal)
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = np.empty((len(want), self.n_vocab), dtype=np.float32)
        for k, i in enumerate(want):
            ptr = L.llama_get_logits_ith(self.ctx, i)
            out[k] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def remove(self, seq: int, p0: int, p1: int = -1) -> None:
        self.L.llama_memory_seq_rm(self.mem, seq, p0, p1)


def ar(rt: Blocks, prompt: list[int], n: int, banned: int | None) -> tuple[list[int], int]:
    """Greedy AR: the prompt in one causal call, then one token per call. Returns (tokens, forwards)."""
    rt.reset()
    logits = rt.call(prompt, list(range(len(prompt))), [(0,)] * len(prompt), [len(prompt) - 1], causal=True)
    out, forwards = [], 1
    while len(out) < n:
        if banned is not None:
            logits[:, banned] = -np.inf
        out.append(int(logits[0].argmax()))
        if len(out) == n:
            break
        p = len(prompt) + len(out) - 1
        logits = rt.call([out[-1]], [p], [(0,)], [0], causal=True)
        forwards += 1
    return out, forwards


def blocks(rt: Blocks, prompt: list[int], n: int, block: int, mask_id: int, per_step: int | None,
           threshold: float = 0.9) -> tuple[list[int], int]:
    """edlm's cached block decoder (ignore EOS, greedy) on llama.cpp. ``per_step``: commit that many of the most
    confident masked positions per step (the ``fixed`` policy); None: every position whose probability is at least
    ``threshold``, and always the most confident (``threshold``). Returns (new tokens, forwards)."""
    rt.reset()
    seq = list(prompt)
    start = (len(prompt) // block) * block
    # the prompt's full blocks, one causal-across/bidirectional-inside call each except the last, which is fused
    # with the first step of the first block
    for s in range(0, max(0, start - block), block):
        rt.call(seq[s:s + block], list(range(s, s + block)), CLEAN * block, [], causal=False)
    cached = max(0, start - block)
    forwards = start // block - (1 if start else 0)
    total = len(prompt) + n
    while len(seq) < total:
        stop = start + block
        blk = seq[start:stop] + [mask_id] * (stop - len(seq))
        open_ = [i for i in range(block) if start + i >= len(seq) and start + i < total]
        while open_:
            clean = seq[cached:start]
            tokens = clean + blk
            seqs = CLEAN * len(clean) + NOISY * block
            want = [len(clean) + i for i in open_]
            logits = rt.call(tokens, list(range(cached, stop)), seqs, want, causal=False)
            forwards += 1
            rt.remove(1, start, -1)  # the noisy cells go; the clean ones stay in seqs {0, 1}
            cached = start
            logits[:, mask_id] = -np.inf
            z = logits - logits.max(axis=1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            best, conf = prob.argmax(axis=1), prob.max(axis=1)
            order = sorted(range(len(open_)), key=lambda k: -conf[k])  # stable, as torch's argsort(stable=True)
            if per_step is not None:
                pick = order[:per_step]
            else:
                pick = [k for k in range(len(open_)) if conf[k] >= threshold] or order[:1]
            for k in pick:
                blk[open_[k]] = int(best[k])
            open_ = [i for k, i in enumerate(open_) if k not in set(pick)]
        seq = seq[:start] + blk[:total - start]
        start = stop
    return seq[len(prompt):total], forwards


# ---------------------------------------------------------------------------------------------------- measurements


def width_times(rt: Blocks, context: int, widths: list[int], repeats: int) -> dict[str, float]:
    """Median ms of one call of each width against ``context`` cached tokens (cells removed after each call)."""
    rt.reset()
    rt.call(list(range(100, 100 + context)), list(range(context)), CLEAN * context, [], causal=True)
    out = {}
    for w in widths:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.call(list(range(200, 200 + w)), list(range(context, context + w)), NOISY * w, list(range(w)),
                    causal=w == 1)
            times.append(time.perf_counter() - t0)
            rt.remove(1, context, -1)
        out[str(w)] = 1000 * median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/smol2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="docs/roofline/llamacpp-blocks-avx2.json")
    args = ap.parse_args()

    import torch

    from edlm.assets import cache_dir, default_chat_prompts
    from edlm.assets.embedded import smollm2_gguf_path
    from edlm.bench.llamacpp import q8_0_gguf
    from edlm.config import DecodeConfig
    from edlm.decode import generate
    from edlm.model import DiffusionLM

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = export_gguf(model_dir, smollm2_gguf_path(), folder / f"{model_dir.name}.F32.gguf")
    q8 = q8_0_gguf(f32)  # llama.cpp's own quantizer, cached beside the F32 file
    dlm = DiffusionLM.from_pretrained(str(model_dir))
    block, mask_id = dlm.config.block_size, dlm.mask_id
    prompts = [dlm.encode(t) for t in default_chat_prompts()]
    result: dict = {"model": str(model_dir), "threads": args.threads, "tokens": args.tokens, "block": block,
                    "prompts": len(prompts)}

    # 1. the tokens: llama.cpp F32 against edlm eager fp32, same weights, greedy, EOS ignored
    rt = Blocks(f32, args.threads, kv_f32=True)
    agree = {}
    for name, per_step in (("ar", None), ("tpf4", 4), ("tpf2", 2)):
        cfg = DecodeConfig(mode="ar" if name == "ar" else "diffusion", policy="fixed", tokens_per_step=per_step or 1,
                           max_new_tokens=args.tokens, ignore_eos=True, temperature=0.0)
        ref = generate(dlm, prompts, cfg).sequences
        mine = [ar(rt, p, args.tokens, mask_id)[0] if per_step is None else
                blocks(rt, p, args.tokens, block, mask_id, per_step)[0] for p in prompts]
        same = sum(a == b for r, m in zip(ref, mine) for a, b in zip(r, m))
        agree[name] = {"equal_tokens": same, "tokens": sum(len(r) for r in ref),
                       "equal_sequences": sum(r == m for r, m in zip(ref, mine))}
    result["agreement_f32_vs_edlm_eager"] = agree
    del rt

    # 2. speed on Q8_0 (int8's bytes per weight)
    rt = Blocks(q8, args.threads)
    result["call_ms_q8_0"] = {f"context{c}": width_times(rt, c, [1, 2, 4, 8, 16], 5 * args.repeats)
                              for c in (64, 256)}
    rows = {}
    for name, per_step, thr in (("ar", None, None), ("forced_tpf2", 2, None), ("forced_tpf4", 4, None),
                                ("forced_tpf8", 8, None), ("threshold_0.9", None, 0.9)):
        times, fw, toks = [], 0, 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fw = toks = 0
            for p in prompts:
                if name == "ar":
                    out, f = ar(rt, p, args.tokens, mask_id)
                else:
                    out, f = blocks(rt, p, args.tokens, block, mask_id, per_step, thr or 0.9)
                fw, toks = fw + f, toks + len(out)
            times.append(time.perf_counter() - t0)
        rows[name] = {"tokens_per_s": toks / median(times), "forwards": fw, "tokens": toks,
                      "tokens_per_forward": toks / fw}
    for row in rows.values():
        row["speedup_vs_ar"] = row["tokens_per_s"] / rows["ar"]["tokens_per_s"]
    result["decode_q8_0"] = rows
    del rt

    # 3. the compiled engine at int8, the same calls and decoding, same process
    from edlm.bench.timing import forward_times
    from edlm.engine import compile_dlm

    eng = compile_dlm(DiffusionLM.from_pretrained(str(model_dir)).eval(), "int8")
    result["call_ms_engine_int8"] = {
        f"context{c}": {str(w): 1000 * t for w, t in forward_times(eng.model, c, (1, 2, 4, 8, 16),
                                                                  repeats=5 * args.repeats, token=mask_id).items()}
        for c in (64, 256)}
    rows = {}
    for name, per_step in (("ar", None), ("forced_tpf4", 4), ("forced_tpf8", 8)):
        cfg = DecodeConfig(mode="ar" if per_step is None else "diffusion", policy="fixed",
                           tokens_per_step=per_step or 1, max_new_tokens=args.tokens, ignore_eos=True)
        generate(eng, prompts[:1], cfg)  # warm-up: compiles the widths this mode uses
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = [generate(eng, [p], cfg) for p in prompts]
            times.append(time.perf_counter() - t0)
        toks, fw = sum(o.stats.tokens for o in out), sum(o.stats.forwards for o in out)
        rows[name] = {"tokens_per_s": toks / median(times), "forwards": fw, "tokens": toks,
                      "tokens_per_forward": toks / fw}
    for row in rows.values():
        row["speedup_vs_engine_ar"] = row["tokens_per_s"] / rows["ar"]["tokens_per_s"]
        row["speedup_vs_llamacpp_ar"] = row["tokens_per_s"] / result["decode_q8_0"]["ar"]["tokens_per_s"]
    result["decode_engine_int8"] = rows
    result["engine_compile_s"] = sum(eng.model.compile_s.values())
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
