"""PyTorch's own transformer blocks (nn.TransformerEncoder, nn.TransformerEncoderLayer,
nn.MultiheadAttention) rewritten as explicit modules with the same weights and numbers.

Why a rewrite, not brevitas' QuantMultiheadAttention (brevitas 0.13):
- FX treats every torch.nn module as a leaf, so brevitas' graph passes never see inside
  nn.TransformerEncoder; inside it, TransformerEncoderLayer's fast-path checks read `.dtype`
  of whatever the attention returns, and brevitas' IntQuantTensor has none (the W8A8 crash
  "'IntQuantTensor' object has no attribute 'dtype'"). The fast path
  (aten::_transformer_encoder_layer_fwd) and SDPA (aten::scaled_dot_product_attention) also
  have no ONNX export at the opsets the TorchScript exporter writes.
- nn.MultiheadAttention ties its heads to the residual width (embed_dim == num_heads *
  head_dim, q projection square): torch-pruning can only narrow every head, never drop one.
  Here q/k/v come from one Linear of width 3 * num_heads * head_dim and the output
  projection reads num_heads * head_dim, so whole heads go (compress/prune/channels.py).
- The attention matmuls are explicit, with a marker (nn.Identity, an FX leaf) on each input,
  which the quantize stage replaces by an activation quantizer: int8 QK^T and AV on runtimes
  that fuse DequantizeLinear -> MatMul.
The rewrite keeps qualified names (`encoder.layers.0.self_attn.out_proj`, `...linear1`); the
fused input projection is `self_attn.qkv`. Masks are not supported (one clear error)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from compress.errors import UserError

# the Identity markers in front of the attention matmuls: QK^T reads q_quant and k_quant,
# AV reads attn_quant (the softmax, in [0, 1]: an unsigned grid) and v_quant
MATMUL_INPUTS = ("q_quant", "k_quant", "v_quant", "attn_quant")
UNSIGNED = {"attn_quant"}


class AttentionError(UserError):
    pass


def _no_masks(*masks) -> None:
    if any(m is not None for m in masks):
        raise AttentionError("attention masks are not supported by compress' explicit attention "
                             "(compress/quantize/attention.py); call the encoder without masks")


class SelfAttention(nn.Module):
    """Multi-head self-attention as Linear -> reshape -> matmul/softmax/matmul -> Linear, the
    layout of timm's Attention (qkv, num_heads, head_dim), so pruning treats both alike."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 batch_first: bool = True, bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.batch_first = num_heads, head_dim, batch_first
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        for name in MATMUL_INPUTS:
            setattr(self, name, nn.Identity())

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "SelfAttention":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise AttentionError("nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn is not "
                                 "supported by compress' explicit attention (compress/quantize/attention.py)")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.dropout, mha.batch_first,
                  bias=mha.in_proj_bias is not None).to(w.device, w.dtype)
        new.qkv.weight = nn.Parameter(w.detach().clone())
        new.out_proj.weight = nn.Parameter(mha.out_proj.weight.detach().clone())
        if mha.in_proj_bias is not None:
            new.qkv.bias = nn.Parameter(mha.in_proj_bias.detach().clone())
            new.out_proj.bias = nn.Parameter(mha.out_proj.bias.detach().clone())
        return new.train(mha.training)

    def attend(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind, not indexing: torch-pruning traces it as a split
        # the scale on q, as nn.MultiheadAttention's math path does, before its quantizer
        attn = self.q_quant(q * self.head_dim ** -0.5) @ self.k_quant(k.transpose(-2, -1))
        attn = self.attn_quant(self.attn_drop(attn.softmax(dim=-1)))
        out = (attn @ self.v_quant(v)).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.out_proj(out)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        """nn.MultiheadAttention's call, self-attention only: (output, None)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise AttentionError("only self-attention (query is key is value) is supported by compress' "
                                 "explicit attention (compress/quantize/attention.py)")
        _no_masks(key_padding_mask, attn_mask)
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.attend(x)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _activation(act) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    table = {F.relu: nn.ReLU, F.gelu: nn.GELU}
    if act not in table:
        raise AttentionError(f"TransformerEncoderLayer activation {act!r}: expected relu, gelu or a module")
    return table[act]()


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's math path (norm_first or not), same module names."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.norm_first = layer.norm_first
        self.self_attn = SelfAttention.from_torch(layer.self_attn)
        self.self_attn.batch_first = True  # the layer transposes once, below
        self.batch_first = layer.self_attn.batch_first
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.activation = _activation(layer.activation)
        self.train(layer.training)

    def _sa(self, x):
        return self.dropout1(self.self_attn.attend(x))

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        _no_masks(src_mask, src_key_padding_mask)
        x = src if self.batch_first else src.transpose(0, 1)
        if self.norm_first:
            x = x + self._sa(self.norm1(x))
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x))
            x = self.norm2(x + self._ff(x))
        return x if self.batch_first else x.transpose(0, 1)


class Encoder(nn.Module):
    """nn.TransformerEncoder without the nested-tensor fast path: its layers, then its norm."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(m) if type(m) is nn.TransformerEncoderLayer else m
                                    for m in encoder.layers)
        self.norm = encoder.norm
        self.train(encoder.training)

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        _no_masks(mask, src_key_padding_mask)
        for layer in self.layers:
            src = layer(src)
        return self.norm(src) if self.norm is not None else src


_REWRITES = {nn.TransformerEncoder: Encoder, nn.TransformerEncoderLayer: EncoderLayer,
             nn.MultiheadAttention: SelfAttention.from_torch}
EXPLICIT = (Encoder, EncoderLayer, SelfAttention)


def has_torch_attention(model: nn.Module) -> bool:
    return any(type(m) in _REWRITES for m in model.modules())


def rewrite(model: nn.Module) -> list[str]:
    """Replace, in place, every torch transformer block of `model` (outermost first) by its
    explicit twin; the qualified names replaced (recorded in structure.json, repeated by
    rebuild). The root module itself is never replaced."""
    from compress.checkpoint import set_module
    done: list[str] = []
    for name, m in list(model.named_modules()):
        if name and type(m) in _REWRITES and not any(name.startswith(d + ".") for d in done):
            set_module(model, name, _REWRITES[type(m)](m))
            done.append(name)
    return done


def rewritten(model: nn.Module) -> list[str]:
    """The outermost explicit blocks of `model`, by qualified name (what rewrite() returned)."""
    out: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, EXPLICIT) and not any(name.startswith(d + ".") for d in out):
            out.append(name)
    return out


def quantize_matmul_inputs(model: nn.Module, signed, unsigned) -> list[str]:
    """Replace each attention matmul's input markers by brevitas activation quantizers
    (`signed`/`unsigned` quantizer classes, float out so the exported graph is DQ -> MatMul);
    returns the quantizers' names."""
    import brevitas.nn as qnn

    from compress.checkpoint import set_module
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in MATMUL_INPUTS and type(m) is nn.Identity]
    for n in names:
        quant = unsigned if n.rsplit(".", 1)[-1] in UNSIGNED else signed
        set_module(model, n, qnn.QuantIdentity(act_quant=quant, return_quant_tensor=False))
    return names
