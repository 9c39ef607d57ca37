"""Issue 14 item 5: the config loader, fed random YAML structures built from the real key names
(walked from the pydantic models) with junk values, returns a valid RunConfig or raises the
project's UserError (ConfigError) — never another exception. A seeded, bounded run here;
benchmarks/fuzz_config.py runs many more."""
from __future__ import annotations

import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from compress import stages as stage_table
from compress.config import RunConfig
from compress.config_load import from_dict, load_config
from compress.errors import UserError
from targets import base as backends

MAX_DEPTH = 4


def models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, list, Annotated, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in models_in(a)]


def plain_default(f):
    """A field's own default as YAML would hold it (or its Literal's value), else None."""
    if f.default is not PydanticUndefined and f.default is not None:
        d = f.default
    elif typing.get_origin(f.annotation) is typing.Literal:
        d = typing.get_args(f.annotation)[0]
    else:
        return None
    return d if isinstance(d, (bool, int, float, str)) else None


def key_tree(model: type[BaseModel], depth: int = 0) -> dict:
    """field name -> (subtrees, one per model the field may hold, [] for a leaf; the leaf's default)."""
    if depth > MAX_DEPTH:
        return {}
    out = {}
    for name, f in model.model_fields.items():
        subs = models_in(f.annotation)
        if name == "stages":
            subs = [s.config for s in stage_table.STAGES.values()]
        if name == "options":
            subs = [backends.get(n).Options for n in backends.names()]
        out[name] = ([key_tree(m, depth + 1) for m in subs if m is not model], plain_default(f))
    return out


TREE = key_tree(RunConfig)
def all_keys(tree: dict) -> set:
    return set(tree) | {k for subs, _ in tree.values() for t in subs for k in all_keys(t)}


ALL_KEYS = sorted(all_keys(TREE))
NAMES = (["resnet_tiny", "resnet_tiny_teacher", "synthetic", "fashion_mnist", "image_folder", "auto", "cpu", "cuda",
          "tpu", "os:system", "builtins:eval", ".x:y", "a:b", "no.such.module:fn", "torchvision:nope", "kl", "ce",
          "classification", "regression", "adamw", "sgd", *stage_table.STAGES, *backends.names()])

junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NAMES),
    st.sampled_from(ALL_KEYS), st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.sampled_from(ALL_KEYS), st.integers(-2, 2), max_size=2),
)


def section(tree: dict, depth: int = 0):
    """A mapping with some of the section's real keys (plus now and then an unknown one)."""
    def value(subs, default):
        if not subs or depth >= MAX_DEPTH:  # mostly the default: junk in one field reaches the model's own rules
            return st.one_of(st.sampled_from(NAMES), junk) if default is None else st.one_of(
                *[st.just(default)] * 7, junk)
        inner = st.one_of([section(s, depth + 1) for s in subs])
        return st.one_of(*[inner] * 6, junk, st.lists(inner, min_size=1, max_size=3))
    keys = sorted(tree)
    fields = {k: value(*tree[k]) for k in keys}
    chosen = st.lists(st.sampled_from(keys), unique=True, max_size=min(len(keys), 5)) if keys else st.just([])
    extra = st.one_of(*[st.just({})] * 7,  # now and then a key the section does not have
                      st.dictionaries(st.sampled_from(ALL_KEYS + ["epochz", "", "0"]), junk, min_size=1, max_size=1))
    return st.tuples(chosen, extra).flatmap(
        lambda ck: st.fixed_dictionaries({k: fields[k] for k in ck[0]}).map(lambda d, e=ck[1]: {**e, **d}))


def plausible():
    """Most examples start from a config that nearly validates, so junk reaches deep validators."""
    base = {"name": "fuzz", "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1}},
            "data": {"dataset": "synthetic"}, "targets": [{"backend": "onnxruntime"}]}
    return section(TREE).map(lambda d: {**base, **d})


configs = st.one_of(plausible(), section(TREE), junk)


def check(raw) -> str:
    """'valid' | 'error'; anything else escapes (the test fails with it)."""
    try:
        cfg = from_dict(raw, "fuzz.yaml")
    except UserError:
        return "error"
    assert isinstance(cfg, RunConfig)
    return "valid"


@settings(max_examples=200, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(configs)
def test_random_configs_load_or_raise_config_error(raw):
    check(raw)


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(plausible(), st.lists(st.tuples(st.sampled_from(["name", "seed", "stages.0.epochs", "data.batch_size",
                                                        "teacher.train.epochs", "targets.0.threads", "x.y"]),
                                       st.text(max_size=10)), max_size=3))
def test_random_files_and_set_overrides(tmp_path_factory, raw, sets):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    try:
        load_config(p, [f"{k}={v}" for k, v in sets])
    except UserError:
        pass


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=40), st.text(alphabet="{}[]:,-!&*?|>'\"#%@ \n\tab01.", max_size=40)))
def test_random_bytes_as_a_config_file(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        load_config(p)
    except UserError:
        pass
