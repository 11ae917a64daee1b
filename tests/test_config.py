import pytest

from edlm.config import DecodeConfig, DiffusionConfig, TrainConfig, load_train_config
from edlm.errors import ConfigError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_block_size_must_divide_seq_len():
    with pytest.raises(ConfigError, match="not a multiple of diffusion.block_size"):
        load_train_config(None, ["data.seq_len=60", "diffusion.block_size=16"])


@pytest.mark.parametrize("override,match", [
    ("diffusion.sharpness=1000", "sharpness"),
    ("diffusion.eps=0", "eps"),
    ("diffusion.schedule=cosine", "unknown masking schedule"),
    ("diffusion.pattern=sliding", "unknown attention pattern"),
    ("diffusion.block_sise=8", "unknown key"),
    ("lr=-1", "lr must be"),
])
def test_out_of_range_and_unknown_values_are_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [override])


def test_presets_load_and_overrides_apply():
    from edlm.studies import StudyConfig, expand, load_study_config
    from edlm.studies.grid import run_config, source_config, unique_runs
    from edlm.studies.headline import load_headline_config

    for preset in sorted((REPO / "configs").glob("*.yaml")):
        if preset.name.startswith(("study", "headline")):  # study configs: every run's settings must be valid
            study = load_headline_config(preset).study if preset.name.startswith("headline") \
                else load_study_config(preset)
            assert isinstance(study, StudyConfig)
            if not study.source.get("pretrained"):  # the AR source, trained by the same loop
                assert isinstance(source_config(study, ["x.jsonl"]), TrainConfig)
            for run in unique_runs(expand(study)):
                assert isinstance(run_config(study, run, REPO / "src", ["x.jsonl"]), TrainConfig)
        elif "block-drafter" in preset.name:  # the block drafter's recipe
            from edlm.drafter_train import DrafterTrainConfig, is_block_drafter_config, load_config

            assert is_block_drafter_config(preset) and isinstance(load_config(preset), DrafterTrainConfig)
        elif "drafter" in preset.name:  # the gated drafter recipe: its convert section is a gated TrainConfig
            from edlm.studies.drafter import load_drafter_config

            assert load_drafter_config(preset).convert.lora.gated
        else:
            assert isinstance(load_train_config(preset), TrainConfig)
        first = preset.read_text().splitlines()[0]
        assert first.startswith("# edlm ") or first.startswith("# accelerate "), preset  # first line: the command
    cfg = load_train_config(REPO / "configs/tiny.yaml", ["diffusion.block_size=4", "lr=1e-4"], max_steps=7)
    assert cfg.diffusion.block_size == 4 and cfg.lr == 1e-4 and cfg.max_steps == 7
    assert isinstance(cfg.diffusion, DiffusionConfig)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(bad)


def test_decode_config_validation():
    with pytest.raises(ConfigError, match="threshold"):
        DecodeConfig(threshold=0.0)
    with pytest.raises(ConfigError, match="threshold"):
        DecodeConfig(threshold=1.5)
    assert DecodeConfig(threshold=1.0).threshold == 1.0


def test_headline_decoding_is_one_decode_config_and_the_old_keys_still_load(tmp_path):
    from edlm.studies.grid import StudyConfig
    from edlm.studies.headline import HeadlineSettings, load_headline_config

    assert HeadlineSettings().decode == DecodeConfig() and StudyConfig().thresholds == [DecodeConfig().threshold]
    text = (REPO / "configs/headline.yaml").read_text()
    new = load_headline_config(REPO / "configs/headline.yaml").headline
    line = next(x for x in text.splitlines() if x.startswith("  decode: {threshold: 0.9}"))
    (tmp_path / "old.yaml").write_text(text.replace(line, "  threshold: 0.9"))  # the key before `decode:` existed
    old = load_headline_config(tmp_path / "old.yaml").headline
    assert old.decode == new.decode == DecodeConfig(threshold=0.9)
    moved = load_headline_config(REPO / "configs/headline.yaml", ["headline.threshold=0.7", "headline.block_size=4"])
    assert (moved.headline.decode.threshold, moved.headline.decode.block_size) == (0.7, 4)
    both = load_headline_config(REPO / "configs/headline.yaml", ["headline.decode.threshold=0.8"])
    assert both.headline.decode.threshold == 0.8
    with pytest.raises(ConfigError, match="threshold"):
        load_headline_config(REPO / "configs/headline.yaml", ["headline.threshold=1.5"])
