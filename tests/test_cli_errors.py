"""``python -m tokenkern``: every bad input is one line on stderr that names the option and
what it expects, exit status 2, no traceback; a missing optional package names its extra."""

import json
import subprocess
import sys

import pytest
import torch

# Runs the CLI with some modules made unimportable (a None entry in sys.modules).
WRAPPER = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from tokenkern.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


# Runs main() on many argument lists in one process (an interpreter start costs seconds): an
# exception escaping main() fails the whole run with its traceback.
BATCH = """
import contextlib, io, json, sys
from tokenkern.__main__ import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exit:
            code = exit.code
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


def cli(*args: str, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if hide:
        command = [sys.executable, "-c", WRAPPER, ",".join(hide), *args]
    else:
        command = [sys.executable, "-m", "tokenkern", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in err, err


PLAN = ("plan", "--budget", "2T")

BAD_ARGS = [
    ((*PLAN, "--memory-gib", "-1"), ("--memory-gib", "finite number > 0", "'-1'")),
    ((*PLAN, "--memory-gib", "nan"), ("--memory-gib", "finite number > 0", "'nan'")),
    ((*PLAN, "--memory-gib", "inf"), ("--memory-gib", "finite number > 0")),
    ((*PLAN, "--memory-gib", "0"), ("--memory-gib", "finite number > 0")),
    (("plan", "--budget", "-1T"), ("--budget", "must be > 0", "'-1T'")),
    (("plan", "--budget", "-2e12"), ("--budget", "must be > 0")),
    (("plan", "--budget", "1e999"), ("--budget", "finite")),
    (("plan", "--budget", "lots"), ("--budget", "not a FLOPs count")),
    (("plan",), ("--budget", "required")),
    ((*PLAN, "--law", "1,2"), ("--law", "four finite numbers")),
    ((*PLAN, "--law", "nan,0.1,0.1,0"), ("--law", "four finite numbers")),
    ((*PLAN, "--visual-tokens", "0,16"), ("--visual-tokens", ">= 1")),
    ((*PLAN, "--text-tokens", "-5"), ("--text-tokens", ">= 0")),
    ((*PLAN, "--lm-head", "first"), ("--lm-head", "invalid choice")),
    (("demo", "--device", "bogus"), ("--device", "cpu or cuda")),
    (("demo", "--device", "cuda:99"), ("--device",)),
    (("demo", "--keep", "2"), ("--keep", "fraction in (0, 1]")),
    (("demo", "--keep", "0"), ("--keep", "fraction in (0, 1]")),
    (("demo", "--keep", "nan"), ("--keep", "fraction in (0, 1]")),
    (("demo", "--keep", "-0.5"), ("--keep", "fraction in (0, 1]")),
    (("frobnicate",), ("invalid choice",)),
    ((), ("required",)),
]


@pytest.fixture(scope="module")
def bad_arg_results() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    command = [sys.executable, "-c", BATCH, json.dumps([list(a) for a, _ in BAD_ARGS])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    pairs = zip(BAD_ARGS, results, strict=True)
    return {a: subprocess.CompletedProcess(a, code, "", err) for (a, _), (code, err) in pairs}


@pytest.mark.parametrize(("args", "needles"), BAD_ARGS, ids=[" ".join(a) or "no-command" for a, _ in BAD_ARGS])
def test_bad_argument(args, needles, bad_arg_results):
    assert_one_line_error(bad_arg_results[args], *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_demo_cuda_without_a_gpu():
    assert_one_line_error(cli("demo", "--device", "cuda"), "--device", "no CUDA device")


def test_plan_png_without_matplotlib(tmp_path):
    proc = cli(*PLAN, "--png", str(tmp_path / "plot.png"), hide=("matplotlib",))
    assert_one_line_error(proc, "--png", "install tokenkern[demo]")
    assert not (tmp_path / "plot.png").exists()


def test_plan_png_unwritable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli(*PLAN, "--png", str(blocker / "plot.png")), "--png", "writable")


@pytest.mark.parametrize("module", ["skimage", "matplotlib", "onnx"])
def test_demo_without_its_packages(module, tmp_path):
    proc = cli("demo", "--device", "cpu", "--out", str(tmp_path), hide=(module,))
    assert_one_line_error(proc, "install tokenkern[demo]")
    assert proc.stdout == ""  # refused before any work


def test_demo_out_unusable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli("demo", "--device", "cpu", "--out", str(blocker / "sub")), "--out")


def test_negative_values_reach_the_option_check():
    """``--budget -1T`` used to fail as "expected one argument" (argparse took -1T for an
    option); ``--budget=-1T`` and the separated form now give the same message."""
    a, b = cli("plan", "--budget", "-1T"), cli("plan", "--budget=-1T")
    assert a.stderr == b.stderr and "expected one argument" not in a.stderr


def test_good_plan_still_runs():
    proc = cli(*PLAN, "--memory-gib", "80", "--models", "qwen2-vl-2b")
    assert proc.returncode == 0 and "optimum:" in proc.stdout, proc.stderr[-2000:]
