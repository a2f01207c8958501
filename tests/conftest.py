import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny tensors: a second thread only adds spin-wait overhead

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def tiny_model():
    from ptqlib.tiny import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the tiny random model, loaded once per test module."""
    from ptqlib.models import load_model

    return load_model("tiny")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
