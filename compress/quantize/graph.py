"""Float model -> brevitas fake-quant model: trace, merge BN, (equalize), quantize with the
configured format, each compute layer's weight bits chosen by its qualified name.

Everything here is a function of the recorded settings alone, so `rebuild_quantized` gives
the same structure that training produced (weights then come from safetensors)."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from compress.checkpoint import set_module
from compress.errors import UserError
from compress.names import unknown_name
from compress.quantize.attention import has_torch_attention, quantize_matmul_inputs, rewrite

COMPUTE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def compute_layers(model: nn.Module) -> list[str]:
    """Qualified names of the quantizable compute layers, in execution order (FX graph order),
    so "first" and "last" mean what the data flow says, not declaration order."""
    from torch.fx import GraphModule, symbolic_trace
    if has_torch_attention(model):  # FX sees no Linear inside torch's transformer blocks
        model = copy.deepcopy(model)
        rewrite(model)
    gm = model if isinstance(model, GraphModule) else symbolic_trace(model.eval())
    mods = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), COMPUTE_TYPES) \
                and node.target not in out:
            out.append(node.target)
    return out


def check_layer_names(model: nn.Module, names, where: str) -> None:
    """A bad per-layer name is a user error that names it and the closest real names."""
    if not names:
        return  # nothing to check: no FX trace
    known = compute_layers(model)
    for n in names:
        if n not in known:
            raise unknown_name(where, n, known, "no quantizable compute layer (Conv/Linear) named",
                               fallback=f"compute layers: {', '.join(known)}")


def check_traceable(model: nn.Module, where: str) -> None:
    """The quantize stage traces the model with torch.fx (brevitas' graph quantization). A
    forward with Python control flow on tensor values cannot be traced (torchvision's swin_t:
    "symbolically traced variables cannot be used as inputs to control flow"), and that failure
    used to come after the distill and prune stages had run: now one line at validate."""
    m = copy.deepcopy(model)
    rewrite(m)
    try:
        trace_with_defaults(m.eval())
    except Exception as e:  # a user's model can raise anything while traced: one line
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UserError(f"{where}: the quantize stage traces the model with torch.fx, which fails on it "
                        f"({type(e).__name__}: {msg}); quantize a model whose forward has no Python control "
                        f"flow on tensor values, or leave the quantize stage out") from None


def resolve_bits(names: list[str], cfg) -> dict[str, int]:
    """Each layer's weight bits before any sensitivity search: weight_bits, then the first/last
    overrides, then explicit layer_bits (most specific wins)."""
    bits = {n: cfg.weight_bits for n in names}
    if names and cfg.first_layer_bits is not None:
        bits[names[0]] = cfg.first_layer_bits
    if names and cfg.last_layer_bits is not None:
        bits[names[-1]] = cfg.last_layer_bits
    bits.update(cfg.layer_bits)
    return bits


def preprocess(model: nn.Module, qsettings: dict) -> nn.Module:
    """Trace, merge BatchNorm into the convolutions, optional weight equalization: still float.
    torch's transformer blocks are first made explicit (in place, same numbers; see
    compress/quantize/attention.py for why)."""
    from brevitas.graph.quantize import preprocess_for_quantize
    rewrite(model)
    plain_linears(model)
    if qsettings.get("plain_batchnorms"):
        plain_batchnorms(model)
    return preprocess_for_quantize(trace_with_defaults(model.eval()), trace_model=False,
                                   merge_bn=qsettings.get("merge_bn", True),
                                   equalize_iters=qsettings.get("equalize_iters", 0))


def plain_linears(model: nn.Module) -> None:
    """Subclasses of nn.Linear that compute what nn.Linear computes become nn.Linear, in place
    and sharing their parameters (the state dict keeps its keys). FX traces into a subclass's
    forward (only torch.nn's own classes are leaves), so brevitas saw a functional F.linear
    and left it float: timm's `timm.layers.Linear` classifier of MobileNetV3, LCNet and GhostNet
    ran as a float Gemm on both runtimes. Checked on a probe batch: a subclass that computes
    anything else keeps its own forward."""
    gen = torch.Generator().manual_seed(0)
    for name, m in _subclasses(model, (nn.Linear,)):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight, plain.bias = m.weight, m.bias
        _replace_if_same(model, name, m, plain, torch.randn(2, m.in_features, generator=gen).to(m.weight))


_BN_SPATIAL = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}  # dims after (N, C) of a probe


def plain_batchnorms(model: nn.Module) -> None:
    """Subclasses of BatchNorm that compute a BatchNorm, then their own `drop` and `act`
    children (timm's BatchNormAct2d) become nn.Sequential(BatchNorm, drop, act), in place and
    sharing parameters and statistics. FX traces into the subclass's forward and sees
    F.batch_norm, which brevitas does not fold: each ran as a float BatchNormalization between
    Q/DQ on both runtimes (timm's MobileNetV3, EfficientNet, LCNet, GhostNet, RegNet; folded,
    ORT ran their int8 graphs 1.11-1.72x as fast: benchmarks/RESULTS.md). Folding changes the
    quantized state dict, so a structure record says whether it was done (QuantSettings).
    Checked on a probe batch in eval mode: a subclass that computes anything else keeps its
    own forward."""
    gen = torch.Generator().manual_seed(0)
    for name, m in _subclasses(model, tuple(_BN_SPATIAL)):
        kind = next(k for k in _BN_SPATIAL if isinstance(m, k))
        plain = kind(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(plain, key, getattr(m, key))
        tail = [getattr(m, k) for k in ("drop", "act") if isinstance(getattr(m, k, None), nn.Module)
                and not isinstance(getattr(m, k), nn.Identity)]  # no-op nodes between a quantizer and its user
        x = torch.randn(2, m.num_features, *[3] * _BN_SPATIAL[kind], generator=gen)
        ref = next((t for t in (m.running_mean, m.weight) if t is not None), x)  # the module's device and dtype
        _replace_if_same(model, name, m, nn.Sequential(plain, *tail), x.to(ref))


def _subclasses(model: nn.Module, kinds: tuple) -> list:
    """(name, module) of each submodule that subclasses one of `kinds` without being one of them
    (brevitas' own layers aside)."""
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds) and type(m) not in kinds
            and not type(m).__module__.startswith("brevitas")]


def _replace_if_same(model: nn.Module, name: str, old: nn.Module, new: nn.Module, x: torch.Tensor) -> None:
    """`new` in place of `old` where both compute the same on x in eval mode (modes restored)."""
    was = old.training
    old.eval(), new.eval()
    try:
        with torch.no_grad():
            same = torch.equal(old(x), new(x))
    finally:
        old.train(was), new.train(was)
    if same:
        set_module(model, name, new)


def trace_with_defaults(model: nn.Module) -> nn.Module:
    """brevitas' FX trace with forward's optional arguments fixed to their defaults, so that
    the graph takes the image alone. timm's ViTs take forward(x, attn_mask=None,
    is_causal=False): traced plainly, both are graph inputs, `if is_causal:` cannot be traced
    (unfused attention) and the int8 export passes is_causal to scaled_dot_product_attention
    as a Tensor (measured, timm 1.0.31 deit_tiny). FX's concrete_args fixes them but keeps them
    as inputs behind `== default` asserts that the export cannot trace: those go too."""
    import inspect

    from brevitas.fx import symbolic_trace
    for m in model.modules():  # timm's switch: the same attention as matmul + softmax, which
        if getattr(m, "fused_attn", False):  # ONNX opset 13 exports (the fused op needs 14)
            m.fused_attn = False
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    gm = symbolic_trace(model, concrete_args=concrete or None)
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][1:]:
        if not node.args:  # no default: a real input
            continue
        checks, todo = {}, [node]
        while todo:  # the placeholder and its specialization checks (eq -> _assert, _assert_is_none)
            n = todo.pop()
            checks[n] = None
            todo += list(n.users)
        for n in reversed(list(checks)):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _weight_quant(bits: int):
    from brevitas.quant import Int8WeightPerChannelFloat
    return Int8WeightPerChannelFloat if bits == 8 else Int8WeightPerChannelFloat.let(bit_width=bits)


@contextlib.contextmanager
def _residual_pass_limit(graph: nn.Module):
    """brevitas' residual handler aligns one add/cat per pass and gives up after
    MAX_RESIDUAL_ITERS (9999) passes, each linting the whole graph: on a ViT, whose position
    embedding can never be aligned, that failure took 450 s (measured). A graph that converges
    needs at most one pass per node, so that many (plus slack) is the limit here."""
    from brevitas.graph import quantize_impl
    old = quantize_impl.MAX_RESIDUAL_ITERS
    quantize_impl.MAX_RESIDUAL_ITERS = len(graph.graph.nodes) + 10
    try:
        yield
    finally:
        quantize_impl.MAX_RESIDUAL_ITERS = old


def quantize_graph(graph: nn.Module, qsettings: dict) -> nn.Module:
    """Preprocessed float graph -> brevitas quant layers (structure only, no calibration)."""
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP, layerwise_quantize, quantize
    from brevitas.quant import Int32Bias
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

    # brevitas builds each quant layer from a kwargs table keyed by type; a one-argument lambda
    # is evaluated on the module being replaced, which is how bits vary by qualified name
    by_id = {id(m): n for n, m in graph.named_modules()}
    default = qsettings["weight_bits"]
    layer_bits = qsettings.get("layer_bits") or {}
    wq = lambda m: _weight_quant(layer_bits.get(by_id.get(id(m)), default))  # noqa: E731
    weight_only = qsettings.get("act_bits", 8) == 16
    kwargs = {"weight_quant": wq, "return_quant_tensor": not weight_only}
    if weight_only:
        # float activations and biases: only the compute layers change, nothing is inserted
        kwargs.update(input_quant=None, output_quant=None, bias_quant=None)
        return layerwise_quantize(graph, compute_layer_map=_layer_table(kwargs, kwargs))
    # Int32 bias: runtimes fuse Conv+bias into one integer kernel only with an int32 bias
    kwargs["bias_quant"] = Int32Bias
    if qsettings.get("activations", "symmetric") == "asymmetric":
        # each compute layer quantizes its own input to uint8 with a learned zero point.
        # Residual sums stay symmetric int8: brevitas cannot carry a zero point through an
        # integer add or accumulator ("Computing zero point of output accumulator not
        # supported"; measured: a shifted quantizer on the add inputs broke the ResNet, PTQ
        # accuracy 1.00 -> 0.47..0.87). So the layer returns float and its inserted output
        # quantizer requantizes it.
        kwargs.update(input_quant=ShiftedUint8ActPerTensorFloat, return_quant_tensor=False)
    act_map, identity_map = _act_maps(qsettings)
    compute_map = dict(COMPUTE_LAYER_MAP)
    compute_map.update(_layer_table(kwargs, kwargs))
    # brevitas' graph passes edit the GraphModule in place: a failed attempt leaves its input,
    # add-output and residual quantizers behind (measured on vit_tiny: 7 stray quantizers in
    # the layerwise model), so the fallback starts again from an untouched copy
    pristine = copy.deepcopy(graph)
    try:
        with _residual_pass_limit(graph):
            qmodel = quantize(graph, quant_identity_map=identity_map, compute_layer_map=compute_map,
                              quant_act_map=act_map)
    except RuntimeError as e:
        if "align scale factors" not in str(e):
            raise
        by_id.update({id(m): n for n, m in pristine.named_modules()})  # the bits lambda reads it
        qmodel = _layerwise(pristine, kwargs)
    _float_where_quant_tensor_lacks(qmodel)
    _quantize_before_sigmoid(qmodel)
    _matmul_quantizers(qmodel, qsettings)
    return qmodel


def _quantize_before_sigmoid(qmodel: nn.Module) -> None:
    """A quantizer between a compute layer and the QuantSigmoid it feeds. brevitas quantizes a
    sigmoid's output only, so the layer's output reached it in float and ONNX Runtime, which
    fuses DQ -> Conv -> Q into QLinearConv, ran the layer as a float Conv + Sigmoid: all 16
    squeeze-excite expand convs of torchvision's EfficientNet-B0 (66/82 int8). OpenVINO ran
    them int8 either way. The cost is one more int8 rounding, before a sigmoid."""
    from brevitas.nn import QuantIdentity, QuantSigmoid
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas.quant import Int8ActPerTensorFloat
    graph = getattr(qmodel, "graph", None)
    if graph is None:
        return
    mods = dict(qmodel.named_modules())
    for node in list(graph.nodes):
        src = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(mods.get(node.target), QuantSigmoid) or getattr(src, "op", None) != "call_module":
            continue
        layer = mods.get(src.target)
        if not isinstance(layer, QuantWeightBiasInputOutputLayer) or layer.output_quant.is_quant_enabled:
            continue
        name = f"{src.target.replace('.', '_')}_sigmoid_input_quant"
        qmodel.add_module(name, QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True))
        with graph.inserting_after(src):
            q = graph.call_module(name, (src,))
        node.replace_input_with(src, q)
    qmodel.recompile()


def as_float(x):
    """A QuantTensor's dequantized value (a plain tensor, tuple or shape passes through)."""
    return getattr(x, "value", x)


def _float_where_quant_tensor_lacks(qmodel: nn.Module) -> None:
    """Tensor methods brevitas' IntQuantTensor lacks, and indexing, take their input's float
    value first (as_float). IntQuantTensor is a tuple: it has no unbind, chunk or mean, `q[:, 0]`
    fails ("tuple indices must be integers or slices") and `q[0]` returns its whole value, not
    row 0. Graph mode hands one to torchvision's VisionTransformer's qkv unbind (through
    compress' explicit attention) and to ShuffleNetV2's chunk (a quantized cat), whose first
    quantized forwards failed ("'IntQuantTensor' object has no attribute 'unbind'" / "'chunk'"),
    and attributes it lacks (timm's `x.ndim` checks: "... no attribute 'ndim'").
    The quantizers still quantize (their Q/DQ is exported); other users of their outputs still
    get the QuantTensor."""
    import operator

    from brevitas.quant_tensor import IntQuantTensor
    graph = getattr(qmodel, "graph", None)
    if graph is None:
        return
    for node in list(graph.nodes):
        lacks = node.op == "call_method" and not hasattr(IntQuantTensor, node.target)
        # attributes too: timm's BatchNormAct2d asserts `x.ndim == 4`, and that getattr stays in
        # the graph after its BatchNorm is folded (timm's EfficientNet, MobileNetV3, RegNet, ...)
        lacks |= node.op == "call_function" and node.target is getattr and not hasattr(IntQuantTensor, node.args[1])
        if lacks or (node.op == "call_function" and node.target is operator.getitem):
            with graph.inserting_before(node):
                node.replace_input_with(node.args[0], graph.call_function(as_float, (node.args[0],)))
    qmodel.recompile()


def _matmul_quantizers(qmodel: nn.Module, qsettings: dict) -> None:
    """int8 inputs to the attention matmuls (QK^T, AV) of explicit attention: ONNX Runtime
    fuses DQ -> MatMul into an integer matmul, OpenVINO runs it in i8/u8. The softmax gets
    an unsigned grid (its values are in [0, 1]) unless every activation must be signed."""
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
    signed = qsettings.get("activations") == "signed"
    quantize_matmul_inputs(qmodel, Int8ActPerTensorFloat, Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)


def _act_maps(qsettings: dict) -> tuple[dict, dict]:
    """brevitas' activation and identity quantizer tables, int8 throughout when signed."""
    from brevitas.graph.quantize import QUANT_ACT_MAP, QUANT_IDENTITY_MAP
    if qsettings.get("activations") != "signed":
        return QUANT_ACT_MAP, QUANT_IDENTITY_MAP
    # TensorRT reads only signed int8 Q/DQ: ReLU outputs lose their unused sign bit
    # (half the grid) instead of being uint8
    from brevitas.quant import Int8ActPerTensorFloat
    act_map = {t: (cls, {**{k: v for k, v in kw.items() if k not in ("max_val", "min_val")},
                         "act_quant": Int8ActPerTensorFloat}) for t, (cls, kw) in QUANT_ACT_MAP.items()}
    identity_map = {k: (cls, {**kw, "act_quant": Int8ActPerTensorFloat})
                    for k, (cls, kw) in QUANT_IDENTITY_MAP.items()}
    return act_map, identity_map


def _layer_table(conv_kwargs: dict, linear_kwargs: dict) -> dict:
    import brevitas.nn as qnn
    return {nn.Conv2d: (qnn.QuantConv2d, conv_kwargs), nn.Conv1d: (qnn.QuantConv1d, conv_kwargs),
            nn.Linear: (qnn.QuantLinear, linear_kwargs)}


def _layerwise(graph: nn.Module, kwargs: dict) -> nn.Module:
    """brevitas' graph mode needs one scale on every input of an add; a parameter added to
    activations (a ViT's position embedding) or attention's matmuls defeat it. Then each
    compute layer quantizes its own input instead (brevitas' layerwise mode, what it uses for
    transformers): int8 Conv/Gemm inputs and weights, float everything in between."""
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant import Int8ActPerTensorFloat
    kwargs = {**kwargs, "input_quant": Int8ActPerTensorFloat, "return_quant_tensor": False}
    # a Conv needs a Q on its output too: ORT fuses DQ -> Conv -> Q into QLinearConv and has
    # no float-output int8 conv, while DQ -> MatMul/Gemm without a Q still runs
    # MatMulIntegerToFloat / QGemm
    conv = {**kwargs, "output_quant": Int8ActPerTensorFloat}
    return layerwise_quantize(graph, compute_layer_map=_layer_table(conv, kwargs))


def prepare(model: nn.Module, qsettings: dict) -> nn.Module:
    """Float model -> brevitas fake-quant graph model (structure only, no calibration)."""
    return quantize_graph(preprocess(model, qsettings), qsettings)


def rebuild_quantized(model: nn.Module, qsettings: dict, input_shape) -> nn.Module:
    model = prepare(model, qsettings)
    model.eval()
    with torch.no_grad():  # one pass initialises lazily-shaped quantizer state
        model(torch.zeros(1, *input_shape))
    return model


def weight_counts(graph: nn.Module, names: list[str]) -> dict[str, int]:
    mods = dict(graph.named_modules())
    return {n: mods[n].weight.numel() for n in names}


def describe(model: nn.Module) -> dict:
    """What a quantized model holds, read from its quantizers (for the deployment manifest):
    weight bits per layer, whether activations are quantized, and so which kernels a runtime
    should execute: int8 (Q/DQ around activations fuse into QLinear*/i8 kernels) or float
    (weight-only: weights are dequantized once and the compute runs in float)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
    bits = {n: int(m.weight_quant.bit_width()) for n, m in model.named_modules()
            if isinstance(m, QuantWeightBiasInputOutputLayer)}
    acts = any(isinstance(m, ActQuantProxyFromInjector) and m.is_quant_enabled for m in model.modules())
    qs = {"weight_bits": max(bits.values(), default=8), "act_bits": 8 if acts else 16, "layer_bits": bits}
    from compress.quantize.config import format_name
    # attention matmuls whose two inputs are quantized (QK^T: q_quant, k_quant; AV: attn_quant,
    # v_quant): a runtime is expected to run them int8 too
    matmuls = sum(n.rsplit(".", 1)[-1] in ("q_quant", "attn_quant") and type(m).__name__ == "QuantIdentity"
                  for n, m in model.named_modules())
    return {"format": format_name(qs), "weight_bits": bits, "act_bits": qs["act_bits"], "int8_matmuls": matmuls,
            "weight_only": not acts, "expected_kernels": "int8" if acts else "float",
            # b-bit weights are stored as int8 tensors clipped to the b-bit range: the file
            # is int8-sized; packed is what b-bit storage would take
            "packed_weight_bytes": sum(m.weight.numel() * bits[n] for n, m in model.named_modules()
                                       if n in bits) / 8}
