#!/usr/bin/env bash
# Measures the stack high-water mark of the device-stack binaries: links them for QEMU's
# netduinoplus2 (STM32F405, 128 KiB RAM; qemu-f405.x), runs each for a few seconds (thousands
# of rounds of its loop), dumps the RAM through the QEMU monitor and finds the deepest word
# that is no longer the 0xCCCCCCCC cortex-m-rt painted the stack with at reset
# (`paint-stack`). Needs qemu-system-arm (Debian: apt-get install qemu-system-arm) and
# python3. CI runs it: it fails if device-stack's static RAM plus its stack's high-water mark
# exceed the device stack's RAM budget (8 KiB, docs/firmware.md). Usage:
# bash firmware/stack.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-5}
command -v qemu-system-arm >/dev/null || { echo "needs qemu-system-arm" >&2; exit 1; }
# The same target directory as size.sh: the memory layout only changes the link (build.rs
# re-runs on FLEETBEAT_MEMORY_X), so the dependencies are reused instead of built a second
# time. The ELFs left in target/ are then QEMU's until the next size.sh.
FLEETBEAT_MEMORY_X=qemu-f405.x cargo build --release --locked \
  --bin device-stack --bin device-stack-gps
tools="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
RAM_BUDGET=8192
failed=0
for bin in device-stack device-stack-gps; do
  elf="target/thumbv7em-none-eabihf/release/$bin"
  stack_end=$("$tools/llvm-nm" "$elf" | awk '$3 == "_stack_end" { print $1 }')
  stack_start=$("$tools/llvm-nm" "$elf" | awk '$3 == "_stack_start" { print $1 }')
  mark=$(python3 - "$elf" "$secs" "$stack_end" "$stack_start" "$bin" <<'PY'
import os, socket, subprocess, sys, tempfile, time
elf, secs, end, start, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3], 16), int(sys.argv[4], 16), sys.argv[5]
tmp = tempfile.mkdtemp()
sock, dump = os.path.join(tmp, "monitor"), os.path.join(tmp, "ram.bin")
qemu = subprocess.Popen(["qemu-system-arm", "-M", "netduinoplus2", "-display", "none",
                         "-serial", "none", "-monitor", f"unix:{sock},server,nowait",
                         "-kernel", elf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(secs)
    mon = socket.socket(socket.AF_UNIX)
    mon.connect(sock)
    for command in ["stop", f'pmemsave {end:#x} {start - end} "{dump}"']:
        mon.sendall(command.encode() + b"\n")
        time.sleep(0.5)
    for _ in range(20):
        if os.path.exists(dump) and os.path.getsize(dump) == start - end:
            break
        time.sleep(0.25)
    mon.sendall(b"quit\n")
finally:
    qemu.wait(timeout=10)
ram = open(dump, "rb").read()
i = 0
while i < len(ram) and ram[i:i + 4] == b"\xcc" * 4:
    i += 4
if i == 0:
    sys.exit(f"{name}: the stack is not painted (or was used whole): no high-water mark")
print(len(ram) - i)
PY
)
  # static RAM as size.sh counts it: .data + .bss + .uninit
  ram=$("$tools/llvm-size" -A "$elf" |
    awk '$1 == ".data" || $1 == ".bss" || $1 == ".uninit" { s += $2 } END { print s + 0 }')
  echo "$bin: stack high-water mark $mark B, static RAM $ram B, together $((ram + mark)) B"
  if [ "$bin" = device-stack ] && [ $((ram + mark)) -gt "$RAM_BUDGET" ]; then
    echo "device-stack is over its RAM budget with its stack: $((ram + mark)) B (max $RAM_BUDGET)" >&2
    failed=1
  fi
done
if [ "$failed" -eq 0 ]; then
  echo "device-stack is within its RAM budget of $RAM_BUDGET B with its stack"
fi
exit "$failed"
