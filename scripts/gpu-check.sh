#!/usr/bin/env bash
# GPU acceptance run of omotool (issue 15, item 7): one command on a machine with one CUDA GPU
# and no network. See docs/gpu.md.
#
#   bash scripts/gpu-check.sh                  # the whole run (budget: under 8 minutes on an H200)
#   bash scripts/gpu-check.sh --dry-run        # print the steps' commands, run nothing (any machine)
#   bash scripts/gpu-check.sh --wheels DIR     # first install the wheels in DIR (--no-index --no-deps)
#   bash scripts/gpu-check.sh --no-install     # use the checkout through PYTHONPATH, install nothing
#
# Environment: PYTHON (the interpreter that holds torch; default python3), GPU_CHECK_BUDGET_S
# (seconds for all steps together; default 460), GPU_CHECK_WORK (scratch folder; default a new
# one under /tmp), OUT (if set: gpu-check.md, the bench JSONs and the step logs are written there).
#
# Each step runs under `timeout`, is timed, and a failure is marked FAIL (with the last line of
# its log) without stopping the run. The end is ONE table: step, status, seconds, key figure.
# Exit status: 0 if every step passed, 1 if one did not, 2 if there is no CUDA device (or no torch).
set -u

DRY_RUN=0
INSTALL=1
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --no-install) INSTALL=0 ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
PREFS="recipes/data/tiny-prefs.jsonl"
STARTED=$(date +%s)

# -- CUDA first: nothing else is worth doing without it ---------------------------------------
if [ "$DRY_RUN" = 0 ]; then
    if ! probe=$("$PY" -c 'import torch, sys
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
sys.exit(0 if torch.cuda.is_available() else 3)' 2>&1); then
        echo "gpu-check: no CUDA device: this script needs one CUDA GPU visible to $PY's torch" >&2
        echo "gpu-check: ($(printf '%s\n' "$probe" | tail -n 1)); nothing was run." >&2
        echo "gpu-check: 'bash scripts/gpu-check.sh --dry-run' prints the steps." >&2
        exit 2
    fi
    echo "gpu-check: $probe"
fi

WORK="${GPU_CHECK_WORK:-}"
if [ -z "$WORK" ]; then
    if [ "$DRY_RUN" = 1 ]; then WORK=/tmp/omotool-gpu-check; else WORK=$(mktemp -d /tmp/omotool-gpu-check.XXXXXX); fi
fi
[ "$DRY_RUN" = 1 ] || mkdir -p "$WORK/logs"
TINY="$WORK/tiny"

ROWS=()      # "step|status|seconds|figure"
FAILED=0

# figure_of KIND LOG STDOUT: the key figure of a passed step (python, never fails the step)
figure_of() {
    "$PY" - "$@" <<'PYEOF' 2>/dev/null || echo "-"
import json, re, sys
kind, log, out = sys.argv[1], sys.argv[2], sys.argv[3]
def data():
    text = open(out).read()
    return json.loads(text[text.index("{"): text.rindex("}") + 1])
if kind == "pytest":
    lines = [l for l in open(log).read().splitlines() if re.search(r"passed|failed|skipped|error|deselected", l)]
    print(lines[-1].strip("= ") if lines else "-")
elif kind == "bench":
    r = data(); m = r["methods"]; base = m["adamw-fused"]["median_ms"]
    parts = [f"fused AdamW {base:.2f} ms"]
    parts += [f"{k} {v['ratio_vs_fused']:.2f}x" for k, v in m.items() if k != "adamw-fused"]
    parts.append(f"peak {r['cuda']['peak_allocated_bytes'] / 2**30:.1f} GiB")
    print(", ".join(parts))
elif kind == "train":
    r = data(); loss = {k: v for k, v in r["metrics"].items() if "loss" in k or k == "reward"}
    print(f"{r['steps']} steps; " + ", ".join(f"{k} {v:.4g}" for k, v in loss.items()))
elif kind == "eval":
    r = data(); tasks = r["models"][0]["tasks"]
    scores = [f"{n} {k} {s['value']:.3g}" for n, t in tasks.items() for k, s in list(t["scores"].items())[:1]]
    print(f"{r['device']} {r.get('device_name', '')} {r['dtype']}: " + "; ".join(scores))
elif kind == "fail":  # the last telling line of a failed step, before torchrun's trailer
    lines = open(log, errors="replace").read().splitlines()
    cut = [i for i, l in enumerate(lines) if "torch.distributed.elastic" in l or "ChildFailedError" in l]
    lines = lines[: cut[0]] if cut and cut[0] > 0 else lines
    told = [l.strip() for l in lines if re.search(r"[A-Za-z0-9]", l)]
    errors = [l for l in told if re.search(r"\w(Error|Exception)\b|^(\[rank\d+\]: )?[Ee]rror\b", l)]
    print((errors or told or ["-"])[-1][:160])
else:  # the last line of the output with a letter or digit in it
    print([l.strip() for l in open(out).read().splitlines() if re.search(r"[A-Za-z0-9]", l)][-1][:120])
PYEOF
}

# step NAME TIMEOUT_S KIND COMMAND...: run COMMAND (stdout to NAME.out, both to NAME.log)
step() {
    local name="$1" limit="$2" kind="$3"; shift 3
    if [ "$DRY_RUN" = 1 ]; then
        if [ "$limit" = - ]; then limit="no timeout"; else limit="timeout ${limit}s"; fi
        printf '[%s] (%s) %s\n' "$name" "$limit" "$*"
        ROWS+=("$name|DRY|-|-")
        return 0
    fi
    local left=$((BUDGET_S - ($(date +%s) - STARTED)))
    if [ "$left" -lt 15 ]; then
        ROWS+=("$name|SKIP|0|budget of ${BUDGET_S}s spent")
        FAILED=1
        return 1
    fi
    [ "$limit" = - ] || [ "$limit" -le "$left" ] || limit=$left
    local log="$WORK/logs/$name.log" out="$WORK/logs/$name.out"
    echo "== $name ($([ "$limit" = - ] && echo "no timeout" || echo "timeout ${limit}s")): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    if declare -F "$1" >/dev/null; then
        "$@" >"$out" 2>"$log.err" # a function of this script (install, deps): no hang, no timeout
    else
        timeout -k 10 "$limit" "$@" >"$out" 2>"$log.err"
    fi
    rc=$?
    t1=$(date +%s.%N)
    cat "$out" "$log.err" >"$log"
    rm -f "$log.err"
    local secs figure status
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" = 0 ]; then
        status=PASS
        figure=$(figure_of "$kind" "$log" "$out")
    else
        FAILED=1
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=TIMEOUT; else status="FAIL($rc)"; fi
        figure=$(figure_of fail "$log" "$out")
    fi
    figure=${figure//|/\\|}
    echo "   $status in ${secs}s: $figure"
    ROWS+=("$name|$status|$secs|$figure")
    [ "$rc" = 0 ]
}

# -- install omotool from the checkout, torch untouched ----------------------------------------
install_omotool() {
    local before after
    before=$("$PY" -c 'import torch; print(torch.__version__, torch.__file__)')
    if [ -n "$WHEELS" ]; then
        if ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
            echo "gpu-check: $WHEELS holds a torch wheel: refused (the machine's torch stays)" >&2
            return 1
        fi
        "$PY" -m pip install --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl || return 1
    fi
    if [ "$INSTALL" = 1 ]; then
        "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e . || {
            echo "pip install -e . failed: using the checkout through PYTHONPATH" >&2
            export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        }
    else
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
    after=$("$PY" -c 'import torch; print(torch.__version__, torch.__file__)')
    [ "$before" = "$after" ] || { echo "torch changed: $before -> $after" >&2; return 1; }
    "$PY" -c 'import omotool; print("omotool", omotool.__version__, "from", omotool.__file__, "; torch unchanged")'
}

# Every distribution omotool needs (its requirements, then theirs): those missing or of a version
# outside a requirement's range.
check_deps() {
    "$PY" - <<'PYEOF'
import importlib.metadata as md, re, sys
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:  # Python 3.10
    block = re.search(r"^dependencies = \[(.*?)^\]", open("pyproject.toml").read(), re.S | re.M)
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
def parse(spec, by):
    if Requirement is None:
        if "extra ==" in spec:
            return None
        return re.split(r"[ ;<>=!~\[(]", spec.strip(), maxsplit=1)[0], None, by
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return req.name, req.specifier, by
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
todo = [parse(s, "omotool") for s in deps]
seen, missing, conflicts, found = set(), set(), [], []
while todo:
    item = todo.pop()
    if item is None:
        continue
    name, specifier, by = item
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        missing.add(norm(name))
        continue
    if specifier is not None and not specifier.contains(dist.version, prereleases=True):
        conflicts.append(f"{name} {dist.version} (needs {specifier}, for {by})")
    if norm(name) in seen:
        continue
    seen.add(norm(name))
    found.append(f"{name} {dist.version}")
    todo += [parse(r, name) for r in dist.requires or []]
print(f"{len(found)} distributions found: " + ", ".join(sorted(found)))
for conflict in conflicts:
    print(f"VERSION CONFLICT: {conflict}")
if missing:
    print("MISSING (bring them as wheels, see docs/gpu.md; --wheels DIR installs them): "
          + " ".join(sorted(missing)))
if missing or conflicts:
    sys.exit(1)
print("all of omotool's runtime requirements are installed, in range")
PYEOF
}

OMOTOOL=("$PY" -m omotool)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 1 -m omotool)
BENCH=("$PY" bench/bench_optim.py --device cuda --shapes qwen2.5-1.5b --steps 3 --rounds 3
    --warmup 2 --json)
TRAIN=(train --model "$TINY/sft" --dataset "$PREFS" --beta 0.1 --lr 1e-3 --max-steps 4
    --batch-size 8 --max-length 64 --save-steps 1000 --overwrite --json)

if [ "$DRY_RUN" = 1 ]; then
    step install - plain "$PY -m pip install --no-index --no-deps --no-build-isolation -e ." \
        "(torch's version and path checked unchanged; PYTHONPATH=$REPO if pip fails)"
    step deps - plain "check that every distribution omotool needs (pyproject.toml, recursively) is installed"
else
    step install - plain install_omotool
    step deps - plain check_deps
fi
step cuda-tests 200 pytest "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
# The triton backend's tests, compiled for the GPU (here they run under the interpreter).
step triton-tests 150 pytest "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/optim/test_triton_backend.py
step bench-float32 150 bench "${BENCH[@]}" --dtype float32 \
    --methods adamw-fused,ondare,onties,ondare-triton,onties-triton
[ -s "$WORK/logs/bench-float32.out" ] && cp "$WORK/logs/bench-float32.out" "$WORK/bench-float32.json"
step bench-bfloat16 150 bench "${BENCH[@]}" --dtype bfloat16 \
    --methods adamw-fused,adamw-fused-bf16,ondare,onties,ondare-triton,onties-triton
[ -s "$WORK/logs/bench-bfloat16.out" ] && cp "$WORK/logs/bench-bfloat16.out" "$WORK/bench-bfloat16.json"
step tiny-models 60 plain "$PY" scripts/make_tiny_models.py "$TINY"
step tiny-delta 60 plain "${OMOTOOL[@]}" delta "$TINY/base" "$TINY/sft" -o "$TINY/tau" --overwrite
for merge in none dare ties; do
    tau=(--task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4)
    [ "$merge" = none ] && tau=() # omotool refuses merge options with --merge none
    step "train-ddp-$merge" 90 train "${TORCHRUN[@]}" "${TRAIN[@]}" --merge "$merge" "${tau[@]}" \
        --out "$WORK/dpo-ddp-$merge"
done
for merge in none dare ties; do
    tau=(--task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4)
    [ "$merge" = none ] && tau=() # omotool refuses merge options with --merge none
    step "train-fsdp-$merge" 90 train "${TORCHRUN[@]}" "${TRAIN[@]}" --merge "$merge" "${tau[@]}" \
        --fsdp --out "$WORK/dpo-fsdp-$merge"
done
step train-fsdp-ties-triton 90 train "${TORCHRUN[@]}" "${TRAIN[@]}" --merge ties \
    --task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4 --fsdp --optimizer-backend triton \
    --out "$WORK/dpo-fsdp-ties-triton"
# Online RL on the GPU: GRPO samples completions there and learns from a rule reward, OnTIES.
step train-grpo-ties 90 train "${TORCHRUN[@]}" train --algo grpo --merge ties \
    --model "$TINY/sft" --task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4 \
    --dataset recipes/data/tiny-prompts.jsonl --reward last_number --num-generations 4 \
    --batch-size 8 --max-completion-length 16 --lr 1e-3 --max-steps 4 --save-steps 1000 \
    --overwrite --json --out "$WORK/grpo-ties"
step eval-cuda 90 eval "${OMOTOOL[@]}" eval "$TINY/sft" --task preference --data "$PREFS" \
    --ref-model "$TINY/base" --device cuda --json
# DeepSpeed ZeRO-2 and ZeRO-3 (the deepspeed wheel, see docs/gpu.md). With one GPU they run at
# world size 1 and shard nothing: they check the wiring only (DeepSpeed on CUDA with NCCL, the
# flat partitions' runs handed to the optimizer, the final model saved); the sharded merge itself
# is tested on CPU processes (tests/integration/test_zero_merging.py).
step train-zero2-ties 120 train "${TORCHRUN[@]}" "${TRAIN[@]}" --merge ties \
    --task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4 --deepspeed zero2 \
    --out "$WORK/dpo-zero2-ties"
step train-zero3-dare 120 train "${TORCHRUN[@]}" "${TRAIN[@]}" --merge dare \
    --task-vector "$TINY/tau" --reserve-p 0.1 --alpha 1e-4 --deepspeed zero3 \
    --out "$WORK/dpo-zero3-dare"
# Last, so that it never takes the budget of the checks above. As training steps: the Trainer hands each step the gradients' norm (note_grad_norm), which
# replaces the optimizer's own NaN/inf read of the gradients (finite-check: what that read costs).
step bench-given-norm 150 bench "${BENCH[@]}" --dtype float32 --methods \
    adamw-fused,ondare-given-norm,onties-given-norm,ondare-triton-given-norm,onties-triton-given-norm,finite-check
[ -s "$WORK/logs/bench-given-norm.out" ] && cp "$WORK/logs/bench-given-norm.out" "$WORK/bench-given-norm.json"

# -- the table ---------------------------------------------------------------------------------
table() {
    local gpu
    gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>/dev/null || echo "none (torch.cuda.get_device_name failed)")
    echo "# omotool gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "GPU: $gpu | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
    echo
    echo "| step | status | seconds | key figure |"
    echo "| --- | --- | ---: | --- |"
    local row
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name status secs figure <<<"${row//\\|/$'\x1f'}"
        echo "| $name | $status | $secs | ${figure//$'\x1f'/\\|} |"
    done
}

echo
if [ "$DRY_RUN" = 1 ]; then
    table
    exit 0
fi
table | tee "$WORK/gpu-check.md"
if [ "$DRY_RUN" = 0 ]; then
    echo
    echo "gpu-check: logs in $WORK/logs; total $(($(date +%s) - STARTED)) s"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp "$WORK/gpu-check.md" "$OUT/gpu-check.md"
        cp "$WORK"/bench-*.json "$OUT/" 2>/dev/null
        for f in "$WORK"/logs/*.log; do
            printf '\n===== %s =====\n' "$(basename "$f")"
            cat "$f"
        done >"$OUT/gpu-check-logs.txt"
    fi
fi
exit "$FAILED"
