"""Find and load the tokenizer and model named by MODEL_NAME: a local folder or a Hugging Face hub id.

Every failure becomes one `ModelLoadError` line that says what is wrong (a missing folder, a model
the hub does not have, no network) instead of transformers' and huggingface_hub's own messages.
A hub model already in the local cache loads without touching the network; one that is not gets a
single quick request first, so an unreachable hub is reported at once rather than after minutes of
retries.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# A hub id is `name` or `namespace/name`: letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_EXAMPLE = "facebook/blenderbot-400M-distill"


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded or loaded; the message is one line."""


class NotAChatModel(ModelLoadError):
    """The model exists but is not one this bot can chat with (found before any weights load)."""


def looks_like_path(name: str) -> bool:
    """True for what can only be a local path, never a hub id.

    That is: absolute, starting with `.` or `~`, holding a backslash, ending in a separator, or with
    more than the one `/` of `namespace/name`.
    """
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.endswith(os.sep)
        or name.count("/") + (name.count(os.sep) if os.sep != "/" else 0) > 1
    )


def check_model_name(name: str) -> str:
    """What to hand to `from_pretrained`: an existing local model folder (`~` expanded) or a hub id.

    Loads nothing and needs no network, so the entrypoint can check MODEL_NAME before anything starts.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"MODEL_NAME {name} is a folder without config.json; a local model is a folder written by "
                "save_pretrained()"
            )
        return str(path)
    if path.exists():
        raise ModelLoadError(f"MODEL_NAME {name} is a file; a local model is the folder that holds its config.json")
    if looks_like_path(name):
        raise ModelLoadError(f"MODEL_NAME {name} does not exist (no folder at {os.path.abspath(path)})")
    if not _HUB_ID.match(name) or ".." in name or "--" in name or name.endswith((".", "-")):
        raise ModelLoadError(f"MODEL_NAME {name!r} is neither a local folder nor a Hugging Face hub id like {_EXAMPLE}")
    return name


def load_tokenizer_and_model(model_name: str) -> tuple[Any, Any]:
    """The tokenizer and the fp32 model, from a local folder, the hub cache, or the hub.

    BlenderBot loads as a seq2seq model; a decoder-only model of a family the engine steps (see
    `bot/engine/causal.py`) loads as a causal language model, and must come with a chat template.

    A `ModelLoadError` says why not in words that follow "Could not load the model 'NAME': ".
    """
    name = check_model_name(model_name)
    try:
        return _load(name, local_files_only=True)
    except NotAChatModel:
        raise
    except ModelLoadError:
        if Path(name).is_dir():
            raise
    # A hub model not (completely) in the cache: download it.
    _check_hub_has(name)
    return _load(name, local_files_only=False, failed="it could not be downloaded from the Hugging Face hub: ")


def _load(name: str, *, local_files_only: bool, failed: str = "") -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from bot.engine.causal import UnsupportedModel, check_supported
    from bot.engine.chat_prompt import has_chat_template

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
        if config.is_encoder_decoder and config.model_type != "blenderbot":
            raise NotAChatModel(
                f"it is a {config.model_type} model; of the encoder-decoder models this bot runs BlenderBot "
                "(model_type blenderbot)"
            )
        if not config.is_encoder_decoder:
            try:
                check_supported(config)
            except UnsupportedModel as exc:
                raise NotAChatModel(f"it {exc}") from None
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
        if config.is_encoder_decoder:
            auto: Any = AutoModelForSeq2SeqLM
        elif has_chat_template(tokenizer):
            auto = AutoModelForCausalLM
        else:
            raise NotAChatModel("it has no chat template, so there is no way to turn a conversation into its prompt")
        model = auto.from_pretrained(name, dtype=torch.float32, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(failed + one_line(exc)) from exc
    return tokenizer, model


def _check_hub_has(name: str) -> None:
    """One request, without retries, for the model's config.json: does the hub answer and have it?"""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.is_offline_mode():
        raise ModelLoadError("it is not in the local model cache, and HF_HUB_OFFLINE forbids downloading it")
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), retry_on_errors=False)
    except GatedRepoError:
        raise ModelLoadError(
            "it is gated on the Hugging Face hub: accept its terms on huggingface.co, then log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            "the Hugging Face hub has no such model, and there is no local folder of that name"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"it could not be downloaded: the Hugging Face hub answered {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - httpx errors: no network, DNS, proxy, TLS
        raise ModelLoadError(
            f"it could not be downloaded: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
            f"({one_line(exc) or type(exc).__name__}); check the network, or set MODEL_NAME to a local folder"
        ) from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' messages span several)."""
    return " ".join(str(exc).split())
