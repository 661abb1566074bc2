#!/usr/bin/env bash
# The prepared GPU check (issue 22): EXACT's throughput on one accelerator, in at most 4 minutes.
#
# For a machine without network access whose Python already holds jax/jaxlib with the CUDA plugin,
# flax, optax, chex, pandas and pyarrow. Beforehand, on a machine with the package index:
#   bash benchmarks/gpu_wheels.sh            # the few small wheels that Python lacks -> build/gpu_wheels
# then copy the working tree and build/gpu_wheels (well under 64 MiB) and run, with a timeout of
# about 300 s:
#   bash benchmarks/gpu_check.sh [WHEEL_DIR] [OUT_DIR]
# It installs splitjax with `pip install --no-deps -e .` (falling back on PYTHONPATH=. when the
# offline build backend is missing), generates every input on the accelerator (random DeepFM
# parameters, users and their gradients: no CSV), runs benchmarks.targets (float32 at highest
# precision, the bf16 screen, answers against the host CPU's float32 ones and against the default
# TF32 precision) and benchmarks.scaling (float32 at highest precision, then the bf16 screen),
# and prints one summary. Figures go to OUT_DIR ($OUT when set, else build/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-build/gpu_wheels}
out=${2:-${OUT:-build/gpu_check}}
mkdir -p "$out"
start=$SECONDS
log() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

if ! python -c 'import dp_accounting' 2> /dev/null; then
  if compgen -G "$wheels/*.whl" > /dev/null; then
    pip install -q --no-deps --no-index "$wheels"/*.whl || log "installing $wheels failed"
  else
    log "dp_accounting is missing and $wheels has no wheels: run benchmarks/gpu_wheels.sh first"
  fi
fi
if pip install -q --no-deps --no-build-isolation -e . > "$out/pip.txt" 2>&1; then
  log "splitjax installed (--no-deps -e .)"
else
  log "pip install --no-deps -e . failed (tail of $out/pip.txt below); using PYTHONPATH=."
  tail -3 "$out/pip.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# GPU_CHECK_SMALL=1: a dry run of this script on a CPU (sizes cut ~100x; the figures mean nothing).
if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  users=512 scale_users=1000,2000 domain_users=1000 mat=1024
else
  users=65536 scale_users=100000,1000000 domain_users=100000 mat=8192
fi
python - << 'PY' | tee "$out/devices.txt"
import jax, jaxlib
d = jax.devices()[0]
print(f'jax {jax.__version__}, jaxlib {jaxlib.__version__}: {jax.device_count()} x {d.device_kind} '
      f'({d.platform})')
if d.platform == 'cpu':
  print('WARNING: no accelerator visible to jax: the figures below are the CPU\'s')
PY

log "targets: $users adult-shaped users x 840 pairs, float32 (highest) and the bf16 screen"
timeout 120 python -m benchmarks.targets --users="$users" --rounds=5 --torch=no --matmul_n="$mat" \
  --compare_cpu_users=256 --json="$out/targets.json" > "$out/targets.txt" 2>&1
rc_targets=$?
log "targets exit $rc_targets"
grep -v '^[IW][0-9]\{4\} ' "$out/targets.txt" | tail -22

log "scaling: users and domains, float32 at highest precision"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 python -m benchmarks.scaling \
  --users="$scale_users" --domains=bank,large --domain_users="$domain_users" \
  --out="$out/scaling_f32.json" > "$out/scaling_f32.txt" 2>&1
rc_f32=$?
log "scaling float32 exit $rc_f32"
grep -v '^[IW][0-9]\{4\} ' "$out/scaling_f32.txt" | tail -6

log "scaling: the bf16 screen"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 45 python -m benchmarks.scaling \
  --users="${scale_users##*,}" --domains=large --domain_users="$domain_users" \
  --screen_dtype=bfloat16 \
  --out="$out/scaling_bf16.json" > "$out/scaling_bf16.txt" 2>&1
rc_bf16=$?
log "scaling bf16 exit $rc_bf16"
grep -v '^[IW][0-9]\{4\} ' "$out/scaling_bf16.txt" | tail -4

echo "== summary (goal: >= 1e8 candidate gradients per second on one H200)"
python - "$out" << 'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
best = 0.0
t = out / 'targets.json'
if t.exists():
  r = json.loads(t.read_text())
  for name, row in r['rows'].items():
    g = row.get('candidate_gradients_per_second', 0.0)
    best = max(best, g)
    print(f"targets {name}: {row['median_seconds']:.4f} s median, {g:.3g} grad/s, "
          f"{100 * row.get('fraction_of_f32_roofline', 0):.1f} % f32 / "
          f"{100 * row.get('fraction_of_bf16_roofline', 0):.1f} % bf16 roofline, "
          f"first call {row['first_call_seconds']:.1f} s")
  print('rates: f32 %.1f TFLOP/s, bf16 %.1f TFLOP/s' % (
      max(r['rates_before']['f32'], r['rates_after']['f32']) / 1e12,
      max(r['rates_before']['bf16'], r['rates_after']['bf16']) / 1e12))
  for head, c in (r.get('cpu_check') or {}).items():
    print(f'{head}: equal to CPU float32 on {c["users"]} users: f32 {c["f32_highest_equal_cpu"]:.4f}, '
          f'bf16 screen {c["bf16_screen_equal_cpu"]:.4f}, default precision '
          f'{c["default_precision_equal_cpu"]:.4f}')
for name in ('scaling_f32.json', 'scaling_bf16.json'):
  p = out / name
  if p.exists():
    for row in json.loads(p.read_text()):
      best = max(best, row['candidate_gradients_per_second'])
      print(f"{name[:-5]} {row['domain']} {row['users']} users: {row['seconds']:.3f} s, "
            f"{row['candidate_gradients_per_second']:.3g} grad/s, recovered {row['recovered']:.4f}")
print(f'best: {best:.3g} candidate gradients per second ({"meets" if best >= 1e8 else "below"} 1e8)')
PY
log "done"
[ "$rc_targets" -eq 0 ] && [ "$rc_f32" -eq 0 ] && [ "$rc_bf16" -eq 0 ]
