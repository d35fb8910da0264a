"""Finding the model named by MODEL_NAME: every way it can be wrong is one line that says which."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bot.engine.loading import ModelLoadError, NotAChatModel, check_model_name, load_tokenizer_and_model


@pytest.mark.parametrize("name", ["/nonexistent/dir", "./tiny", "../tiny", "~/no-such-model-here", "a/b/c", "tiny/"])
def test_a_missing_local_path_does_not_exist(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        check_model_name(name)
    where = os.path.abspath(os.path.expanduser(name))
    assert str(raised.value) == f"MODEL_NAME {name} does not exist (no folder at {where})"


@pytest.mark.parametrize("name", ["facebook/blenderbot-400M-distill", "gpt2", "some-org/model_v1.5"])
def test_hub_ids_pass_unchanged(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_model_name(name) == name


def test_wrong_kinds_of_local_path(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"is a folder without config\.json"):
        check_model_name(str(tmp_path))
    with pytest.raises(ModelLoadError, match="is a file"):
        check_model_name(str(tmp_path / "file.txt"))
    with pytest.raises(ModelLoadError, match="neither a local folder nor a Hugging Face hub id"):
        check_model_name("not a model")


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("gpt2", r"it is a 'gpt2' model; this engine steps decoder-only llama, qwen2, qwen3 models"),
        (
            "bart",
            r"it is a bart model; of the encoder-decoder models this bot runs BlenderBot \(model_type blenderbot\)",
        ),
    ],
)
def test_a_local_model_of_the_wrong_kind_is_refused_before_its_weights_load(
    tmp_path: Path, model_type: str, expected: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(NotAChatModel, match=f"^{expected}$"):
        load_tokenizer_and_model(str(tmp_path))


def test_a_chat_model_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    from tests.tiny_causal_model import build_tiny_causal_model

    model_dir = build_tiny_causal_model(tmp_path / "model", chat_template=None)
    with pytest.raises(NotAChatModel, match=r"^it has no chat template, so there is no way to turn a conversation"):
        load_tokenizer_and_model(str(model_dir))


def test_a_hub_model_not_in_the_cache_is_not_downloaded_offline() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    with pytest.raises(ModelLoadError, match="not in the local model cache, and HF_HUB_OFFLINE forbids downloading"):
        load_tokenizer_and_model("nobody-here/no-such-model-for-tests")


def test_loads_a_local_folder(tiny_model_dir: Path) -> None:
    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    assert model.config.is_encoder_decoder and next(model.parameters()).dtype.is_floating_point
    assert tokenizer("hello")["input_ids"]
