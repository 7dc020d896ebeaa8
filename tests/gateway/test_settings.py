"""Settings come from the environment and the config file, both through Settings: the
engine's model and dtype included, conflicts and unknown keys refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.gateway.settings import Settings, SettingsError


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"SLUICE_DATA_DIR": str(tmp_path / "data"), **extra}


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    return str(path)


def test_model_and_dtype_come_from_the_env_mapping_given(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_MODEL", "/from/the/process/env")
    settings = Settings.from_env(env=_env(tmp_path, SLUICE_MODEL="/ckpt/mixtral",
                                          SLUICE_DTYPE="bfloat16"))
    assert settings.backends["local"].options == {"model": "/ckpt/mixtral", "dtype": "bfloat16"}
    # Only the mapping passed in counts: the process environment is not read behind it.
    assert Settings.from_env(env=_env(tmp_path)).backends["local"].options == {}


def test_env_fills_in_the_config_files_engine_backend(tmp_path: Path) -> None:
    path = _config(tmp_path, '[backends.mixtral]\nplugin = "local"\n'
                             '[backends.mixtral.options]\nserved_model_name = "m"\n'
                             '[backends.echo]\nplugin = "echo"\n')
    settings = Settings.from_env(env=_env(tmp_path, SLUICE_CONFIG=path, SLUICE_MODEL="/ckpt",
                                          SLUICE_DTYPE="fp8"))
    assert settings.backends["mixtral"].options == {"served_model_name": "m", "model": "/ckpt",
                                                    "dtype": "fp8"}
    assert settings.backends["echo"].options == {}


def test_env_and_config_file_disagreeing_is_an_error(tmp_path: Path) -> None:
    path = _config(tmp_path, '[backends.local]\nplugin = "local"\n'
                             '[backends.local.options]\nmodel = "/a"\n')
    with pytest.raises(SettingsError, match="SLUICE_MODEL=/b conflicts with model = '/a'"):
        Settings.from_env(env=_env(tmp_path, SLUICE_CONFIG=path, SLUICE_MODEL="/b"))
    # The same value in both places is no conflict.
    same = Settings.from_env(env=_env(tmp_path, SLUICE_CONFIG=path, SLUICE_MODEL="/a"))
    assert same.backends["local"].options == {"model": "/a"}


def test_env_model_without_an_engine_backend_is_not_dropped_silently(tmp_path: Path) -> None:
    path = _config(tmp_path, '[backends.echo]\nplugin = "echo"\n')
    with pytest.raises(SettingsError, match="SLUICE_DTYPE is set but no backend uses plugin"):
        Settings.from_env(env=_env(tmp_path, SLUICE_CONFIG=path, SLUICE_DTYPE="bfloat16"))


def test_unknown_keys_in_the_config_file_are_an_error(tmp_path: Path) -> None:
    path = _config(tmp_path, '[backends.echo]\nplugin = "echo"\nsurprise = 1\n')
    with pytest.raises(SettingsError, match="backends.echo.surprise"):
        Settings.from_env(env=_env(tmp_path, SLUICE_CONFIG=path))


def test_files_live_in_the_data_dir_never_the_working_directory(tmp_path: Path) -> None:
    settings = Settings.from_env(env=_env(tmp_path))
    assert settings.data_dir == tmp_path / "data"
    assert settings.spool_dir == tmp_path / "data" / "spool"
    assert (tmp_path / "data" / "jwt_secret").read_text().strip() == settings.admin_jwt_secret
    xdg = Settings.from_env(env={"XDG_STATE_HOME": str(tmp_path / "xdg")})
    assert xdg.data_dir == tmp_path / "xdg" / "sluice" and xdg.data_dir.is_absolute()
    explicit = Settings.from_env(env=_env(tmp_path, SLUICE_SPOOL_DIR=str(tmp_path / "sp")))
    assert explicit.spool_dir == tmp_path / "sp"


def test_stripe_settings_come_through_settings_and_stay_out_of_reprs(tmp_path: Path) -> None:
    settings = Settings.from_env(env=_env(tmp_path, STRIPE_API_KEY="sk_live_secret",
                                          SLUICE_STRIPE_API_BASE="http://127.0.0.1:1",
                                          SLUICE_STRIPE_INPUT_METER="in_tok"))
    assert (settings.stripe_api_key, settings.stripe_api_base) == ("sk_live_secret",
                                                                   "http://127.0.0.1:1")
    assert (settings.stripe_input_meter, settings.stripe_output_meter) == (
        "in_tok", "sluice_output_tokens")
    assert "sk_live_secret" not in repr(settings)
