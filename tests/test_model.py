import pytest
import torch
from conftest import FAMILIES, make_dlm

from edlm.checkpoints import tiny_model
from edlm.config import DiffusionConfig
from edlm.errors import EdlmError
from edlm.model import DiffusionLM, add_mask_token
from edlm.noising import noise


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_pattern_with_shift_and_no_masks_equals_source_logits(family):
    model, tokenizer = tiny_model(family, seed=0)
    x = torch.randint(1, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits  # (B, L, V)
        vocab = ref.shape[-1]
        dlm = DiffusionLM.from_ar(model, tokenizer, DiffusionConfig(pattern="causal", token_shift=True, block_size=4))
        got = dlm.training_logits(x, x)  # state at i-1 predicts token i
    torch.testing.assert_close(got[:, 1:, :vocab], ref[:, :-1])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("token_shift", [False, True])
def test_no_leak_from_future_blocks_or_from_the_clean_copy_of_the_same_block(family, token_shift):
    dlm = make_dlm(family, block_size=4, token_shift=token_shift)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(1, 250, (1, 16), generator=g)
    xt = noise(x0, dlm.config, dlm.mask_id, g, t=torch.tensor([0.5])).xt
    with torch.no_grad():
        base = dlm.training_logits(xt, x0)
        # Change block 2 (positions 8..11) in both copies: blocks 0 and 1 must not move.
        x0b, xtb = x0.clone(), xt.clone()
        x0b[:, 8:12] = (x0b[:, 8:12] + 7) % 250
        xtb[:, 8:12] = torch.where(xt[:, 8:12] == dlm.mask_id, xt[:, 8:12], x0b[:, 8:12])
        changed = dlm.training_logits(xtb, x0b)
        # Change only the clean copy of block 1: no noisy position of block <= 1 may see its own answer.
        x0c = x0.clone()
        x0c[:, 4:8] = (x0c[:, 4:8] + 3) % 250
        answer_changed = dlm.training_logits(xt, x0c)
    assert torch.equal(changed[:, :8], base[:, :8])
    assert not torch.allclose(changed[:, 8:], base[:, 8:])
    assert torch.equal(answer_changed[:, :8], base[:, :8])
    assert not torch.allclose(answer_changed[:, 8:], base[:, 8:])  # later blocks do read it (clean context)


def test_block_causal_noisy_has_no_future_leak():
    dlm = make_dlm(block_size=4, pattern="block_causal_noisy")
    x = torch.randint(1, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = dlm.training_logits(x, x)
        y = x.clone()
        y[:, 8:] = 5
        b = dlm.training_logits(y, y)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_mask_token_is_added_with_mean_embedding():
    model, tokenizer = tiny_model("qwen2", seed=0)
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id = add_mask_token(model, tokenizer, "<|mask|>")
    emb = model.get_input_embeddings().weight
    assert mask_id == before.shape[0] and emb.shape[0] == before.shape[0] + 1
    torch.testing.assert_close(emb[mask_id], before.mean(dim=0))
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == mask_id
    assert tokenizer.decode([mask_id]) == "<|mask|>"
    assert add_mask_token(model, tokenizer, "<|mask|>") == mask_id  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == before.shape[0] + 1


def test_loss_counts_only_masked_positions_and_weights_by_ratio():
    dlm = make_dlm(block_size=4, loss_weighting="inv_t")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(1, 250, (2, 8), generator=g)
    noised = noise(x0, dlm.config, dlm.mask_id, g, t=torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        out = dlm.loss(noised)
        logits = dlm.training_logits(noised.xt, x0)
    ce = torch.nn.functional.cross_entropy(logits[noised.masked], x0[noised.masked], reduction="none")
    assert out.n_masked == int(noised.masked.sum()) == 8  # round(0.5 * 4) per block
    torch.testing.assert_close(out.masked_ce, ce.mean())
    torch.testing.assert_close(out.loss, (ce / 0.5).sum() / x0.numel())


def test_save_and_reload_gives_identical_logits(tmp_path):
    dlm = make_dlm("qwen3", block_size=4, token_shift=True, sharpness=3.0)
    x = torch.randint(1, 250, (1, 8))
    dlm.save_pretrained(tmp_path)
    again = DiffusionLM.from_pretrained(tmp_path).eval()
    assert again.config == dlm.config and again.mask_id == dlm.mask_id
    with torch.no_grad():
        torch.testing.assert_close(again.training_logits(x, x), dlm.training_logits(x, x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_clear_errors_for_bad_models(tmp_path):
    with pytest.raises(EdlmError, match="does not exist; give the output folder of edlm convert"):
        DiffusionLM.from_pretrained(tmp_path / "nope")
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "ar")
    tokenizer.save_pretrained(tmp_path / "ar")
    with pytest.raises(EdlmError, match="not a converted edlm model"):
        DiffusionLM.from_pretrained(tmp_path / "ar")
    with pytest.raises(EdlmError, match="no mask token"):
        DiffusionLM(model, tokenizer, DiffusionConfig())
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    from edlm.checkpoints import load_hf

    with pytest.raises(EdlmError, match="not a causal language model"):
        load_hf(tmp_path / "vit")


def test_tiny_model_specs_and_sizes():
    from edlm.checkpoints import parse_tiny_spec, resolve_model

    assert parse_tiny_spec("tiny") == ("llama", (64, 2))
    assert parse_tiny_spec("tiny:qwen3@32x3") == ("qwen3", (32, 3))
    model, _ = resolve_model("tiny:qwen3@32x3")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3
    with pytest.raises(EdlmError, match="HIDDENxLAYERS"):
        parse_tiny_spec("tiny@big")
    with pytest.raises(EdlmError, match="unknown tiny model family"):
        resolve_model("tiny:bert")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_ar_loss_is_the_source_next_token_loss_on_the_clean_copy_in_the_same_forward(family):
    """loss = diffusion_weight x diffusion loss + ar_weight x next-token CE of the plain causal model on x0."""
    import torch.nn.functional as F

    model, tokenizer = tiny_model(family, seed=0)
    joint = DiffusionLM.from_ar(model, tokenizer, DiffusionConfig(block_size=4, token_shift=True, clean_causal=True,
                                                                  ar_weight=1.0, diffusion_weight=0.3))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(1, 250, (2, 16), generator=g)
    noised = noise(x0, joint.config, joint.mask_id, g)
    with torch.no_grad():
        out = joint.loss(noised)
        ref_ar = F.cross_entropy(model(input_ids=x0).logits[:, :-1].flatten(0, 1), x0[:, 1:].flatten())
        diffusion_only = DiffusionLM(model, tokenizer, DiffusionConfig(block_size=4, token_shift=True,
                                                                       clean_causal=True)).loss(noised)
    torch.testing.assert_close(out.ar_ce, ref_ar)
    torch.testing.assert_close(out.loss, 0.3 * diffusion_only.loss + 1.0 * ref_ar)
    assert diffusion_only.ar_ce is None


def test_ar_loss_needs_a_causal_clean_copy():
    with pytest.raises(EdlmError, match="clean_causal: true"):
        DiffusionConfig(ar_weight=1.0)
    with pytest.raises(EdlmError, match="not both 0"):
        DiffusionConfig(ar_weight=0.0, diffusion_weight=0.0)


def test_generate_stops_at_a_stop_string_and_cuts_the_text_there():
    from edlm.config import DecodeConfig

    dlm = make_dlm("llama", peaked=8.0, block_size=4)
    cfg = DecodeConfig(max_new_tokens=24, mode="ar", ignore_eos=True)
    (full,), whole = dlm.generate("hello", cfg, chat=False)
    assert len(full) > 6 and whole.tokens == 24
    stop = full[3:6]
    (cut,), stats = dlm.generate("hello", cfg, chat=False, stop=[stop, "never there"])
    assert cut == full[:full.index(stop)]
    assert stats.tokens < whole.tokens  # the row ended at the step after the stop string appeared
