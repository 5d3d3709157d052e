#!/usr/bin/env python3
"""Runs a PyTorch Gemma 2 on a case file and writes what it computed, for `verify --case RESULT.h5` to judge.

    torch_case.py CASE.h5 --out RESULT.h5 [--attn-implementation eager|sdpa|flex_attention]
                  [--factory MODULE:FUNCTION | --factory PATH.py:FUNCTION] [--compile]
                  [--dtype bf16|fp16|fp32] [--device cpu|cuda] [--combos none,attn,logits,attn_logits]

The model is transformers' Gemma2ForCausalLM with the chosen attention implementation, or whatever
FUNCTION(config, case) returns: config is the transformers Gemma2Config of the combination being run (caps set,
_attn_implementation set; without transformers installed, a namespace with the same attribute names), case the
parsed case file (tools/gemma2_case.py). The returned module must use HF's parameter names and accept
model(input_ids=, labels=, position_ids=, attention_mask=, use_cache=False), returning .loss and .logits:
monkey-patched HF models, custom kernels and tools/gemma2_torch.py (`--factory gemma2_torch:eager`, a
plain-torch Gemma 2 that rounds where HF eager does) all qualify. The script casts the model to --dtype, loads
the case's weights (strictly: every name, every shape), attaches the case's LoRA adapters with PEFT (adapters
kept in fp32, PEFT's default; where PEFT is not installed, a LoRA layer that computes what PEFT's does), wraps
the model in torch.compile with --compile, and runs one forward and backward per softcap combination (default:
the config's own caps).

RESULT is a copy of CASE with /expected/<combo>/loss, logits (after the final cap, as the model returned them)
and grads/<name> (every trainable tensor: the adapters, or every weight without adapters), and attributes
expected_kind = torch-<dtype> (verify compares it with the reference under that precision policy, docs/torch.md),
implementation, torch_version, transformers_version, peft_version, device, command, date. It is written to a
temporary file and renamed into place.

Exit status: 0 written; 2 bad input or an unusable setup (one line on stderr naming it); anything the model
itself raises is a traceback and exit 1.
"""

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemma2_case import COMBOS, CaseError, build_hf_config, combo_caps, read_case, write_expected  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ATTN = ("eager", "sdpa", "flex_attention")


def log(msg):
    print(msg, flush=True)


def _module_version(name):
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return "not installed"


def load_factory(spec):
    """MODULE:FUNCTION (imported from the working directory, tools/ or sys.path) or PATH.py:FUNCTION."""
    where, sep, fn = spec.rpartition(":")
    if not sep or not where or not fn:
        raise CaseError(f"--factory '{spec}': expected MODULE:FUNCTION or PATH.py:FUNCTION")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise CaseError(f"--factory '{spec}': no such file {where}")
            ms = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(ms)
            sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
            ms.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ImportError as e:
        raise CaseError(f"--factory '{spec}': cannot import {where} ({e})")
    f = getattr(module, fn, None)
    if not callable(f):
        raise CaseError(f"--factory '{spec}': {where} has no function {fn}")
    return f


class PlainLoraLinear:
    """Where PEFT is missing: PEFT's LoRA Linear forward (peft/tuners/lora/layer.py), base output plus
    lora_B(lora_A(x cast to the adapter's dtype)) * scaling, cast back to the base output's dtype."""

    @staticmethod
    def attach(torch, base, r, scaling):
        nn = torch.nn

        class LoraLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.base_layer = base
                self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32,
                                        device=base.weight.device)
                self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32,
                                        device=base.weight.device)
                self.scaling = scaling

            def forward(self, x, *args, **kwargs):
                result = self.base_layer(x, *args, **kwargs)
                dtype = result.dtype
                result = result + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
                return result.to(dtype)

        return LoraLinear()


def attach_adapters(torch, model, case):
    """Returns {case tensor name: parameter} for the adapters, and how they were attached."""
    a = case.adapter
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        config = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=a.target_modules, use_rslora=a.use_rslora,
                                 lora_dropout=0.0, bias="none")
        wrapped = peft.get_peft_model(model, config)  # modifies model in place; adapter "default"
        adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
        if adapted != set(case.lora):
            raise CaseError(f"PEFT adapted {sorted(adapted ^ set(case.lora))[:3]} differently from the case's "
                            f"adapter tensors (target_modules {a.target_modules!r})")
        params = {}
        for mod in case.lora:
            m = model.get_submodule(mod)
            if abs(m.scaling["default"] - a.scaling) > 1e-12 * a.scaling:
                raise CaseError(f"{mod}: PEFT scaling {m.scaling['default']} differs from the case's {a.scaling}")
            for ab in ("A", "B"):
                p = getattr(m, f"lora_{ab}")["default"].weight
                if p.dtype != torch.float32:  # PEFT's autocast_adapter_dtype: adapters of a bf16 model in fp32
                    p.data = p.data.float()
                params[f"{mod}.lora_{ab}.weight"] = p
        return wrapped, params, f"PEFT {peft.__version__} LoRA (adapters fp32)"
    params = {}
    for mod in case.lora:
        parent_name, _, leaf = mod.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = PlainLoraLinear.attach(torch, getattr(parent, leaf), a.r, a.scaling)
        setattr(parent, leaf, layer)
        params[f"{mod}.lora_A.weight"] = layer.lora_A.weight
        params[f"{mod}.lora_B.weight"] = layer.lora_B.weight
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return model, params, "LoRA as PEFT computes it, built in (PEFT not installed; adapters fp32)"


def build_model(torch, args, case, attn_cap, final_cap):
    s = case.spec
    have_hf = importlib.util.find_spec("transformers") is not None
    if have_hf:
        config = build_hf_config(s, attn_cap, final_cap, args.attn_implementation)
    else:
        if not args.factory:
            raise CaseError("transformers is not installed: give --factory (e.g. gemma2_torch:eager, the plain-torch "
                            "Gemma 2 in tools/)")
        from gemma2_torch import plain_config
        config = plain_config(s, attn_cap, final_cap)
    if args.factory:
        model = load_factory(args.factory)(config, case)
        if not isinstance(model, torch.nn.Module):
            raise CaseError(f"--factory {args.factory} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        from transformers import Gemma2ForCausalLM
        model = Gemma2ForCausalLM(config)
        if model.config._attn_implementation != args.attn_implementation:
            raise CaseError(f"transformers runs attention '{model.config._attn_implementation}', "
                            f"not '{args.attn_implementation}'")
    dtype = getattr(torch, DTYPES[args.dtype])
    model = model.to(device=args.device, dtype=dtype)
    own = model.state_dict()
    sd = {n: torch.from_numpy(a) for n, a in case.base.items()}
    if "lm_head.weight" in own:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    buffers = {n for n, _ in model.named_buffers()}
    for n in own:
        if n in buffers and n not in sd:
            sd[n] = own[n]  # non-weight buffers (RoPE tables) stay the model's own
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CaseError(f"the model's parameters do not match the case's weights: {str(e).splitlines()[0]}")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and lm_head.weight.data_ptr() != model.get_parameter("model.embed_tokens.weight").data_ptr():
        raise CaseError("the model's lm_head is not tied to model.embed_tokens.weight (Gemma 2 ties them)")
    if case.lora:
        runner, params, how = attach_adapters(torch, model, case)
        with torch.no_grad():
            for name, p in params.items():
                mod, ab = name.rsplit(".lora_", 1)
                p.copy_(torch.from_numpy(case.lora[mod][ab[0]]))
    else:
        runner, how = model, "every weight trains"
        params = {n: model.get_parameter(n) for n in case.base}
    runner.train()  # one training step; dropout is 0 in the config and the adapters
    if args.compile:
        if not hasattr(torch, "compile"):
            raise CaseError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
        runner = torch.compile(runner)
    return runner, params, how


def run_combo(torch, args, case, combo):
    attn_cap, final_cap = combo_caps(case.spec, combo)
    model, params, how = build_model(torch, args, case, attn_cap, final_cap)
    dev = args.device
    kw = {"input_ids": torch.from_numpy(case.ids).to(dev), "labels": torch.from_numpy(case.labels).to(dev)}
    if case.position_ids is not None:
        kw["position_ids"] = torch.from_numpy(case.position_ids).to(dev)
    if case.attention_mask is not None:
        kw["attention_mask"] = torch.from_numpy(case.attention_mask).to(dev)
    # use_cache=False, as in training: with a cache, transformers does not look for packed rows in position_ids.
    out = model(use_cache=False, **kw)
    out.loss.backward()
    missing = [n for n, p in params.items() if p.grad is None]
    if missing:
        raise CaseError(f"no gradient reached {missing[:3]}: the model does not use these parameters")
    as_np = lambda t: t.detach().to("cpu", torch.float64).numpy()
    return {"loss": float(out.loss.item()), "logits": as_np(out.logits).astype(np.float32),
            "grads": {n: as_np(p.grad).astype(np.float32) for n, p in sorted(params.items())},
            "attrs": {"loss_dtype": str(out.loss.dtype).replace("torch.", ""),
                      "logits_dtype": str(out.logits.dtype).replace("torch.", "")}}, how


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case")
    ap.add_argument("--out", required=True, help="the result file (a copy of CASE with /expected)")
    ap.add_argument("--attn-implementation", default="eager", choices=ATTN,
                    help="transformers' attention implementation (default eager)")
    ap.add_argument("--factory", help="MODULE:FUNCTION or PATH.py:FUNCTION taking (config, case), returning the model")
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the model's dtype (default bf16)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--combos", help="comma list of none,attn,logits,attn_logits (default: the config's own caps)")
    args = ap.parse_args(argv)
    command = shlex.join(sys.argv if argv is None else [sys.argv[0]] + list(argv))
    try:
        try:
            import torch
        except ImportError:
            raise CaseError("torch is not installed")
        case = read_case(args.case)
        s = case.spec
        if args.combos is None:
            combos = [("attn_logits" if s.final_cap is not None else "attn") if s.attn_cap is not None
                      else ("logits" if s.final_cap is not None else "none")]
        else:
            combos = [c.strip() for c in args.combos.split(",") if c.strip()]
            bad = [c for c in combos if c not in COMBOS]
            if bad or not combos or len(set(combos)) != len(combos):
                raise CaseError(f"--combos {args.combos!r}: use distinct names from {','.join(COMBOS)}")
        if args.factory and args.attn_implementation != "eager":
            raise CaseError("--attn-implementation applies to transformers' model; a --factory builds its own")
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            raise CaseError(f"--device {args.device}: {str(e).splitlines()[0]}")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise CaseError(f"--out {args.out}: directory {out_dir} does not exist")
        torch.manual_seed(0)  # the factory's initial weights are overwritten; kept reproducible anyway
        results, how = {}, ""
        for combo in combos:
            results[combo], how = run_combo(torch, args, case, combo)
            log(f"[{combo}] loss {results[combo]['loss']:.10g} ({results[combo]['attrs']['loss_dtype']}), "
                f"{len(results[combo]['grads'])} gradients")
        impl = (f"factory {args.factory}" if args.factory
                else f"transformers Gemma2ForCausalLM, attn_implementation={args.attn_implementation}")
        impl += (", torch.compile" if args.compile else "") + f"; {how}"
        attrs = {"expected_kind": f"torch-{args.dtype}", "implementation": impl, "generator": "tools/torch_case.py",
                 "torch_version": torch.__version__, "transformers_version": _module_version("transformers"),
                 "peft_version": _module_version("peft"), "python_version": platform.python_version(),
                 "device": args.device, "command": command,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_expected(args.case, args.out, results, attrs)
        log(f"wrote {args.out}: {attrs['expected_kind']}, {impl}")
    except CaseError as e:
        print(f"torch_case: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
