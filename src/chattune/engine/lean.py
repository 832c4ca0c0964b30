"""A lean decode step for Llama-family models: transformers' forward with fewer, larger
matmuls and without its per-call glue.

At one row, a decode step of a small model is mostly fixed cost: SmolLM2-135M's step
through transformers' forward calls ~180 operators a layer (module calls, keyword
plumbing, mask and cache bookkeeping, RoPE recomputed per layer), on top of reading the
weights once (benchmarks/profile_decode.py has the breakdown). This step computes the
same thing, layer by layer, with the model's own weights and buffers:
- q/k/v and gate/up projections as one matmul each, on weights concatenated once and
  packed for oneDNN (as ``engine/packed.py`` does; the engine's packed linears then
  leave those modules out, unless a mixed LoRA lane decodes through PEFT's forward); o,
  down and the output projection through the engine's packed linears;
- LoRA's low-rank terms (PEFT ``lora.Linear``, any active adapters, not merged, no DoRA)
  on the fused output: the group's A matrices stacked, its B matrices block-diagonal
  and scaled, two small matmuls a group;
- the rotary embedding once a step (transformers' own ``rotary_emb``), the cache's
  layers updated directly, attention through ``attention.segment_attention`` (the
  engine's runs and drafts plans are unchanged).
transformers has no such path (its compiled ``generate`` needs a static cache and one
sampling setting a batch; PEFT's layers would break its graph), so it is written here.
The engine uses it only where it computes what the model's forward does: float32 weights
on the CPU, gradients off, no autocast, the supported architectures and projection
types, and one variant per forward (a mixed LoRA lane, ``Variant.route``, runs PEFT's own
forward). Fused weights are rebuilt when a source weight changes (its storage or version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chattune.engine.packed import PackedLinears, available_bytes
from chattune.models.attention import segment_attention

ARCHITECTURES = ("llama", "mistral", "qwen2")  # the same decoder layer (Qwen2: biased q/k/v)
FUSE = True  # one matmul per group; False (benchmarks/decode_levers.py only): one per projection
WEIGHTS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # Engine(weights=...)
PACK_ROWS = None  # the row count oneDNN lays the packed weights out for (None: any)


def _pack(weight: torch.Tensor):
    w = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    return lambda x, bias=None: torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [None], "")


def _reduced(weight: torch.Tensor, dtype: torch.dtype):
    """A linear on a ``dtype`` copy of ``weight``: the input rounded to ``dtype``, products
    summed in float32 by torch's CPU kernel, the output back in float32."""
    w = weight.to(dtype).contiguous()

    def linear(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x.to(dtype), w).float()
        return out if bias is None else out + bias

    return linear


class _Group:
    """Projections that read the same input, as one matmul (``members``: nn.Linear or
    PEFT ``lora.Linear``)."""

    def __init__(self, members: list[torch.nn.Module], weights: torch.dtype = torch.float32):
        self.members, self.weights = members, weights
        self.bases = [getattr(m, "base_layer", m) for m in members]
        self.packed = None  # the engine's PackedLinears, for a single projection it packs
        self.sizes = [b.out_features for b in self.bases]
        self.key = None
        self.linear = None
        self.bias = None
        self.lora_key = None
        self.lora = None  # (A stacked (R, in), B block-diagonal scaled (out, R)) or None

    def _weights_key(self) -> tuple:
        return tuple((b.weight.data_ptr(), b.weight._version) for b in self.bases)

    def refresh(self) -> None:
        if self.packed is not None and len(self.bases) == 1 and self.weights == torch.float32:
            forward = self.packed.forward_of(self.bases[0])  # the same object until the weight changes
            if forward is not None:
                if forward is not self.key:
                    self.linear = lambda x, bias=None, f=forward: f(x)  # the module's own bias is in it
                    self.key, self.bias = forward, None
                return
        key = self._weights_key()
        if key != self.key:
            weight = torch.cat([b.weight.detach() for b in self.bases]) if len(self.bases) > 1 else self.bases[0].weight.detach()
            self.linear = _pack(weight.contiguous()) if self.weights == torch.float32 else _reduced(weight, self.weights)
            if not FUSE and len(self.bases) > 1:
                parts = [_pack(b.weight.detach()) for b in self.bases]
                self.linear = lambda x, bias=None: torch.cat([f(x) for f in parts], dim=-1) + (0 if bias is None else bias)
            biases = [b.bias for b in self.bases]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else torch.zeros(s) for b, s in zip(biases, self.sizes)])
            self.key = key

    def lora_terms(self) -> bool:
        """Collect the active low-rank terms; False when a member is of a kind not handled here."""
        parts, key = [], []
        for i, m in enumerate(self.members):
            if m is self.bases[i]:
                continue
            if m.disable_adapters or m.merged:
                key.append((i, None))
                continue
            for name in m.active_adapters:
                if name not in m.lora_A:
                    continue
                if m.use_dora.get(name) or getattr(m, "lora_bias", {}).get(name) or m.training:
                    return False
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                parts.append((i, a, b, m.scaling[name]))
                key.append((i, name, a.data_ptr(), a._version, b.data_ptr(), b._version, m.scaling[name]))
        key = tuple(key)
        if key != self.lora_key:
            self.lora_key = key
            self.lora = self._stack(parts) if parts else None
        return True

    def _stack(self, parts) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        rank = sum(a.shape[0] for _, a, _, _ in parts)
        a_all = torch.cat([a.detach() for _, a, _, _ in parts])  # (R, in)
        b_all = a_all.new_zeros(offsets[-1], rank)  # (out, R)
        r0 = 0
        for i, a, b, scale in parts:
            b_all[offsets[i]:offsets[i + 1], r0:r0 + a.shape[0]] = b.detach() * scale
            r0 += a.shape[0]
        return a_all, b_all

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        out = self.linear(x, self.bias)  # the packed forward of a single projection has its bias in it
        if self.lora is not None:
            a, b = self.lora
            out = out + F.linear(F.linear(x, a), b)
        return out


class LeanDecoder:
    """The decode step of one Llama-family model (``build`` returns None for others)."""

    def __init__(self, model: torch.nn.Module, weights: torch.dtype = torch.float32):
        inner = model.model
        self.model, self.embed, self.rotary, self.norm = model, inner.embed_tokens, inner.rotary_emb, inner.norm
        self.weights = weights
        # the output projection stays float32: logits rounded to float16 (steps of 1/64 at
        # 16-32) would tie and flip greedy choices
        self.head = _Group([model.lm_head])
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, _Group([attn.q_proj, attn.k_proj, attn.v_proj], weights),
                                _Group([attn.o_proj], weights), layer.post_attention_layernorm,
                                _Group([mlp.gate_proj, mlp.up_proj], weights), _Group([mlp.down_proj], weights),
                                attn.scaling))
        self.groups = [self.head] + [g for layer in self.layers for g in (layer[1], layer[2], layer[4], layer[5])]
        self.lora = any(m is not b for g in self.groups for m, b in zip(g.members, g.bases))

    @property
    def fused(self) -> list[torch.nn.Module]:
        """The base linear modules this step holds its own copies of (fused, or all of them
        in reduced precision)."""
        return [b for g in self.groups if len(g.bases) > 1 or g.weights != torch.float32 for b in g.bases]

    @property
    def copy_bytes(self) -> int:
        """Memory the step's own weight copies take."""
        return sum(b.weight.numel() * g.weights.itemsize for g in self.groups
                   if len(g.bases) > 1 or g.weights != torch.float32 for b in g.bases)

    def share(self, packed) -> None:
        """Run the single projections (o, down, output) on ``packed``'s weights (the
        engine's ``PackedLinears``): no second copy of them."""
        for g in self.groups:
            if len(g.bases) == 1:
                g.packed = packed

    @staticmethod
    def build(model: torch.nn.Module, weights: torch.dtype = torch.float32) -> "LeanDecoder | None":
        """The lean step for ``model`` (a causal LM, PEFT's inner model included), or None
        when its architecture or layers are not the ones this step computes. ``weights``:
        the precision of the step's weight copies (float16, bfloat16: ``Engine``'s
        ``weights``)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in ARCHITECTURES:
            return None
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "use_sliding_window", False):
            return None
        if getattr(config, "sliding_window", None) and config.model_type == "mistral":
            return None
        if not torch.backends.mkldnn.is_available():
            return None
        try:
            lean = LeanDecoder(model, weights)
        except AttributeError:  # not the module layout of transformers' Llama
            return None
        if not all(_supported(m) for g in lean.groups for m in g.members):
            return None
        if any(hasattr(m, "_hf_hook") for m in model.modules()):
            return None  # accelerate moves or offloads weights inside the modules' own forward
        if not all(_original(m) for layer in model.model.layers
                   for m in (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)):
            return None  # wrapped or hooked (bottleneck adapters, IA3's feed-forward scaling): their forward
        return lean

    def ready(self) -> bool:
        """Whether the step computes what the model's forward would, now: float32 weights
        on the CPU, no gradients, no autocast, LoRA terms of a kind handled here."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return False
        weight = self.embed.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return False
        for g in self.groups:
            if g.bases[0].weight.dtype != torch.float32 or (self.lora and not g.lora_terms()):
                return False
            g.refresh()
        return True

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache, plan=None) -> torch.Tensor:
        """Logits (N, V) of the step's N tokens (``ids``, ``positions``: (N, 1)), their keys
        and values written to ``cache`` (the lane's ``GrowingLayer``s)."""
        n = ids.shape[0]
        h = self.embed(ids[:, 0])  # (N, D)
        cos, sin = self.rotary(h, positions)  # (N, 1, d)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, 1, d): heads, then the one position
        dq, dk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        heads = self.heads + self.kv_heads
        for i, (norm1, qkv, o, norm2, gate_up, down, scaling) in enumerate(self.layers):
            x = _rms(h, norm1)
            y = qkv(x)  # (N, dq + 2 dk)
            qk = _rotate(y[:, :dq + dk].view(n, heads, 1, self.head_dim), cos, sin)  # q and k heads in one go
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            keys, values = cache.layers[i].update(k, y[:, dq + dk:].view(n, self.kv_heads, 1, self.head_dim))
            out, _ = segment_attention(None, q, keys, values, None, scaling=scaling, kv_plan=plan)  # (N, 1, H, d)
            h = h + o(out.reshape(n, dq))
            g, u = gate_up(_rms(h, norm2)).chunk(2, dim=-1)
            h = h + down(F.silu(g) * u)
        return self.head(_rms(h, self.norm))


def prepare(model: torch.nn.Module, routed: bool, lean_steps: bool,
            weights: torch.dtype) -> tuple[PackedLinears, LeanDecoder | None]:
    """``model``'s packed linears and its lean decode step (None where it has none). The
    packed linears leave out what the lean step fuses, unless a mixed LoRA lane (``routed``)
    decodes through the model's own forward; the lean step is skipped when its fused copies
    would take more than half of the memory available."""
    lean = LeanDecoder.build(model, weights) if lean_steps else None
    free = available_bytes()
    if lean is not None and free is not None and 2 * lean.copy_bytes > free:
        lean = None
    packed = PackedLinears(model, frozenset() if routed or lean is None else frozenset(map(id, lean.fused)))
    if lean is not None:
        lean.share(packed)
    return packed, lean


def prepare_variants(variants: dict, lean_steps: bool, weights: torch.dtype,
                     earlier: dict | None = None) -> tuple[dict, dict]:
    """The engine's variants' packed linears and lean steps: one pair per model, keyed by
    the model and whether a mixed lane of it decodes through its own forward (then nothing
    is left unpacked). ``earlier``: pairs an earlier engine made, taken over where the key
    matches. Returns (pairs by key, pair by variant name)."""
    key = {name: (id(v.inner), any(w.route and w.inner is v.inner for w in variants.values()))
           for name, v in variants.items()}
    by_key = dict(earlier or {})
    for name, v in variants.items():
        if key[name] not in by_key:
            by_key[key[name]] = prepare(v.inner, key[name][1], lean_steps, weights)
    return {k: by_key[k] for k in key.values()}, {name: by_key[key[name]] for name in variants}


def _supported(m: torch.nn.Module) -> bool:
    if type(m) is torch.nn.Linear:
        return True
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return False
    return type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear


def _original(m: torch.nn.Module) -> bool:
    """``m`` is transformers' own module, without hooks."""
    return (type(m).__module__.startswith("transformers.models.") and not m._forward_hooks
            and not m._forward_pre_hooks)


def _rms(h: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' LlamaRMSNorm on float32 ``h``, as torch's one fused operator (equal to
    its six to float rounding)."""
    return F.rms_norm(h, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on (N, heads, 1, d)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
