#!/usr/bin/env bash
# The paper's tables/1_routing_granularity.sh: runs `mtlora repro table3` (both setups: Flan-v2 -> BBH and Dolly-15k -> MMLU).
# Extra arguments are passed through, e.g. --dry-run, --smoke, --num_gpus 2, --model_name_or_path DIR.
set -euo pipefail
exec mtlora repro table3 "$@"
