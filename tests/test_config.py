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
    from edlm.studies.grid import run_config, unique_runs
    from edlm.studies.headline import load_headline_config

    for preset in sorted((REPO / "configs").glob("*.yaml")):
        if preset.name.startswith(("study", "headline")):  # study configs: every run's settings must be valid
            study = load_headline_config(preset).study if preset.name.startswith("headline") \
                else load_study_config(preset)
            assert isinstance(study, StudyConfig)
            for run in unique_runs(expand(study)):
                assert isinstance(run_config(study, run, REPO / "src", ["x.jsonl"]), TrainConfig)
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


def test_demo_recipe_is_the_cpu_preset():
    from edlm.config import to_dict
    from edlm.demo import demo_config

    preset = to_dict(load_train_config(REPO / "configs/smollm2-135m.yaml"))
    demo = to_dict(demo_config(preset["output_dir"], preset["max_steps"]))
    for key in ("model", "diffusion", "data", "micro_batch_size", "grad_accum", "lr", "min_lr", "lr_schedule",
                "warmup_steps", "max_steps"):
        assert demo[key] == preset[key], key
