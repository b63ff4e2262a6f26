"""The method configs check their fields when built, with the field's own name, and prune()
builds them from its options (so a bad option fails there, before anything is installed)."""

import math
import re

import pytest
import torch

import tokenkern
from tokenkern import methods as M
from tokenkern.ops.leverage import SVD_MAX_OVERSAMPLE, SVD_MAX_POWER_ITERS, SVD_MAX_RANK

NAN, INF = math.nan, math.inf
BAD_KEEPS = [0, -3, 0.0, 1.5, -0.25, NAN, INF, True, "0.5", None]

# (config class, method name in messages, field, bad values, what the message expects)
CASES = [
    (M.FasterVLMConfig, "fastervlm", "layer", [2.5, True, "2", NAN], "an int"),
    (
        M.VisionZipConfig,
        "visionzip",
        "contextual_fraction",
        [-0.5, 1.5, NAN, INF, True, "0.1", None],
        "a finite number in [0.0, 1.0]",
    ),
    (M.VisionZipConfig, "visionzip", "layer", [2.5, False, "2"], "an int"),
    (M.ToMeConfig, "tome", "r", [-1, 2.5, True, None, "8"], "an int >= 0"),
    (M.ToMeConfig, "tome", "protect_cls", [1, 0, "yes", None], "a bool"),
    (M.ToMeConfig, "tome", "proportional_attention", [1, "no", None], "a bool"),
    (M.LoFiConfig, "lofi", "rank", [0, SVD_MAX_RANK + 1, 2.5, True], f"an int in [1, {SVD_MAX_RANK}]"),
    (M.LoFiConfig, "lofi", "oversample", [-1, SVD_MAX_OVERSAMPLE + 1, 1.0], "an int in [0, "),
    (M.LoFiConfig, "lofi", "power_iters", [-1, SVD_MAX_POWER_ITERS + 1, None], "an int in [0, "),
    (M.LoFiConfig, "lofi", "seed", [-1, 2**63, 0.5, True], "an int in [0, "),
    (M.RandomConfig, "random", "seed", [-1, 2**63, 1.5, None], "an int in [0, "),
]
CASES += [(cls, name, "keep", BAD_KEEPS, "a fraction in (0, 1]") for cls, name in [
    (M.FasterVLMConfig, "fastervlm"), (M.VisionZipConfig, "visionzip"), (M.LoFiConfig, "lofi"),
    (M.RandomConfig, "random"), (M.UniformConfig, "uniform"),
]]  # fmt: skip
PARAMS = [(cls, name, field, bad, expected) for cls, name, field, bads, expected in CASES for bad in bads]


@pytest.mark.parametrize(("cls", "method", "field", "bad", "expected"), PARAMS,
                         ids=[f"{c.__name__}.{f}={b!r}" for c, _, f, b, _ in PARAMS])  # fmt: skip
def test_bad_field(cls, method, field, bad, expected):
    message = f"tokenkern.{method}: {field} must be {expected}"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        cls(**{field: bad})
    assert str(info.value).endswith(f"got {bad!r}")


GOOD = [
    M.FasterVLMConfig(),
    M.FasterVLMConfig(keep=1, layer=-1),
    M.FasterVLMConfig(keep=1.0, layer=0),
    M.VisionZipConfig(),
    M.VisionZipConfig(keep=64, contextual_fraction=0, layer=-2),
    M.VisionZipConfig(keep=0.5, contextual_fraction=1.0),
    M.ToMeConfig(),
    M.ToMeConfig(r=0, protect_cls=False, proportional_attention=False),
    M.LoFiConfig(rank=1, oversample=0, power_iters=0, seed=2**63 - 1),
    M.RandomConfig(keep=3, seed=0),
    M.UniformConfig(keep=1e-3),
]


@pytest.mark.parametrize("cfg", GOOD, ids=repr)
def test_good_fields_build(cfg):
    assert type(cfg)(**vars(cfg)) == cfg


def test_contextual_fraction_bounds_keep_the_count(gen):
    """The whole interval keeps exactly keep_count tokens, at least one of them dominant."""
    from tokenkern.methods.visionzip import split_counts

    for total in (1, 2, 16, 64):
        for fraction in (0.0, float(torch.rand((), generator=gen)), 1.0):
            cfg = M.VisionZipConfig(contextual_fraction=fraction)
            dominant, contextual = split_counts(total, cfg.contextual_fraction)
            assert dominant + contextual == total and dominant >= 1 and contextual >= 0


# ---------------------------------------------------------------------------------- prune()


@pytest.fixture(scope="module")
def llava():
    pytest.importorskip("transformers")
    from test_integrations import build

    return build("llava").model


def assert_nothing_installed(model):
    assert getattr(model, "_tokenkern_prune_handle", None) is None
    tokenkern.prune(model, "fastervlm").remove()  # still free to install a method


FRACTION = "tokenkern.visionzip: contextual_fraction must be a finite number in [0.0, 1.0]"


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("visionzip", {"contextual_fraction": -0.5}, FRACTION),
        ("visionzip", {"contextual_fraction": NAN}, FRACTION),
        ("visionzip", {"layer": 2.5}, "tokenkern.visionzip: layer must be an int, got 2.5"),
        ("fastervlm", {"layer": 2.5}, "tokenkern.fastervlm: layer must be an int, got 2.5"),
        ("lofi", {"rank": 0}, "tokenkern.lofi: rank must be an int in [1, "),
        ("random", {"seed": -1}, "tokenkern.random: seed must be an int in [0, "),
    ],
)
def test_prune_checks_options_through_the_config(llava, method, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenkern.prune(llava, method, keep=0.25, **options)
    assert_nothing_installed(llava)


@pytest.mark.parametrize(
    ("method", "option", "valid"),
    [
        ("visionzip", "contextual", "contextual_fraction, layer"),
        ("fastervlm", "rank", "layer"),
        ("lofi", "layer", "rank, oversample, power_iters, seed"),
        ("uniform", "seed", "none besides keep"),
        ("fastv", "colour", "layer, query"),  # the config's field order
    ],
)
def test_prune_unknown_option_names_the_valid_ones(llava, method, option, valid):
    with pytest.raises(ValueError, match=re.escape(f"unknown options ['{option}']")) as info:
        tokenkern.prune(llava, method, **{option: 1})
    assert str(info.value).endswith(valid)
    assert_nothing_installed(llava)
