#!/usr/bin/env bash
# tools/torch_case.py and verify's judge of its results, end to end on the CPU (ctest label torch):
#   test_torch_case.sh VERIFY MAKE_CASE eager|no-attn-softcap|no-logit-softcap|bad-input|fp32-labelled-bf16
# eager: a correct bf16 Gemma 2 (transformers' eager attention where transformers is installed, else the
# plain-torch model of tools/gemma2_torch.py, which rounds where HF eager does) must pass `verify --case`.
# no-attn-softcap, no-logit-softcap: the same model with that cap dropped (tests/torch_factories.py) must fail,
# with that bug's fingerprint on top. bad-input: an unknown torch-* kind and bad arguments are exit 2.
# fp32-labelled-bf16: an fp32 result labelled torch-bf16 fails, saying it is nearer float64 than the policy, naming
# no bug.
# Exit 77 (ctest skip) where no Python here has torch, h5py and numpy, saying so.
set -uo pipefail
verify=$1 make_case=$2 mode=$3
root=$(cd "$(dirname "$0")/.." && pwd)

py=""
for cand in ${GEMMA_TORCH_PYTHON:-} python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c "import torch, h5py, numpy" 2>/dev/null; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "SKIP: no python3 with torch, h5py and numpy (Debian: apt-get install python3-torch python3-h5py)"
  exit 77
fi
if "$py" -c "import transformers" 2>/dev/null; then model=(); impl="transformers Gemma2ForCausalLM"
else model=(--factory gemma2_torch:eager); impl="tools/gemma2_torch.py (transformers not installed)"; fi
echo "python: $py, torch $("$py" -c 'import torch; print(torch.__version__)'); model: $impl"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$make_case" --model gemma2-tiny --lora-r 4 --out "$tmp/case.h5" >/dev/null || exit 1

# verify's exit status, with its output kept for the fingerprint line.
judge() {
  "$verify" --case "$1" --json "$tmp/v.json" >"$tmp/v.out" 2>"$tmp/v.err"
  local rc=$?
  grep -E "torch result vs|^  loss|^  logits|fingerprint|checks passed" "$tmp/v.out"
  return $rc
}

case $mode in
  eager)
    "$py" "$root/tools/torch_case.py" "$tmp/case.h5" --out "$tmp/r.h5" "${model[@]}" || exit 1
    judge "$tmp/r.h5"
    rc=$?
    [ $rc -eq 0 ] || { echo "FAIL: verify exit $rc for a correct bf16 model"; cat "$tmp/v.out" "$tmp/v.err"; exit 1; }
    ;;
  no-attn-softcap | no-logit-softcap)
    fn=$([ "$mode" = no-attn-softcap ] && echo no_attn_softcap || echo no_final_softcap)
    "$py" "$root/tools/torch_case.py" "$tmp/case.h5" --out "$tmp/r.h5" --factory "$root/tests/torch_factories.py:$fn" || exit 1
    judge "$tmp/r.h5"
    rc=$?
    [ $rc -eq 1 ] || { echo "FAIL: verify exit $rc for a model with $mode (want 1)"; cat "$tmp/v.out" "$tmp/v.err"; exit 1; }
    top=$(sed -n 's/^  top fingerprint: \([a-z0-9-]*\).*/\1/p' "$tmp/v.out")
    [ "$top" = "$mode" ] || { echo "FAIL: top fingerprint '$top', want '$mode'"; cat "$tmp/v.out"; exit 1; }
    "$py" -c "import json,sys; j=json.load(open('$tmp/v.json')); t=j['results']['torch']; sys.exit(0 if t['top_fingerprint']=='$mode' and not j['pass'] else 1)" \
      || { echo "FAIL: --json does not say $mode on top"; exit 1; }
    ;;
  bad-input)
    "$py" "$root/tools/torch_case.py" "$tmp/case.h5" --out "$tmp/r.h5" "${model[@]}" >/dev/null || exit 1
    "$py" - "$tmp/r.h5" <<'EOF' || exit 1
import sys, h5py
with h5py.File(sys.argv[1], "r+") as f:
    f["expected"].attrs["expected_kind"] = "torch-fp8"
EOF
    "$verify" --case "$tmp/r.h5" --json "$tmp/v.json" >/dev/null 2>"$tmp/err"
    rc=$?
    [ $rc -eq 2 ] && grep -q "torch-fp8" "$tmp/err" && [ ! -e "$tmp/v.json" ] \
      || { echo "FAIL: unknown kind torch-fp8: exit $rc, stderr: $(cat "$tmp/err")"; exit 1; }
    echo "unknown kind: exit 2, $(cat "$tmp/err")"
    for args in "$tmp/missing.h5 --out $tmp/x.h5" "$tmp/case.h5 --out $tmp/nodir/x.h5" \
                "$tmp/case.h5 --out $tmp/x.h5 --combos attn,bogus" "$tmp/case.h5 --out $tmp/x.h5 --factory nosuchmodule:f"; do
      # shellcheck disable=SC2086
      "$py" "$root/tools/torch_case.py" $args >/dev/null 2>"$tmp/err"
      rc=$?
      [ $rc -eq 2 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && [ ! -e "$tmp/x.h5" ] \
        || { echo "FAIL: torch_case.py $args: exit $rc, stderr: $(cat "$tmp/err")"; exit 1; }
      echo "torch_case.py ${args//$tmp\//}: exit 2, $(cat "$tmp/err")"
    done
    ;;
  fp32-labelled-bf16)
    # An fp32 run labelled torch-bf16 is more exact than a bf16 run can be; its difference from the policy is the
    # policy's own rounding, which projected on the known bugs named one (rope-bf16 at 5.4 x, found by a probe on a
    # float64 result). It fails, says why, and names no bug.
    # gemma2-micro with every weight trainable: at gemma2-tiny's widths the correct variants spread wider than bf16's
    # own error, and the fp32 result passes.
    "$make_case" --model gemma2-micro --lora-r 0 --out "$tmp/micro.h5" >/dev/null || exit 1
    "$py" "$root/tools/torch_case.py" "$tmp/micro.h5" --out "$tmp/r.h5" --dtype fp32 "${model[@]}" >/dev/null || exit 1
    "$py" -c "import h5py,sys; f=h5py.File('$tmp/r.h5','r+'); f['expected'].attrs['expected_kind']='torch-bf16'" || exit 1
    judge "$tmp/r.h5"
    rc=$?
    [ $rc -eq 1 ] || { echo "FAIL: verify exit $rc for an fp32 result labelled bf16 (want 1)"; cat "$tmp/v.out" "$tmp/v.err"; exit 1; }
    grep -q "nearer float64 than the hf-bf16 policy" "$tmp/v.out" || { echo "FAIL: no note"; cat "$tmp/v.out"; exit 1; }
    ! grep -q "top fingerprint" "$tmp/v.out" || { echo "FAIL: a bug is named"; cat "$tmp/v.out"; exit 1; }
    ;;
  *) echo "usage: $0 VERIFY MAKE_CASE eager|no-attn-softcap|no-logit-softcap|bad-input|fp32-labelled-bf16" >&2; exit 2 ;;
esac
echo "PASS: $mode"
