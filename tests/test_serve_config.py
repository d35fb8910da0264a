"""serve.yaml is a valid Ray Serve config, and its application builds from its args (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from bot.serve import DEPLOYMENT_NAME, app_builder
from config.settings import SettingsError

CONFIG = Path(__file__).resolve().parents[1] / "serve.yaml"


def test_serve_yaml_is_a_valid_config_whose_app_builds() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "bot.serve:app_builder"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    built = app_builder(dict(app.args))
    assert built is not None


def test_unknown_or_bad_args_are_one_line_errors() -> None:
    with pytest.raises(SettingsError, match="unknown settings in the application's args: MODEL"):
        app_builder({"MODEL": "x"})
    with pytest.raises(SettingsError, match=r"^PRECISION must be one of"):
        app_builder({"PRECISION": "int4"})


def test_a_metrics_port_in_use_is_one_line_before_ray_starts(
    tiny_chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from bot.serve import main
    from tests.fake_openai import free_port

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.chdir(tmp_path)  # no .env of the developer's
        monkeypatch.setenv("MODEL_NAME", str(tiny_chat_model_dir))
        monkeypatch.setenv("METRICS_PORT", str(port))
        monkeypatch.setenv("SERVE_PORT", str(free_port()))

        def never(*args: object, **kwargs: object) -> None:
            raise AssertionError("Ray was started")

        monkeypatch.setattr("ray.init", never)
        assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"Configuration error: METRICS_PORT {port} on 127.0.0.1:") and "\n" not in err
