#!/usr/bin/env bash
# Run a command as if on a machine N times slower: in a cgroup whose CPU quota is (cores / N) of this machine's
# cores (cgroup v1 `cpu` or v2 `cpu.max`; needs root). The test suite must stay under 20 minutes on a 2-core box
# ~1.7x slower than the ones it is written on (issue 19); this measures that here:
#
#   bench/slower_cpu.sh 1.7 env CI=1 OWNLLM_TEST_HOME=/tmp/cold-home .venv/bin/python -m pytest \
#       -n 2 --dist loadfile --no-loadscope-reorder -q --durations=30
#
# A quota is not a slower core: the cores run at full speed in bursts and stop for the rest of each 100 ms
# period, so waits on I/O and on other processes count as on this machine. A 1024x1024 fp32 matmul loop ran
# 1.76x longer under `1.7` here.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 FACTOR COMMAND [ARGS...]" >&2
  exit 2
fi
factor=$1
shift
if ! python3 -c "import sys; f = float(sys.argv[1]); sys.exit(0 if 1 <= f <= 100 else 1)" "$factor" 2>/dev/null; then
  echo "error: FACTOR must be a number from 1 to 100 (how many times slower), not '$factor'" >&2
  exit 2
fi
cores=$(nproc)
period=100000
quota=$(python3 -c "import sys; print(int(int(sys.argv[1]) * int(sys.argv[2]) / float(sys.argv[3])))" \
  "$cores" "$period" "$factor")
name="ownllm-slower-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  parent=/sys/fs/cgroup
else
  parent=/sys/fs/cgroup/cpu
fi
if [ ! -w "$parent" ]; then
  echo "error: cannot create a cgroup under $parent (run as root, with the cpu controller mounted)" >&2
  exit 2
fi
if [ "$parent" = /sys/fs/cgroup ]; then  # cgroup v2
  group=/sys/fs/cgroup/$name
  mkdir "$group"
  echo "$quota $period" > "$group/cpu.max"
else  # cgroup v1
  group=$parent/$name
  mkdir "$group"
  echo "$period" > "$group/cpu.cfs_period_us"
  echo "$quota" > "$group/cpu.cfs_quota_us"
fi
cleanup() {
  # the processes leave the group with this shell; an empty group can go
  echo $$ > "$(dirname "$group")/cgroup.procs" 2>/dev/null || true
  rmdir "$group" 2>/dev/null || true
}
trap cleanup EXIT
echo "$cores cores, quota $quota us per $period us (${factor}x slower), cgroup $group" >&2
echo $$ > "$group/cgroup.procs"
start=$(date +%s)
status=0
"$@" || status=$?
echo "wall: $(( $(date +%s) - start )) s under ${factor}x, exit $status" >&2
exit $status
