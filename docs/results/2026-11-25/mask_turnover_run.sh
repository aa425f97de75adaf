#!/usr/bin/env bash
# Reruns of results-v2 runs with mask_turnover logged; same command lines as runs/results-v2/<run>/command.txt.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
run() {  # $1 = config, $2 = seed
  cmd=$(cat runs/results-v2/$1/seed$2/command.txt | sed "s#--output-dir runs/results-v2/$1/seed$2#--output-dir runs/turnover/$1-seed$2#")
  echo "[$(date +%T)] start $1 seed$2"; TQDM_MININTERVAL=10 bash -c "$cmd" > runs/turnover/$1-seed$2.log 2>&1; echo "[$(date +%T)] done $1 seed$2 rc=$?"
}
run movement-90 0 & run movement-97 0 & wait
run movement-97 1 & run capm-97 1 & wait
