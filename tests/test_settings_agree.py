"""Every place that accepts a sampling setting agrees with :class:`holst.sampling.SamplingSettings`:
the same names and defaults, and the same verdict on one table of good and bad values.

The places (issue 19 found eight declarations that disagreed, e.g. ``top_p=0`` passed one and failed
another): ``SamplingSettings`` itself, ``pipeline.json`` (``PipelineConfig``), the pipeline call
(``Text2ImagePipeline.resolve_settings``, what ``__call__`` runs first), ``sample_image_codes``
(its filter settings), the ``holst generate`` flags, the ``holst prepare pipeline`` flags, the
``holst eval`` flags and the server's request model (HTTP).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from holst import eval_cli
from holst.cli import parse_command
from holst.cli_common import check_sampling_flags, given_values, sampling_settings
from holst.config import PipelineConfig, ServeConfig
from holst.errors import ConfigError
from holst.pipeline import Text2ImagePipeline
from holst.sampling import MAX_SEED, PIPELINE_SETTINGS, SamplingSettings, sample_image_codes, setting_names

N = 4  # num_images of the cases that need one (the tiny pipeline's default too)

# (settings, accepted): one table for every entry point.
CASES = [
    ({"num_images": 1}, True), ({"num_images": 4096}, True), ({"num_images": 0}, False),
    ({"num_images": -1}, False), ({"num_images": 2.5}, False), ({"num_images": True}, False),
    ({"num_images": 4097}, False),
    ({"top_k": 0}, True), ({"top_k": 40}, True), ({"top_k": -1}, False), ({"top_k": 1.5}, False),
    ({"top_p": 1e-9}, True), ({"top_p": 0.5}, True), ({"top_p": 1}, True), ({"top_p": 1.0}, True),
    ({"top_p": 0}, False), ({"top_p": 0.0}, False), ({"top_p": -0.1}, False), ({"top_p": 1.0001}, False),
    ({"top_p": math.nan}, False), ({"top_p": math.inf}, False),
    ({"temperature": 1e-3}, True), ({"temperature": 1}, True), ({"temperature": 100}, True),
    ({"temperature": 0}, False), ({"temperature": -1.0}, False), ({"temperature": 100.5}, False),
    ({"temperature": math.nan}, False),
    ({"guidance_scale": None}, True), ({"guidance_scale": 0}, True), ({"guidance_scale": 1.0}, True),
    ({"guidance_scale": 7.5}, True), ({"guidance_scale": -0.5}, False), ({"guidance_scale": 101}, False),
    ({"guidance_scale": math.inf}, False),
    ({"num_images": N, "rerank": 0}, True), ({"num_images": N, "rerank": N}, True),
    ({"num_images": N, "rerank": N + 1}, False), ({"num_images": N, "rerank": -1}, False),
    ({"upscale": 1}, True), ({"upscale": 16}, True), ({"upscale": 0}, False), ({"upscale": 17}, False),
    ({"batch_size": 1}, True), ({"batch_size": 0}, False), ({"batch_size": 1.0}, False),
    ({"num_images": N, "seed": 0}, True), ({"num_images": N, "seed": 2**31}, True),
    ({"num_images": N, "seed": MAX_SEED - N + 1}, True), ({"num_images": N, "seed": MAX_SEED - N + 2}, False),
    ({"num_images": N, "seed": -1}, False), ({"num_images": N, "seed": MAX_SEED + 1}, False),
    ({"num_images": N, "seed": "7"}, False),
]
IDS = [",".join(f"{k}={v!r}" for k, v in c.items()) for c, _ in CASES]
FILTER_SETTINGS = ("top_k", "top_p", "temperature", "guidance_scale")  # what sample_image_codes takes


@pytest.fixture(scope="module")
def pipe():
    return Text2ImagePipeline.from_random("tiny", seed=0)


def accepts(fn) -> bool:
    """True when ``fn()`` returns; False when it refuses with a ConfigError (any other error fails the test)."""
    try:
        fn()
    except ConfigError:
        return False
    return True


def cli_words(settings: dict) -> list[str] | None:
    """The flags for ``settings``, or None when a command line cannot say them (None, True, a str)."""
    words = []
    for name, value in settings.items():
        if value is None or isinstance(value, (bool, str)):
            return None
        words += ["--" + name.replace("_", "-"), repr(value) if isinstance(value, float) else str(value)]
    return words


def cli_accepts(key: tuple, fixed: list[str], settings: dict, then) -> bool | None:
    """What a command does with the flags before it samples: parse them, then ``then(args)`` (its own checks)."""
    words = cli_words(settings)
    if words is None:
        return None
    try:
        _, args = parse_command(key, [*fixed, *words])
    except SystemExit as e:  # argparse refused the text (e.g. --top-k 1.5): one line, exit 2
        assert e.code == 2
        return False
    return accepts(lambda: then(args))


def http_accepts(settings: dict, pipe) -> bool | None:
    """The server's path (holst.serve.app.make_job): the request model, then the pipeline's resolve.
    None for batch_size, which requests cannot set (the server's max_batch_images decides it)."""
    from holst.serve.schemas import RequestError, request_model, validate_request

    if "batch_size" in settings:
        return None
    model = request_model(ServeConfig(max_images_per_request=4096, max_upscale=16))  # no server caps below ours
    body = {"prompt": "кот", **settings}
    try:
        request = validate_request(body, model)
    except RequestError as e:
        assert e.status == 422
        return False
    return accepts(lambda: pipe.resolve_settings(**{k: getattr(request, k) for k in settings}))


@pytest.mark.parametrize("settings, ok", CASES, ids=IDS)
def test_every_entry_point_gives_the_same_verdict(settings, ok, pipe):
    verdicts = {
        "SamplingSettings": accepts(lambda: SamplingSettings(**settings)),
        "Text2ImagePipeline.resolve_settings": accepts(lambda: pipe.resolve_settings(**settings)),
        "HTTP request": http_accepts(settings, pipe),
        # holst generate's main: each flag on its range, then on the model's defaults
        "holst generate": cli_accepts((None, "generate"), ["кот", "--out", "o"], settings, lambda args: (
            check_sampling_flags(args), sampling_settings(args, pipe.config))),
    }
    if set(settings) <= set(PIPELINE_SETTINGS):
        verdicts["PipelineConfig"] = accepts(lambda: PipelineConfig(**settings))
        verdicts["holst prepare pipeline"] = cli_accepts(  # its main: the flags, then a PipelineConfig of them
            ("prepare", "pipeline"), ["--out", "o", "--tokenizer", "t", "--vqgan", "v", "--dalle", "d"], settings,
            lambda args: (check_sampling_flags(args, PIPELINE_SETTINGS),
                          PipelineConfig(**given_values(args, PIPELINE_SETTINGS))))
    if set(settings) <= set(FILTER_SETTINGS):
        text = pipe.encode_prompts(["кот"])
        verdicts["sample_image_codes"] = accepts(lambda: sample_image_codes(pipe.dalle, text, seeds=[0], **settings))
        verdicts["holst eval pipeline"] = cli_accepts(  # its main: the flags, then the pipeline call with them
            ("eval", "pipeline"), ["--model", "random:tiny", "--data", "d", "--out", "o"], settings,
            lambda args: pipe.resolve_settings(**eval_cli._sampling_kwargs(args)))
    verdicts = {where: v for where, v in verdicts.items() if v is not None}
    assert verdicts == {where: ok for where in verdicts}, settings


def test_the_places_share_names_and_defaults(pipe):
    names = set(setting_names())
    defaults = SamplingSettings()
    # pipeline.json: every setting but the per-call seed, with the same defaults
    config = PipelineConfig()
    assert set(PIPELINE_SETTINGS) == names - {"seed"}
    assert {n: getattr(config, n) for n in PIPELINE_SETTINGS} == {n: getattr(defaults, n) for n in PIPELINE_SETTINGS}
    # the pipeline call takes each setting by name
    assert names <= set(inspect.signature(Text2ImagePipeline.__call__).parameters)
    # the flags of holst generate are the settings (dest = field name, default None = pipeline.json's)
    _, args = parse_command((None, "generate"), ["кот", "--out", "o"])
    assert all(getattr(args, n) is None for n in names)
    # the server's request model holds every setting but batch_size (the server's max_batch_images)
    from holst.serve.schemas import request_model

    fields = set(request_model(ServeConfig()).model_fields)
    assert names - {"batch_size"} <= fields
    # sample_image_codes takes the filter settings with the same defaults
    params = inspect.signature(sample_image_codes).parameters
    assert {n: params[n].default for n in FILTER_SETTINGS} == {n: getattr(defaults, n) for n in FILTER_SETTINGS}
    assert {f.name for f in dataclasses.fields(SamplingSettings)} == names


def test_help_and_schema_show_the_ranges(capsys):
    with pytest.raises(SystemExit):
        parse_command((None, "generate"), ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a number in (0, 1]; 1 = off" in text and "an integer in [0, 2**63 - 1]" in text
    from holst.serve.schemas import request_model

    schema = request_model(ServeConfig(max_upscale=4)).model_json_schema()["properties"]
    assert schema["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert schema["upscale"]["anyOf"][0]["maximum"] == 4  # the server's cap, below SamplingSettings' 16


def test_one_seed_range_for_given_and_drawn_seeds(pipe):
    from holst.sampling import DRAWN_SEED_BOUND, draw_seeds, make_seeds

    assert make_seeds(2, seed=MAX_SEED - 1) == [MAX_SEED - 1, MAX_SEED]
    with pytest.raises(ConfigError, match="seed"):
        make_seeds(2, seed=MAX_SEED)
    drawn = make_seeds(64, generator=torch.Generator().manual_seed(0)) + draw_seeds(64) + make_seeds(64)
    assert all(0 <= s < DRAWN_SEED_BOUND for s in drawn)
    out = pipe("кот", 2, seed=MAX_SEED - 1)
    assert sorted(out.seeds) == [MAX_SEED - 1, MAX_SEED] and out.settings["seed"] == MAX_SEED - 1


def test_http_null_means_the_models_default(pipe):
    from holst.serve.schemas import REQUEST_SETTINGS, request_model, validate_request

    request = validate_request({"prompt": "кот", **dict.fromkeys(REQUEST_SETTINGS)}, request_model(ServeConfig()))
    assert pipe.resolve_settings(**{k: getattr(request, k) for k in REQUEST_SETTINGS}) == pipe.resolve_settings()
