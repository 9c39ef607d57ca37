"""Model specs -> modules: zoo names, ``torchvision:<name>``, ``timm:<name>`` and
``pkg.module:factory``, with kwargs from the config, adapted to the data.

A factory's signature is read: ``num_classes`` and ``in_channels`` (timm: ``in_chans``) are
passed only where it names them. When the built model's stem or head still does not match the
data, the first conv and the logits layer are replaced (timm: ``reset_classifier``); what was
changed is returned so structure.json records it and a rebuild repeats it. Weights are never
downloaded: torchvision builds with ``weights=None``, timm with ``pretrained=False``; weights
come only from the checkpoint file the user names.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from calib.datasets import resolve_factory
from compress.checkpoint import set_module
from compress.classifier import find_classifier, first_conv
from compress.errors import UserError
from compress.names import unknown_name

# the pair that imports on this project's x86_64 machines (PyPI's torchvision does not import
# beside the CPU torch 2.13.0 build: "operator torchvision::nms does not exist")
INSTALL = "pip install torch==2.14.1 torchvision==0.29.1 timm (the vision extra: pip install -e '.[vision]')"
# keys that would download weights or name the data's own sizes: the data and the checkpoint decide these
RESERVED = {"weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
            "num_classes", "in_channels", "in_chans"}


@dataclass
class Built:
    model: nn.Module
    adapted: dict[str, str] = field(default_factory=dict)
    """qualified module name -> what was changed to fit the data (stem channels, head width)"""


def _vision(lib: str, spec: str):
    try:
        return __import__(lib)
    except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"model {spec!r}: {lib} is not importable ({why}); install it with: {INSTALL}") from None


def check_plain(value: Any, where: str) -> Any:
    """kwargs are data (YAML scalars, lists, string-keyed mappings), never objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: key {k!r} is not a string")
            check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}.{i}")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise UserError(f"{where}: {type(value).__name__} is not plain data (str, number, bool, list, mapping)")
    return value


def check_kwargs(kwargs: dict) -> dict:
    """Keys are named alone: the config's error already says `student.kwargs`."""
    for k, v in kwargs.items():
        check_plain(v, str(k))
    bad = sorted(set(kwargs) & RESERVED)
    if bad:
        raise UserError(f"{bad[0]}: not a model argument here: classes and channels come from the data, "
                        f"weights only from the `checkpoint` file")
    return kwargs


def check_spec(spec: str, zoo: dict) -> str:
    """Validate a model name without building it (config validation)."""
    if spec in zoo:
        return spec
    lib, _, name = spec.partition(":")
    if lib == "torchvision":
        known = _vision("torchvision", spec).models.list_models()
    elif lib == "timm":
        known = _vision("timm", spec).list_models()
    elif name:
        resolve_factory(spec, "model")
        return spec
    else:
        raise UserError(f"unknown model {spec!r}: expected one of {sorted(zoo)}, 'torchvision:<name>', "
                        f"'timm:<name>' or 'pkg.module:factory'")
    if name not in known:
        raise unknown_name(f"model {spec!r}", name, known, what=f"{lib} has no model")
    return spec


def _factory(spec: str, zoo: dict) -> tuple[Callable, dict]:
    """(callable, the data arguments it takes by name)."""
    lib, _, name = spec.partition(":")
    if spec in zoo:
        fn = zoo[spec]
    elif lib == "torchvision":
        builder = _vision("torchvision", spec).models.get_model_builder(name)
        # torchvision builders forward **kwargs to the model class: num_classes is accepted,
        # channels are not (a 3-channel stem, adapted below)
        return (lambda **kw: builder(weights=None, **kw)), {"num_classes"}
    elif lib == "timm":
        timm = _vision("timm", spec)
        return (lambda **kw: timm.create_model(name, pretrained=False, **kw)), {"num_classes", "in_chans"}
    else:
        fn = resolve_factory(spec, "model")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables: pass nothing we are unsure of
        params = {}
    return fn, {p for p in ("num_classes", "in_channels", "in_chans") if p in params}


def _call(spec: str, zoo: dict, num_classes: int, in_channels: int, kwargs: dict) -> tuple[nn.Module, set]:
    fn, takes = _factory(spec, zoo)
    data = {"num_classes": num_classes, "in_channels": in_channels, "in_chans": in_channels}
    call = {**{k: data[k] for k in takes}, **kwargs}
    try:
        model = fn(**call)
    except TypeError as e:
        try:
            sig = str(inspect.signature(fn))
        except (TypeError, ValueError):
            sig = "(...)"
        raise UserError(f"model {spec!r}: factory{sig} rejected the arguments {sorted(call)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec!r}: factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model, takes


def _adapt_stem(model: nn.Module, spec: str, in_channels: int) -> dict[str, str]:
    found = first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return {}
    name, conv = found
    if conv.groups != 1:
        raise UserError(f"model {spec!r}: its first conv {name!r} is grouped; change it to take {in_channels} "
                        f"input channels (or accept in_channels in the factory)")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        # summed over the old channels, spread evenly over the new: a gray image repeated over
        # the channels gets the same response as before (3 -> 1 sums RGB, 1 -> 3 copies / 3)
        w = conv.weight.sum(1, keepdim=True) / in_channels
        new.weight.copy_(w.expand(-1, in_channels, -1, -1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    set_module(model, name, new)
    return {name: f"stem: in_channels {conv.in_channels} -> {in_channels}"}


def _adapt_head(model: nn.Module, spec: str, num_classes: int, input_shape) -> dict[str, str]:
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_shape))
    width = out.shape[1] if out.dim() > 1 else out.numel()
    if width == num_classes:
        return {}
    name, how = find_classifier(model, input_shape)
    if name is None:
        raise UserError(f"model {spec!r} gives {width} outputs for {num_classes} classes and no final Linear/1x1 "
                        f"Conv producing them was found: give it num_classes outputs (or accept num_classes)")
    head = model.get_submodule(name)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    elif isinstance(head, nn.Linear):
        set_module(model, name, nn.Linear(head.in_features, num_classes, head.bias is not None))
    else:
        set_module(model, name, nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None))
    return {name: f"head ({how}): {width} -> {num_classes} outputs"}


def build(spec: str, zoo: dict, num_classes: int, in_channels: int, kwargs: Optional[dict] = None,
          input_shape=None, state: Optional[dict] = None, where: str = "checkpoint") -> Built:
    """The model `spec` names, fitted to the data; `state` (a state_dict) is loaded into the
    fitted model, or, when it fits the model as the factory built it (a pretrained file for
    3-channel inputs / 1000 classes), before the stem is adapted so its weights carry over."""
    from compress.checkpoint import load_into
    kwargs = check_kwargs(dict(kwargs or {}))
    input_shape = tuple(input_shape or (in_channels, 32, 32))
    model, takes = _call(spec, zoo, num_classes, in_channels, kwargs)
    raw_fits = state is not None and _fits(model, state)
    if raw_fits:
        load_into(model, state, where)
    adapted = {} if takes & {"in_channels", "in_chans"} else _adapt_stem(model, spec, in_channels)
    if "num_classes" not in takes:
        adapted.update(_adapt_head(model, spec, num_classes, input_shape))
    if state is not None and not raw_fits:
        load_into(model, state, where)
    return Built(model.train(), adapted)


def _fits(model: nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)
