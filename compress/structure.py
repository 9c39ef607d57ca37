"""The typed record that rebuilds a model: the factory, the recorded changes to it, and the
quantizer settings, written to each stage's structure.json beside model.safetensors.

Rebuilding is "build from the factory, re-apply the recorded changes, load the tensors" and
never unpickles a module (the failure mode of Torch-Pruning #139)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from compress.checkpoint import apply_shapes, load_into, read_state_dict, record_shapes, write_json
from compress.errors import UserError

# 1: the first versioned format. Files without a version were written before it, with the
# same keys and meanings, so they load as version 1 (see `migrate`).
VERSION = 1


class StructureError(UserError):
    """A structure.json that cannot be read; the message names the file and what is wrong."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModuleShape(_Record):
    """One module's structural attributes and tensor shapes, as pruning left them."""
    type: str
    """the module's class name; rebuilding checks the factory built the same class"""
    attrs: dict[str, Any] = Field(default_factory=dict)
    """constructor-level attributes (channels, features, groups) and forward-read integers
    (an attention module's num_heads, head_dim)"""
    tensors: dict[str, list[int]] = Field(default_factory=dict)
    """each parameter's and buffer's shape by its name in the module"""


class QuantSettings(_Record):
    """What rebuilding the brevitas structure needs (compress.quantize.config.settings)."""
    weight_bits: int
    act_bits: int
    activations: str = "symmetric"
    weight_scaling: str = "per_channel"
    bias: str = "int32"
    merge_bn: bool = True
    plain_batchnorms: bool = False
    """BatchNorm subclasses (timm's BatchNormAct2d) split into BatchNorm + act so they fold;
    records from before it hold those BatchNorms unfolded, and rebuild so"""
    equalize_iters: int = 0
    layer_bits: dict[str, int] = Field(default_factory=dict)
    """every compute layer's final weight bits, by qualified name"""


class Structure(_Record):
    """How to rebuild a stage's model from its factory."""
    version: int = VERSION
    model: str
    """zoo name, 'torchvision:<name>', 'timm:<name>' or 'pkg.module:factory'"""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """the factory's keyword arguments from the config (plain data)"""
    adapted: dict[str, str] = Field(default_factory=dict)
    """modules replaced to fit the data (stem channels, head width) by qualified name; rebuilding
    repeats them and checks they are the same"""
    num_classes: int
    in_channels: int
    input_shape: list[int]
    """(C, H, W) of one example"""
    shapes: dict[str, ModuleShape] = Field(default_factory=dict)
    """changed module shapes by qualified name (empty: the factory's own shapes)"""
    attention: list[str] = Field(default_factory=list)
    """torch transformer blocks (nn.TransformerEncoder/-Layer, nn.MultiheadAttention) replaced
    by compress' explicit attention (pruning removes heads only from those), by qualified
    name; rebuilding repeats the rewrite before applying shapes"""
    removed_blocks: list[str] = Field(default_factory=list)
    """blocks replaced by an identity (block pruning), by qualified name"""
    quantize: Optional[QuantSettings] = None
    """the quantizer settings of a brevitas model; None for a float model"""
    sparsity: dict[str, str] = Field(default_factory=dict)
    """2:4 layers by qualified name -> pattern; their masks are kept through later training"""

    @property
    def is_float(self) -> bool:
        return self.quantize is None

    def with_shapes(self, model: nn.Module) -> "Structure":
        """This record with `model`'s current module shapes (after pruning changed them)."""
        from compress.quantize.attention import rewritten
        shapes = {n: ModuleShape(**rec) for n, rec in record_shapes(model).items()}
        return self.model_copy(update={"shapes": shapes, "attention": rewritten(model)})

    def write(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def read(cls, path: Path) -> "Structure":
        """Load (migrating an older format); a file that cannot be read raises StructureError
        with one line that says why."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise StructureError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
        try:
            return cls.model_validate(migrate(raw))
        except (ValidationError, ValueError) as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else None
            why = (f"{'.'.join(map(str, first['loc'])) or '(top level)'}: {first['msg']}" if first else str(e))
            raise StructureError(f"{path}: not a structure record ({why})") from None


def migrate(raw: Any) -> Any:
    """Older formats -> the current one. Unversioned files (before the typed record) hold
    the same keys; a quantized one's settings may lack layer_bits (older quantize stages)."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, got {type(raw).__name__}")
    version = raw.get("version", 0)
    if version > VERSION:
        raise ValueError(f"version {version} is newer than this release reads ({VERSION})")
    return {**raw, "version": VERSION}


def rebuild(structure: Structure, weights: Path) -> nn.Module:
    """Factory + recorded shapes (+ quantizer settings) + tensors: no unpickling."""
    from compress.models import build
    built = build(structure.model, structure.num_classes, structure.in_channels, structure.kwargs,
                  structure.input_shape)
    if built.adapted != structure.adapted:
        raise StructureError(f"{weights.parent / 'structure.json'}: model {structure.model!r} now adapts "
                             f"{built.adapted or 'nothing'}, recorded {structure.adapted or 'nothing'}")
    model = built.model
    if structure.attention:
        from compress.quantize.attention import rewrite
        done = rewrite(model)
        if done != structure.attention:
            raise StructureError(f"{weights.parent / 'structure.json'}: model {structure.model!r} has torch "
                                 f"attention at {done or 'no module'}, recorded {structure.attention}")
    if structure.shapes or structure.removed_blocks:
        apply_shapes(model, {n: s.model_dump() for n, s in structure.shapes.items()}, structure.removed_blocks)
    if structure.quantize is not None:
        from compress.quantize.graph import rebuild_quantized
        model = rebuild_quantized(model, structure.quantize.model_dump(), structure.input_shape)
    load_into(model, read_state_dict(weights), str(weights))
    return model.eval()
