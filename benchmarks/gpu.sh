#!/usr/bin/env bash
# The project's GPU measurements in one call, from a bare GPU machine, within 8 minutes.
#
#   bash benchmarks/gpu.sh OUT_DIR                # on the GPU (one H200), from the checkout root
#   bash benchmarks/gpu.sh OUT_DIR --cpu-smoke    # the same steps on CPU, configs/tiny.py
#
# Runs from a checkout holding .official/ (the official AIM files, see BENCHMARKS.md) and
# .whl/ (wheels of the packages the machine may lack: ml_collections and its dependencies,
# `pip download --only-binary=:all: --python-version 3.12 ... -d .whl ml_collections`).
# Carried wheels whose distribution is not installed are installed (no index, no deps) into
# a folder put on PYTHONPATH. Then, each part with its own time limit, log and JSON in
# OUT_DIR, so a part that fails or runs out of time leaves the others' figures:
#   env.txt                  devices and versions
#   b16_train.json / .log    B/16 8x224 batch 64 bf16 train: ours, official eager, official
#                            compiled, side by side, plus the kernel profile of our step
#                            (attention 'auto': cuDNN here once its check passes); then ours
#                            with XLA attention and with the temporal attention as the
#                            project's Pallas kernels (temporal_pallas) (--variant rows;
#                            GPU_SH_VARIANTS others, e.g. temporal_dpa, the temporal
#                            attention through cuDNN; the Pallas attention, with and
#                            without the Pallas LayerNorms and MLP kernel, if cuDNN failed)
#   b16_eval.json / .log     the same for eval (one extra row: temporal_pallas, or pallas)
#   profile/{train,eval}/    the traces and kernels.json (every kernel, ms/step);
#   profile/VARIANT/MODE/    the same for each variant
#   cudnn_attention.json     cuDNN attention fwd+bwd at the padded even length, and what
#                            'auto' chooses here (auto_check.choice)
#   pallas_attention.json    only when cuDNN failed its check: the Pallas flash attention,
#                            'auto''s next choice, likewise, in a process of its own first
#   l14_train.json / .log    L/14 8x224 batch 32 train (scan_layers, as configs/k400.py;
#                            'auto': cuDNN, 66 GiB by benchmarks.gpu_aot); the
#                            pallas_kernels variant only if cuDNN failed
#   l14_unrolled.json / .log if the budget has time left after the parts above: L/14 with
#                            model.scan_layers=False (its compile time decides whether
#                            unrolled may be L/14's default: predicted 365.2 -> 302.6 ms)
#   temporal_kernels.json    the temporal attention's Pallas kernels against XLA's
#                            element-wise form, per tile, one layer of B/16 and of L/14
#   norm_kernels.json / .log the Pallas LayerNorm kernels against XLA's, per tile, likewise, and
#                            the device check norm_impl / mlp_impl 'auto' runs (auto_check)
#   mlp_kernels.json / .log  the fused MLP's two kernels against XLA's, per tile, likewise
#   compile_cache.json/.log  with time left: the B/16 train step traced and loaded from the
#                            compilation cache, as a restarted run does (benchmarks.compile_time)
#   summary.txt              each part's exit status and time
#   report.md, report.json   python -m benchmarks.gpu_report: the targets, met or not (and
#                            the restart figure of compile_cache.json)
# GPU_SH_PARTS=NAME,...: only those parts (e.g. a second, shorter call on a still-warm
# machine: GPU_SH_PARTS=cudnn_attention,b16_train GPU_SH_BUDGET_S=240); the others are
# skipped and say so in summary.txt. Without cudnn_attention our rows' own check decides the
# attention (as when that part runs out of time); with it but without pallas_attention, a
# failed cuDNN means XLA rows.
# --cpu-smoke: tiny model, batch 2, 2 steps, the official compiled run with the aot_eager
# backend (no C++ compile), a check that tensorflow was never imported (the GPU image has
# none), the test torchvision stub served when torchvision is missing; checks the script end
# to end.
set -u
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--cpu-smoke]}
SMOKE=0
case "${2:-}" in
  --cpu-smoke) SMOKE=1 ;;
  '') ;;
  *) echo "gpu.sh: unknown option ${2} (only --cpu-smoke)" >&2; exit 2 ;;
esac
PARTS=cudnn_attention,pallas_attention,b16_train,b16_eval,l14_train,l14_unrolled,temporal_kernels
PARTS=$PARTS,norm_kernels
PARTS=$PARTS,mlp_kernels,compile_cache
GPU_SH_PARTS=${GPU_SH_PARTS:-}
for p in ${GPU_SH_PARTS//,/ }; do
  [[ ",$PARTS," == *",$p,"* ]] || {
    echo "gpu.sh: GPU_SH_PARTS: no part named $p (the parts: $PARTS)" >&2; exit 2; }
done
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)          # before the cd below: a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
# Seconds for the whole script (parts are cut to fit) and a factor on each part's limit:
# a CPU smoke run compiles slowly, it gets more of both.
if [ "$SMOKE" = 1 ]; then SCALE=${GPU_SH_SCALE:-8}; else SCALE=${GPU_SH_SCALE:-1}; fi
BUDGET=${GPU_SH_BUDGET_S:-$(( 470 * SCALE ))}
S=$(date +%s)
el() { echo $(( $(date +%s) - S )); }
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# JAX's persistent compilation cache, for XLA's per-fusion autotuning cache that comes with
# it: the eval part's products are the train part's forward ones, tuned once. (No program is
# compiled twice, so every compile_s is still a compile; L/14's shapes are its own.)
export JAX_COMPILATION_CACHE_DIR=${GPU_SH_CACHE:-/tmp/aim_gpu_jax_cache}

# Carried wheels, only for what is missing.
SITE=${GPU_SH_SITE:-/tmp/aim_gpu_site}
for whl in .whl/*.whl; do
  [ -e "$whl" ] || continue
  dist=$(basename "$whl" | cut -d- -f1)
  if ! "$PY" -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$dist" \
      2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "$whl" || exit 1
    echo "installed $dist from $whl"
  fi
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import ml_collections' || {
  echo 'gpu.sh: ml_collections does not import (above): carry it and its dependencies in .whl/' \
    '(pip download ... -d .whl ml_collections, BENCHMARKS.md)' >&2
  exit 1; }

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=''
  CFG=configs/tiny.py; CFG_L=configs/tiny.py
  BATCH=2; BATCH_L=2; STEPS=2; BACKEND=aot_eager
  # The first attention part checks XLA here (no cuDNN; GPU_SH_ATTENTION=cudnn takes the
  # branch of a GPU whose cuDNN fails: the Pallas part then runs, interpreted).
  ATT="--implementation ${GPU_SH_ATTENTION:-xla} --batch 2 --heads 2 --head_dim 16"
  ATT_P="--implementation pallas --batch 2 --heads 2 --head_dim 16"
  # The GPU image has no tensorflow: fail if it was imported; serve torchvision's test stub.
  BENCH=("$PY" -c "import atexit, os, sys
def no_tensorflow():  # the GPU image has none: a run that imported it fails here
  if 'tensorflow' in sys.modules:
    print('gpu.sh --cpu-smoke: tensorflow was imported', file=sys.stderr, flush=True)
    os._exit(3)
atexit.register(no_tensorflow); sys.path.insert(0, 'tests')
import torchvision_stub; torchvision_stub.install()
from benchmarks import step_benchmark; step_benchmark.run(['step_benchmark'] + sys.argv[1:])")
else
  CFG=configs/k400.py:b16_f8; CFG_L=configs/k400.py:l14_f8
  BATCH=64; BATCH_L=32; STEPS=10; BACKEND=inductor
  ATT=""; ATT_P="--implementation pallas"
  BENCH=("$PY" -m benchmarks.step_benchmark)
fi
OFFICIAL=()
if [ -f .official/mmaction/models/backbones/vit_clip.py ]; then
  # Ours first (a slow torch.compile cut by the limit keeps our rows), except the rows of
  # kernels never run on a GPU before (the Pallas ones): they come after the official rows,
  # so a hang or a CUDA error that poisons the process cannot cost the side by side.
  OFFICIAL=(--official .official --official_modes eager,compiled --noofficial_first
            --official_compile_backend "$BACKEND" --after_official pallas,pallas_kernels,temporal_dpa,temporal_pallas)
else
  echo 'gpu.sh: no .official/ here: ours only (carry .official for the side by side)'
fi

{ nvidia-smi -L 2>/dev/null; echo "cpus $(nproc)"; git log -1 --format='commit %h %s' 2>/dev/null
  # The tree measured, whatever the git metadata says (a device machine's copy of a checkout
  # may carry the metadata of an older commit): a hash of every tracked file's content, the
  # same as `git ls-files -z | xargs -0 sha1sum | sha1sum` in the checkout that was sent, and
  # the files that differ from the commit above.
  echo "tree $(git ls-files -z 2>/dev/null | xargs -0 sha1sum 2>/dev/null | sha1sum | cut -c1-12)"
  git status --short --untracked-files=no 2>/dev/null | head -20 | sed 's/^/changed /'
  "$PY" -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax',
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# part NAME LIMIT_S COMMAND...: run with timeout min(LIMIT_S, what is left), output to NAME.log;
# skipped when that is under MIN_S seconds (default 20; `MIN_S=N part ...` for a part that
# cannot do anything useful in less).
part() {
  local name=$1 lim=$(( $2 * SCALE )); shift 2
  if [ -n "${GPU_SH_PARTS:-}" ] && [[ ",$GPU_SH_PARTS," != *",$name,"* ]]; then
    echo "$name: skipped (GPU_SH_PARTS)" | tee -a "$OUT/summary.txt"; return
  fi
  local left=$(( BUDGET - $(el) ))
  [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt "${MIN_S:-20}" ]; then
    echo "$name: skipped, $(el) s used of $BUDGET" | tee -a "$OUT/summary.txt"; return
  fi
  timeout --kill-after=5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc$([ $rc = 124 ] && echo " (time limit $lim s)") at $(el) s" \
    | tee -a "$OUT/summary.txt"
  local rows='impl|mode|aim_jax|official|train|eval|gemm|attention|transpose|reduction|'
  grep -E "^\| (${rows}elementwise|other|all)" "$OUT/$name.log" | head -24
}
: > "$OUT/summary.txt"
# Limits (s; 470 in all): cudnn_attention 30 (first; then pallas_attention 40 if cuDNN failed
# its check); b16_train 290 = two of our rows
# (~40 s compile each on the H200 host, plus steps and a profile), the official eager and
# compiled rows (torch.compile took 64 s in 2026-11), then the Pallas row (--after_official:
# a time limit cuts it, not the side by side); b16_eval 80 and what b16_train left
# unused: our rows first, then the official ones (a slow compiled eval is cut, ours are
# kept); L/14 70: two scanned compiles (~20 s each).
COMMON=(--config "$CFG" --batch "$BATCH" --steps "$STEPS" --profile_steps 3)
# Our rows (BENCHMARKS.md, GPU plan): the default row is model.attention_impl='auto', which
# on this GPU in bf16 is cuDNN flash attention (stream padded to 200; the temporal attention
# element-wise) once its device check passes (the log says what it chose), else XLA;
# 'xla' is the XLA program for comparison; 'pallas' the Pallas Triton kernel (stream padded
# to 224), for when cuDNN has no plan on CUDA 13. A row that fails, the default one too,
# keeps its error in its row and the part goes on (a failed default row: exit status 1).
# 'pallas_kernels' is the default row with the project's Pallas kernels: the blocks'
# LayerNorms (model.norm_impl=pallas, models/fused_norm.py) and the fused MLP's first layer
# and the hidden's gradient (model.mlp_impl=pallas, models/fused_mlp.py); predicted
# 127.9 -> 119.7 ms by gpu_aot (2026-12-03; norms alone 128.2, MLP kernels alone 125.3 before
# XLA fused its own norms); measured on 2026-12-04: 280.6 against 228.6 ms (L/14 588.7 against
# 489.2), so 'auto' keeps XLA's and these rows run only on the Pallas-attention branch. The
# kernel parts at the end (norm_kernels, mlp_kernels) time each kernel against XLA's.
# (joint_mlp=fused is bf16's 'auto'; it lets the CPU smoke's float32 row run the kernel too.)
XLA_ROW=(--variant "xla:model.attention_impl=xla")
PALLAS_ROW=(--variant "pallas:model.attention_impl=pallas")
KERNELS=model.norm_impl=pallas,model.mlp_impl=pallas,model.joint_mlp=fused
PALLAS_NORM_ROW=(--variant "pallas_kernels:model.attention_impl=pallas,$KERNELS")
# The temporal attention through cuDNN too (L folded into the heads), the companion of cuDNN
# until the first H200 run (2026-12-04: 228.6 ms per train step, 175.1 with 'elementwise'
# since): GPU_SH_VARIANTS='temporal_dpa:model.temporal_attention=dot_product_attention'
# runs it again.
# The temporal attention as the project's Pallas kernels (models/temporal_kernel.py; never
# run on a GPU before: after the official rows). Predicted by gpu_aot in BENCHMARKS.md.
TPALLAS_ROW=(--variant "temporal_pallas:model.temporal_attention=pallas")
FORCE=()
# cuDNN alone first, in its own process: if it takes the process down (no JSON), our rows
# are run with XLA attention instead of 'auto', so that their process and the official rows
# after them survive. A cuDNN that fails cleanly is 'auto''s own business: it falls back to
# the Pallas flash attention after that kernel's check (the part's JSON says what 'auto'
# chooses, `auto_check.choice`). Then that kernel, never run on a GPU before, is run the same
# way in a process of its own first, at the model's shapes: if it dies or fails there, our
# rows are XLA's.
# shellcheck disable=SC2086
part cudnn_attention 30 "$PY" -m benchmarks.attention_smoke $ATT --out "$OUT/cudnn_attention.json"
# (Out of time or left out by GPU_SH_PARTS, the part says nothing: our rows' check decides.)
UNDECIDED='^cudnn_attention: (rc=124|skipped \(GPU_SH_PARTS\))'
if [ ! -s "$OUT/cudnn_attention.json" ] && ! grep -qE "$UNDECIDED" "$OUT/summary.txt"
then
  echo "cudnn_attention died: our rows use model.attention_impl=xla" | tee -a "$OUT/summary.txt"
  FORCE=(--config.model.attention_impl=xla)
fi
# Our rows besides the default: with a fused kernel in the default row (cuDNN's check passed,
# or the Pallas kernel's and its part), the XLA row to compare, and in train the Pallas
# kernels; without, the default row is XLA and the Pallas attention rows come after the
# official ones, in train with and without the other Pallas kernels. Eval and
# L/14 get one extra row, leaving the time for the compiled official eval (never measured
# yet) and the L/14 compiles.
# (Out of time, the smoke test says nothing: the benchmark's own check decides; as if passed.)
# What the part says 'auto' chooses here (CHOICE), and AUTO: 'ok' when its kernel passed,
# else that choice ('pallas': its part runs next; 'xla').
read -r AUTO CHOICE < <("$PY" -c "import json, sys; a = json.load(open(sys.argv[1]))['auto_check']
print('ok' if a['ok'] else a['choice'], a['choice'])" "$OUT/cudnn_attention.json" 2>/dev/null \
  || echo xla 'not known')
grep -qE "$UNDECIDED" "$OUT/summary.txt" && AUTO=ok
[ ${#FORCE[@]} -gt 0 ] && AUTO=xla
if [ "$AUTO" = pallas ]; then
  # shellcheck disable=SC2086
  part pallas_attention 40 "$PY" -m benchmarks.attention_smoke $ATT_P \
    --out "$OUT/pallas_attention.json"
  if grep -q '^pallas_attention: rc=0 ' "$OUT/summary.txt"; then AUTO=ok; else
    echo "pallas_attention failed: our rows use model.attention_impl=xla" | tee -a "$OUT/summary.txt"
    FORCE=(--config.model.attention_impl=xla); AUTO=xla
  fi
fi
AUTO_OK=0; [ "$AUTO" = ok ] && AUTO_OK=1
if [ "$AUTO_OK" = 1 ]; then
  # (The Pallas LayerNorm and MLP kernels' row went with the 2026-12-04 run: 280.6 ms against
  # 228.6 for B/16 train, 588.7 against 489.2 for L/14; their kernel parts stay.)
  VARIANTS=("${XLA_ROW[@]}" "${TPALLAS_ROW[@]}"); ONE_MORE=("${TPALLAS_ROW[@]}")
  L14_MORE=()
else
  VARIANTS=("${PALLAS_ROW[@]}" "${PALLAS_NORM_ROW[@]}"); ONE_MORE=("${PALLAS_ROW[@]}")
  L14_MORE=("${PALLAS_NORM_ROW[@]}")
fi
# GPU_SH_VARIANTS='NAME:FIELD=VALUE,...;NAME:...': the B/16 parts' extra rows instead (a
# shorter second call: GPU_SH_VARIANTS='temporal_dpa:model.temporal_attention=dot_product_attention').
if [ -n "${GPU_SH_VARIANTS+x}" ]; then
  VARIANTS=(); IFS=';' read -ra _vs <<< "$GPU_SH_VARIANTS"
  for v in "${_vs[@]}"; do [ -n "$v" ] && VARIANTS+=(--variant "$v"); done
  ONE_MORE=("${VARIANTS[@]}")
fi
echo "'auto' here: $CHOICE; our default row: $([ ${#FORCE[@]} -gt 0 ] && echo 'xla (forced)' \
  || echo "'auto'"); extra rows: ${VARIANTS[*]}" | tee -a "$OUT/summary.txt"
part b16_train 290 "${BENCH[@]}" "${COMMON[@]}" "${FORCE[@]}" --mode train "${OFFICIAL[@]}" \
  "${VARIANTS[@]}" --profile "$OUT/profile" --out "$OUT/b16_train.json"
# The eval part may also take what the train part left unused (its 80 s is a floor), keeping
# L/14's 70 s: the compiled official eval has never finished in time (2026-11-30: not within
# the 60 s its script had left after the compiled train step), and it is the eval target's
# measure, so here the extra row, XLA's too, comes after the official rows: the default row,
# official eager, official compiled, then the extra row.
EVAL_LATE=(); [ ${#OFFICIAL[@]} -gt 0 ] && EVAL_LATE=(--after_official pallas,pallas_kernels,xla,temporal_dpa,temporal_pallas)
EVAL_S=$(( (BUDGET - $(el)) / SCALE - 70 )); [ "$EVAL_S" -lt 80 ] && EVAL_S=80
part b16_eval "$EVAL_S" "${BENCH[@]}" "${COMMON[@]}" "${FORCE[@]}" --mode eval "${OFFICIAL[@]}" \
  "${EVAL_LATE[@]}" "${ONE_MORE[@]}" --profile "$OUT/profile" --out "$OUT/b16_eval.json"
# L/14 has no extra row with cuDNN (scanned, 489.2 ms measured on 2026-12-04; its Pallas-kernels
# row, 588.7 ms, settled that 'auto' keeps XLA's norms); on the Pallas-attention branch, the
# Pallas kernels' row. (Its XLA-attention row, 624 ms predicted, says nothing the B/16 rows do
# not.) An XLA-attention default row (cuDNN failed) needs 97 GiB:
# more than JAX's default 75% of the H200.
part l14_train 70 env XLA_PYTHON_CLIENT_MEM_FRACTION=.92 "${BENCH[@]}" --config "$CFG_L" \
  --batch "$BATCH_L" --steps 5 --warmup 1 --mode train "${L14_MORE[@]}" "${FORCE[@]}" \
  --out "$OUT/l14_train.json"
# With time left over (the parts' limits are bounds, not estimates; each part is skipped when
# under 20 s remain): L/14 unrolled, the default row with model.scan_layers=False (gpu_aot:
# 365.2 -> 302.6 ms with the rates of 2026-12-04, 58-72 s to compile on a 2-core CPU host
# without autotuning, 15.3 s measured for the scanned step on the H200's host; the step logs
# its compile time as soon as it has it, so a cut run still tells it). Only with a minute
# left: less cannot compile it, and the kernel parts below can use that time.
MIN_S=$(( 60 * SCALE )) part l14_unrolled 90 env XLA_PYTHON_CLIENT_MEM_FRACTION=.92 \
  "${BENCH[@]}" --config "$CFG_L" --config.model.scan_layers=False --batch "$BATCH_L" \
  --steps 5 --warmup 1 --mode train "${FORCE[@]}" --out "$OUT/l14_unrolled.json"
NK=(); [ "$SMOKE" = 1 ] && NK=(--cpu-smoke)
# Then the temporal attention's Pallas kernels against XLA's element-wise form, per tile
# (benchmarks/temporal_kernels.py): the tile for temporal_kernel.BLOCK / NUM_WARPS.
part temporal_kernels 40 "$PY" -m benchmarks.temporal_kernels "${NK[@]}" \
  --out "$OUT/temporal_kernels.json"
# Then the Pallas LayerNorm kernels against XLA's, per tile (benchmarks/norm_kernels.py), and
# the device check norm_impl / mlp_impl 'auto' runs before taking the Pallas kernels (written
# after the timings: a time limit in the check keeps them).
part norm_kernels 50 "$PY" -m benchmarks.norm_kernels "${NK[@]}" --out "$OUT/norm_kernels.json"
# Then the fused MLP's kernels against XLA's GEMMs and element-wise kernels, per tile
# (benchmarks/mlp_kernels.py).
part mlp_kernels 40 "$PY" -m benchmarks.mlp_kernels "${NK[@]}" --out "$OUT/mlp_kernels.json"
# Last, with half a minute left: what a restart of the B/16 train step costs with the
# compilation cache the parts above filled (config.compilation_cache_dir,
# aim_jax/compile_cache.py): tracing and loading instead of the b16_train part's compile_s,
# in two fresh processes (both rows are loads: b16_train stored the program).
MIN_S=$(( 30 * SCALE )) part compile_cache 45 "$PY" -m benchmarks.compile_time --config "$CFG" \
  --batch "$BATCH" --mode train "${FORCE[@]}" --cache_dir "$JAX_COMPILATION_CACHE_DIR" \
  --out "$OUT/compile_cache.json"
echo "done at $(el) s" | tee -a "$OUT/summary.txt"
# The figures against the issue's targets (met / missed / not measured), also as JSON, with
# the step times benchmarks.gpu_aot predicted for the same programs beside our rows (compiled
# on a CPU host with XLA's default GEMM tiles; BENCHMARKS.md, "GPU compile without a GPU").
PRED=()
# (The default program's predictions since its temporal attention went element-wise:
# 2026-12-04; the Pallas-attention fallback's from 2026-12-03.)
for f in 2026-12-04-aot-h200/gpu_sh_b16 2026-12-03-aot-h200/b16_pallas_fallback \
         2026-12-04-aot-h200/gpu_sh_l14 2026-12-03-aot-h200/gpu_sh_l14_pallas; do
  f=benchmarks/results/$f.json; [ -f "$f" ] && PRED+=(--predicted "$f")
done
"$PY" -m benchmarks.gpu_report "$OUT" --json "$OUT/report.json" "${PRED[@]}" > "$OUT/report.md" 2>&1
cat "$OUT/report.md"
! grep -qE 'rc=[1-9]' "$OUT/summary.txt"
