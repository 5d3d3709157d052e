"""A plain-torch Gemma 2 that computes what transformers 5.x Gemma2ForCausalLM computes with eager attention,
operation for operation, so that each bf16 rounding happens where HF's happens: RMSNorm in fp32 with one cast
at the end, the embedding normalizer as a tensor of the model's dtype, RoPE tables in fp32 cast to the model's
dtype, q*cos + rotate_half(q)*sin as three rounded ops, scores as matmul then * scaling, each softcap as divide,
tanh, multiply, the softmax in fp32 cast back, the causal-LM loss on logits.float().

It is what tools/torch_case.py runs where transformers is not installed (`--factory gemma2_torch:eager`), and a
second implementation to check the checker with: module and parameter names are HF's, so PEFT and the state dict
of a case file load into it unchanged, and a factory that patches HF attributes (attn_logit_softcapping on each
attention module, config.final_logit_softcapping) patches this model the same way.

Attention is eager only; packed rows (position_ids restarting, no attention_mask) and padding masks follow HF's
masking_utils as used in training (use_cache=False).
"""

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


def plain_config(spec, attn_cap, final_cap):
    """The config fields this model reads, from tools/gemma2_case.py's parsed config, under HF's attribute names."""
    return SimpleNamespace(
        vocab_size=spec.V, hidden_size=spec.D, intermediate_size=spec.I, num_hidden_layers=spec.L,
        num_attention_heads=spec.H, num_key_value_heads=spec.KV, head_dim=spec.hd, query_pre_attn_scalar=spec.qpas,
        sliding_window=spec.W, layer_types=list(spec.layer_types), rms_norm_eps=spec.eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.theta}, pad_token_id=spec.pad,
        attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap, _attn_implementation="eager")


def _rope_theta(config):
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(config.rope_theta)


class Gemma2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma2RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def repeat_kv(x, n):
    b, kv, t, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)


class Gemma2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.query_pre_attn_scalar ** -0.5
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.attn_logit_softcapping = config.attn_logit_softcapping
        D, H, KV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, KV * hd, bias=False)
        self.v_proj = nn.Linear(D, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        cap = self.attn_logit_softcapping
        if cap is not None:
            w = w / cap
            w = torch.tanh(w)
            w = w * cap
        w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(o)


class Gemma2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Gemma2Attention(config, layer_idx)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, masks):
        mask = masks["sliding" if self.self_attn.is_sliding else "full"]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)

    def masks(self, B, T, position_ids, attention_mask, dtype, device):
        """HF's additive masks: 0 where a key is visible, the dtype's minimum elsewhere."""
        q = torch.arange(T, device=device)[:, None]
        kv = torch.arange(T, device=device)[None, :]
        allowed = (kv <= q)[None].expand(B, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        elif position_ids is not None:
            # Packed rows: a document starts wherever the position is not its predecessor's + 1
            # (masking_utils.find_packed_sequence_indices).
            diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
            doc = (diff != 1).cumsum(-1)
            allowed = allowed & (doc[:, :, None] == doc[:, None, :])
        window = allowed & (q - kv < self.config.sliding_window)[None]
        lowest = torch.finfo(dtype).min
        as_add = lambda a: torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(~a, lowest)[:, None]
        return {"full": as_add(allowed), "sliding": as_add(window)}

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        pos = position_ids if position_ids is not None else torch.arange(T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary_emb(x, pos)
        masks = self.masks(B, T, position_ids, attention_mask, x.dtype, x.device)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, masks)
        return self.norm(x)


class Gemma2ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.model = Gemma2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as in Gemma 2

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, use_cache=False, **_):
        logits = self.lm_head(self.model(input_ids, position_ids, attention_mask))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        loss = None
        if labels is not None:
            shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = F.cross_entropy(logits.float().view(-1, self.vocab_size), shift.reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def eager(config, case):
    """Factory for tools/torch_case.py: this model, with the caps of `config` (an HF Gemma2Config or plain_config)."""
    return Gemma2ForCausalLM(config)
