"""HF + PEFT finetuning without activation checkpointing, for comparison with `fast_bench --no-recompute`.

Runs the peer benchmark script (the project's docs/benchmarks.md names it; it is not part of this repository)
unchanged, except that gradient_checkpointing_enable does nothing, so every activation is kept:

  python3 tools/hf_peft_no_checkpointing.py PATH/hf_peft_bench.py '["gemma2-9b","eager",2,1024]' ...

The remaining arguments and the environment (HF_STEPS, HF_WARM, OUT) go to that script as they are."""
import runpy
import sys

import transformers

if len(sys.argv) < 2:
    sys.exit("usage: hf_peft_no_checkpointing.py PATH/hf_peft_bench.py [PLAN_ENTRY ...]")
transformers.PreTrainedModel.gradient_checkpointing_enable = lambda self, **kwargs: None
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
