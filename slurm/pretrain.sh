#!/usr/bin/env bash
# BiMAC pretraining under SLURM: `sbatch slurm/pretrain.sh`, one task per GPU via srun.
# Outside SLURM, `bash slurm/pretrain.sh` runs locally: torchrun with NPROC processes
# (on a CPU machine 2 processes, DeepSpeed's CPU accelerator, gloo).
# DRY_RUN=1 prints the launch command instead of running it.
#
# Arguments (also through sbatch): [CONFIG.yaml] [key=value ...], the same as the variables
# CONFIG and OVERRIDES (arguments come after OVERRIDES, so they win).
# Environment: CONFIG (experiment YAML), OVERRIDES (extra key=value, space separated),
# RUN_DIR (train.output_dir, default: the config's), PYTHON (default: .venv/bin/python when it
# exists, else python), NPROC (local runs), MASTER_PORT.
#SBATCH --job-name=bimac-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ $# -gt 0 && "$1" == *.yaml ]]; then
    CONFIG=$1
    shift
fi
for arg in "$@"; do
    if [[ "$arg" != *=* ]]; then
        echo "slurm/pretrain.sh: error: argument '$arg' is neither the config YAML (first) nor key=value; usage: bash slurm/pretrain.sh [CONFIG.yaml] [key=value ...]" >&2
        exit 2
    fi
done
CONFIG=${CONFIG:-configs/pretrain/paper.yaml}
# the project's virtual environment (`make demo` / `make setup` create it) when there is one
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
fi
PYTHON=${PYTHON:-python}
OVERRIDES=${OVERRIDES:-}
ARGS=(-m pretrain --config "$CONFIG")
if [[ -n "${RUN_DIR:-}" ]]; then
    ARGS+=("train.output_dir=$RUN_DIR")
fi
if [[ -n "$OVERRIDES" ]]; then
    read -r -a EXTRA <<<"$OVERRIDES"
    ARGS+=("${EXTRA[@]}")
fi
ARGS+=("$@")

# The config, shards and tokenizer are checked once here, before any rank starts: a mistake is
# one line and exit status 2, not one traceback per rank plus the launcher's report.
preflight() {
    if [[ "${DRY_RUN:-0}" != 1 ]]; then
        "$PYTHON" "${ARGS[@]}" --check --world-size "$1" >/dev/null
    fi
}

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        if [[ -n "${MASTER_ADDR:-}" ]]; then
            printf 'MASTER_ADDR=%q MASTER_PORT=%q ' "$MASTER_ADDR" "$MASTER_PORT"
        fi
        printf '%q ' "$@"
        printf '\n'
    else
        exec "$@"
    fi
}

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    NODES=${SLURM_JOB_NUM_NODES:?}
    GPUS=${SLURM_GPUS_ON_NODE:-8}
    if command -v scontrol >/dev/null 2>&1; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
        MASTER_ADDR=$("$PYTHON" -c 'from bimac.engine.distributed import master_host
print(master_host())')
    fi
    # a port per job, so two jobs sharing a node do not collide
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export MASTER_ADDR MASTER_PORT
    # each srun task maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK
    # (bimac.engine.distributed; MASTER_ADDR/PORT are exported above and srun passes the
    # environment on); USR1 reaches every task, rank 0 requeues after the save.
    preflight $((NODES * GPUS))
    run srun --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-10}" --kill-on-bad-exit=1 \
        "$PYTHON" -u "${ARGS[@]}"
else
    if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        NPROC=${NPROC:-2}
    fi
    NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
    preflight "$NPROC"
    run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${ARGS[@]}"
fi
