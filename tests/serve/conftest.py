"""A tiny random model saved to disk (tiny-dense preset + the test tokenizer): real weights, gibberish output."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_service(tiny_model_dir):
    from mellum.complete import CompletionService

    service = CompletionService.from_pretrained(tiny_model_dir)
    yield service
    service.close()
