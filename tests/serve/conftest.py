"""A tiny random model saved to disk (tiny-dense preset + the test tokenizer): real weights, gibberish output."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    import torch

    import mellum
    from mellum.config import get_config
    from mellum.model import Transformer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-model")
    mellum.save_pretrained(Transformer(get_config("tiny-dense")).float(), path)
    tiny_tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_service(tiny_model_dir):
    from mellum.complete import CompletionService

    service = CompletionService.from_pretrained(tiny_model_dir)
    yield service
    service.close()
