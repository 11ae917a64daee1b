"""ServeSettings and load_serve_settings (edlm.serve.settings)."""

import pytest

from edlm.config import DecodeConfig
from edlm.errors import ConfigError
from edlm.serve import ServeSettings, load_serve_settings


def test_settings_read_the_api_key_from_the_environment(tmp_path):
    s = load_serve_settings(tmp_path / "my-model", ["max_batch=4"], env={"EDLM_API_KEY": "k1"}, port=9001)
    assert (s.model_id, s.api_key, s.max_batch, s.port) == ("my-model", "k1", 4, 9001)
    assert load_serve_settings(tmp_path, env={"EDLM_API_KEY": "k1"}, api_key="k2").api_key == "k2"
    with pytest.raises(ValueError, match="max_batch"):
        ServeSettings(max_batch=0)


def test_the_decoding_defaults_are_one_decode_config_and_the_old_flat_keys_alias_it(tmp_path):
    assert ServeSettings().decode == DecodeConfig()  # no second copy of the defaults
    flat = load_serve_settings(tmp_path, ["threshold=0.8", "max_tokens=64", "mode=ar", "block_size=8", "top_p=0.5",
                                          "temperature=0.7", "policy=fixed", "tokens_per_step=2"], env={})
    nested = load_serve_settings(tmp_path, ["decode.threshold=0.8", "decode.max_new_tokens=64", "decode.mode=ar",
                                            "decode.block_size=8", "decode.top_p=0.5", "decode.temperature=0.7",
                                            "decode.policy=fixed", "decode.tokens_per_step=2"], env={})
    assert flat == nested
    assert flat.decode == DecodeConfig(threshold=0.8, max_new_tokens=64, mode="ar", block_size=8, top_p=0.5,
                                       temperature=0.7, policy="fixed", tokens_per_step=2)
    assert load_serve_settings(tmp_path, ["decode.use_cache=false"], env={}, threshold=0.6).decode == \
        DecodeConfig(use_cache=False, threshold=0.6)  # explicit fields take the flat names too


def test_decoding_values_are_checked_by_decode_config(tmp_path):
    for override, match in (("threshold=2", "threshold must be in"), ("decode.top_p=0", "top_p must be in"),
                            ("mode=jacobi", "unknown decoding mode"), ("max_tokens=600", "max_tokens_limit"),
                            ("decode.thresold=0.5", "unknown key")):
        with pytest.raises(ConfigError, match=match):
            load_serve_settings(tmp_path, [override], env={})


def test_a_request_replaces_fields_of_the_server_defaults():
    settings = ServeSettings(decode=DecodeConfig(threshold=0.7, max_new_tokens=32))
    cfg = settings.decode_config(threshold=0.5, temperature=None, seed=3)  # None: keep the server's value
    assert cfg == DecodeConfig(threshold=0.5, max_new_tokens=32, seed=3)
    assert settings.decode.threshold == 0.7
    with pytest.raises(ConfigError, match="threshold"):
        settings.decode_config(threshold=1.5)
