"""One vllm.LLM per configuration, the last one kept alive: tests of one configuration run
together, so each engine starts once (conftest.py's pool serves the tiny LLaVA; a module serving
another model makes its own pool with its engine arguments)."""

from __future__ import annotations

import gc

# vllm.LLM arguments of every engine the tests start (float32: the transformers side compares).
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4,
                   limit_mm_per_prompt={"image": 2}, seed=0)  # fmt: skip


class Engines:
    """engine_args: vllm.LLM arguments replacing ENGINE_ARGS' (e.g. limit_mm_per_prompt)."""

    def __init__(self, model_dir: str, **engine_args):
        self.model_dir = model_dir
        self.engine_args = {**ENGINE_ARGS, **engine_args}
        self.key: str | None = None
        self.llm = None

    def get(self, overrides: dict | None = None, tp: int = 1):
        key = repr((overrides, tp))
        if key != self.key:
            self.close()
            self.llm = self.start(overrides, tp)
            self.key = key
        return self.llm

    def start(self, overrides: dict | None = None, tp: int = 1, **engine_args):
        """tp > 1: one worker process per rank (vLLM's multiprocessing executor); engine_args:
        this engine's replacements of the pool's."""
        from vllm import LLM

        return LLM(
            model=self.model_dir, tensor_parallel_size=tp, distributed_executor_backend="uni" if tp == 1 else "mp",
            hf_overrides=overrides or {}, **{**self.engine_args, **engine_args},
        )  # fmt: skip

    def close(self) -> None:
        if self.llm is not None and self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size > 1:
            self.llm.llm_engine.engine_core.shutdown()  # stops the worker processes now, not at exit
        self.llm, self.key = None, None
        gc.collect()
