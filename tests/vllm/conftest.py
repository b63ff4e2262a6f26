"""vLLM test session (make test-vllm runs it in .venv-vllm). The engine runs in this process
(no engine-core or worker processes: each engine starts in seconds, and the engine sees the
installed tokenkern plugin exactly as a served one would); only tensor-parallel engines start a
worker process per rank. One engine lives at a time."""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import tiny_llava
import torch
from engine_pool import Engines


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_llava.build(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def engines(model_dir):
    pool = Engines(model_dir)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # both sides decode a fixed number of tokens
    return model


@pytest.fixture(scope="session")
def processor(model_dir):
    import transformers

    return transformers.AutoProcessor.from_pretrained(model_dir)
