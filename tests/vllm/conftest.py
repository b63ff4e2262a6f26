"""vLLM test session (make test-vllm runs it in .venv-vllm). The engine runs in this process
(no engine-core or worker processes: each engine starts in seconds, and the engine sees the
installed tokenkern plugin exactly as a served one would); only tensor-parallel engines start a
worker process per rank. One engine lives at a time."""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import gc

import pytest
import tiny_llava
import torch

MAX_MODEL_LEN = 512


class Engines:
    """One vllm.LLM per configuration, the last one kept alive (tests of one configuration run
    together, so each engine starts once)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.key: str | None = None
        self.llm = None

    def get(self, overrides: dict | None = None, tp: int = 1):
        key = repr((overrides, tp))
        if key != self.key:
            self.close()
            self.llm = self.start(overrides, tp)
            self.key = key
        return self.llm

    def start(self, overrides: dict | None = None, tp: int = 1):
        """tp > 1: one worker process per rank (vLLM's multiprocessing executor)."""
        from vllm import LLM

        return LLM(
            model=self.model_dir, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=4,
            limit_mm_per_prompt={"image": 2}, seed=0, tensor_parallel_size=tp,
            distributed_executor_backend="uni" if tp == 1 else "mp", hf_overrides=overrides or {},
        )  # fmt: skip

    def close(self) -> None:
        if self.llm is not None and self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size > 1:
            self.llm.llm_engine.engine_core.shutdown()  # stops the worker processes now, not at exit
        self.llm, self.key = None, None
        gc.collect()


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
