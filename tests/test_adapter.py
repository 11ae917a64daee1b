"""Gated adapters over a frozen source: the source is untouched wherever the gate is closed, so the AR mode is the
source and greedy speculative decoding equals Hugging Face generate on the unmodified model, token for token."""

import copy
import json

import pytest
import torch
from test_speculative import assert_drafts_equal_diffusion_steps, oracle_drafts

from edlm.adapter import GatedLoRALinear
from edlm.checkpoints import tiny_model
from edlm.config import DecodeConfig, DiffusionConfig, load_train_config
from edlm.decode import generate
from edlm.errors import ConfigError, EdlmError
from edlm.masks import block_causal_clean, dense_mask, noisy_over_clean, to_attention_mask
from edlm.model import ADAPTER_CONFIG_NAME, DiffusionLM
from edlm.noising import noise_samples

PROMPTS = [[5, 17, 99, 3], [120, 44, 8, 61, 200, 7, 19, 33, 2, 90, 14], [250]]


def gated(family: str = "llama", token_shift: bool = True, block: int = 4, seed: int = 0, random_head: bool = True):
    """(a tiny gated dLM with random adapters, an untouched copy of its source). The output head is random and
    untied (as in test_speculative) so that greedy AR output varies; the adapters are random so that drafting
    columns differ from the source."""
    model, tok = tiny_model(family, seed=0)
    source = copy.deepcopy(model).eval()
    dlm = DiffusionLM.from_ar(model, tok, DiffusionConfig(block_size=block, token_shift=token_shift,
                                                          clean_causal=True))
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(dlm.model.get_output_embeddings().weight.shape, generator=g) * 2  # (V + 1, D): + mask row
    if random_head:  # not part of the source a saved adapter names: models that are not saved only
        dlm.model.get_output_embeddings().weight = torch.nn.Parameter(head)
        source.get_output_embeddings().weight = torch.nn.Parameter(head[:-1].clone())
    dlm.add_gated_adapter(4, 8, source={"model": f"tiny:{family}", "seed": 0})
    with torch.no_grad():
        for p in dlm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return dlm.eval(), source


def hf_greedy(source, prompt: list[int], budget: int) -> list[int]:
    out = source.generate(torch.tensor([prompt]), max_new_tokens=budget, min_new_tokens=budget, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_a_closed_gate_is_the_source_bit_for_bit_and_an_open_one_is_not():
    dlm, source = gated()
    ids = torch.tensor([PROMPTS[1]])
    want = source(input_ids=ids).logits
    got = dlm.model(input_ids=ids).logits[..., :-1]
    assert torch.equal(got, want)
    with dlm.gate.open(slice(0, ids.shape[1])):
        assert not torch.allclose(dlm.model(input_ids=ids).logits[..., :want.shape[-1]], want, atol=1e-3)
    trained = {n for n, p in dlm.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B", "mask_delta")) for n in trained)


@pytest.mark.parametrize("family,token_shift", [("llama", True), ("qwen3", True), ("gemma", True), ("llama", False)])
def test_gated_speculative_and_ar_equal_hf_generate_on_the_untouched_source(monkeypatch, family, token_shift):
    dlm, source = gated(family, token_shift)
    for budget in (6, 13):  # both end mid-block
        want = [hf_greedy(source, p, budget) for p in PROMPTS]
        assert len(set(want[1])) > budget // 3  # the check is not vacuous: output varies
        cfg = DecodeConfig(max_new_tokens=budget, ignore_eos=True)
        assert generate(dlm, PROMPTS, DecodeConfig(**{**cfg.__dict__, "mode": "ar"})).sequences == want
        for wrong_every in (None, 0, 3):  # None: the adapter's own drafts; else oracle drafts, wrong every 3rd
            monkeypatch.undo()  # drafts of this budget only
            if wrong_every is not None:
                oracle_drafts(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, want)}, wrong_every)
            out = generate(dlm, PROMPTS, DecodeConfig(**{**cfg.__dict__, "mode": "speculative"}))
            assert out.sequences == want, (budget, wrong_every)  # batched rows of different lengths
            if wrong_every == 0 and budget == 13:
                assert out.stats.tokens_per_forward > 2.0


def test_gated_speculative_with_stop_strings_equals_the_source_cut_at_the_stop():
    dlm, source = gated()
    prompt = PROMPTS[1]
    full = dlm.tokenizer.decode(hf_greedy(source, prompt, 24), skip_special_tokens=True)
    # A stop string of plain characters first seen in the second half (the byte-level tokenizer also decodes
    # partial UTF-8 sequences to U+FFFD, which could match earlier in a cut-off text).
    at = next(i for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].isascii()
              and full[i:i + 2].isprintable() and full.index(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    texts, _ = dlm.complete([prompt], DecodeConfig(mode="speculative", max_new_tokens=24, ignore_eos=True,
                                                   stop=[stop]))
    assert stop and texts[0] == full[:full.index(stop)]


def test_a_gated_drafted_block_predicts_as_a_diffusion_step_on_its_prefix():
    """The adapters act on the speculative step's noisy blocks alone: a drafted block's logits are those of a
    diffusion step on its prefix, the clean columns (source weights) seen only before the block's start."""
    assert_drafts_equal_diffusion_steps(gated()[0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gated_cached_diffusion_equals_full_recompute(family):
    dlm, _ = gated(family)
    cfg = DecodeConfig(max_new_tokens=13, ignore_eos=True, threshold=0.2)
    cached = generate(dlm, PROMPTS, cfg)
    full = generate(dlm, PROMPTS, DecodeConfig(**{**cfg.__dict__, "use_cache": False}))
    assert cached.sequences == full.sequences
    assert cached.stats.forwards < 13 * 3 / 1.5  # several tokens per forward at this threshold


def test_a_gate_of_all_ones_is_ungated_lora():
    from peft import LoraConfig, get_peft_model

    dlm, source = gated()
    peft = get_peft_model(copy.deepcopy(source), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gated_layers = {n: m for n, m in dlm.model.named_modules() if isinstance(m, GatedLoRALinear)}
    with torch.no_grad():
        for name, mod in peft.named_modules():
            if hasattr(mod, "lora_A") and isinstance(mod.lora_A, torch.nn.ModuleDict):
                ours = gated_layers[name.removeprefix("base_model.model.")]
                mod.lora_A["default"].weight.copy_(ours.lora_A)
                mod.lora_B["default"].weight.copy_(ours.lora_B)
    assert len(gated_layers) == 14  # 7 linears x 2 layers
    ids = torch.tensor([PROMPTS[1]])
    with dlm.gate.open(torch.ones(ids.shape)):
        ours = dlm.model(input_ids=ids).logits[..., :-1]  # the mask token's logit is the one extra column
    torch.testing.assert_close(ours, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_two_stream_training_forward_equals_the_joint_forward():
    """The clean copy run first without autograd and passed as a cache gives the joint [xt ; x0] forward's noisy
    logits, for the noisy_over_clean mask is the joint mask's noisy rows with the clean keys first."""
    n, block = 16, 4
    joint = dense_mask(block_causal_clean(n, block, True), 2 * n, 2 * n)
    assert torch.equal(dense_mask(noisy_over_clean(n, block), n, 2 * n),
                       torch.cat([joint[:n, n:], joint[:n, :n]], dim=1))
    for token_shift in (True, False):
        dlm, _ = gated(token_shift=token_shift)
        x0 = torch.randint(0, 250, (2, n))
        noised = noise_samples(x0, dlm.config, dlm.mask_id, 0, [0, 1])
        two = dlm._gated_training_forward(noised.xt, x0)
        gate = torch.zeros(2, 2 * n)
        gate[:, :n] = 1
        positions = torch.arange(n).repeat(2)[None].expand(2, -1)
        ref = dlm.run(torch.cat([noised.xt, x0], 1), positions, to_attention_mask(joint, torch.float32, "sdpa"),
                      keep=dlm.prediction_index(n, x0.device), noisy=gate).logits
        torch.testing.assert_close(two, ref, rtol=1e-4, atol=1e-4)
        loss = dlm.loss(noised).loss
        loss.backward()
        grads = [p.grad for p in dlm.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_adapter_folder_round_trip_and_clear_errors(tmp_path):
    dlm, _ = gated(random_head=False)
    dlm.save_pretrained(tmp_path / "a")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"adapter.safetensors", ADAPTER_CONFIG_NAME, "edlm_config.json"}
    assert (tmp_path / "a" / "adapter.safetensors").stat().st_size < 200_000  # the adapter only, not the source
    back = DiffusionLM.from_pretrained(tmp_path / "a")
    cfg = DecodeConfig(max_new_tokens=9, ignore_eos=True, threshold=0.3)
    assert generate(back, PROMPTS, cfg).sequences == generate(dlm, PROMPTS, cfg).sequences
    # An adapter on a source it was not trained on is refused with the fix.
    with pytest.raises(EdlmError, match="does not belong to the source"):
        DiffusionLM.from_pretrained(tmp_path / "a", source="tiny:qwen3")
    spec = json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())
    spec["source"]["seed"] = 7  # another random tiny model of the same shape
    (tmp_path / "a" / ADAPTER_CONFIG_NAME).write_text(json.dumps(spec))
    with pytest.raises(EdlmError, match="embeddings differ"):
        DiffusionLM.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").unlink()
    with pytest.raises(EdlmError, match="incomplete"):
        DiffusionLM.from_pretrained(tmp_path / "a")


def test_gated_config_needs_the_sources_causal_context():
    with pytest.raises(ConfigError, match="clean_causal: true"):
        load_train_config(None, ["lora.gated=true", "lora.r=4"], model="tiny")
    cfg = load_train_config(None, ["lora.gated=true", "diffusion.clean_causal=true", "lora.layers=[-1]"],
                            model="tiny")
    assert cfg.lora.gated and cfg.lora.layers == [-1]
    with pytest.raises(ConfigError, match="gated adapters only"):
        load_train_config(None, ["lora.layers=[0]", "diffusion.clean_causal=true"], model="tiny")


def test_gated_conversion_trains_only_the_adapter_checkpoints_small_and_resumes_exactly(tmp_path):
    from edlm.train import convert

    settings = ["lora.gated=true", "lora.r=4", "lora.alpha=8", "diffusion.clean_causal=true",
                "diffusion.token_shift=true", "diffusion.block_size=4", "data.seq_len=32", "lr=3e-3",
                "log_every=1", "save_every=3"]
    full = convert(load_train_config(None, settings, model="tiny", max_steps=6, output_dir=str(tmp_path / "full"),
                                     data={"corpus": ["builtin:tiny"], "seq_len": 32}))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < 400_000  # no source weights
    dlm = DiffusionLM.from_pretrained(full)
    source, _ = tiny_model("llama", seed=0)
    for name, p in source.named_parameters():  # the source is untouched
        ours = dlm.model.get_parameter(name.replace("proj.weight", "proj.base.weight").replace(
            "embed_tokens.weight", "embed_tokens.base.weight"))
        assert torch.equal(ours[:p.shape[0]], p), name

    class Stop(Exception):
        pass

    def stop_at_5(step, total, info):
        if step == 5:
            raise Stop

    cut_cfg = load_train_config(None, settings, model="tiny", max_steps=6, output_dir=str(tmp_path / "cut"),
                                data={"corpus": ["builtin:tiny"], "seq_len": 32})
    with pytest.raises(Stop):
        convert(cut_cfg, progress=stop_at_5)
    convert(cut_cfg, resume=True)
    a = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 6 and a == pytest.approx(b, rel=1e-5)
