#!/usr/bin/env bash
# Builds the firmware (release, --locked) and prints the flash and RAM each binary takes,
# measured from the ELF sections with llvm-size (rustup component llvm-tools):
#   flash = .vector_table + .text + .rodata + .data (the initial values of .data are in flash)
#   RAM   = .data + .bss + .uninit (static RAM; the stack is the rest of RAM, see docs)
# Fails if `device-stack` (the device stack without the network stack, issue #18) takes more
# than 8 KiB of static RAM or 64 KiB of flash (its stack is measured apart: stack.sh). Usage: bash firmware/size.sh
set -euo pipefail
cd "$(dirname "$0")"

RAM_BUDGET=8192
FLASH_BUDGET=65536
BINS=(tracker device-stack device-stack-gps)

cargo build --release --locked $(printf -- '--bin %s ' "${BINS[@]}")

size="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-size"
if [ ! -x "$size" ]; then
  echo "llvm-size not found at $size: rustup component add llvm-tools" >&2
  exit 1
fi

# section sizes of one ELF as "name size" lines
sections() { "$size" -A "$1" | awk 'NR > 2 && NF >= 2 { print $1, $2 }'; }
sum() { awk -v want=" $2 " 'index(want, " " $1 " ") { s += $2 } END { print s + 0 }' <<<"$1"; }

printf '%-17s %8s %8s %6s %7s %10s %9s\n' binary .text .rodata .data .bss flash RAM
failed=0
for bin in "${BINS[@]}"; do
  s=$(sections "target/thumbv7em-none-eabihf/release/$bin")
  text=$(sum "$s" .text)
  rodata=$(sum "$s" .rodata)
  data=$(sum "$s" .data)
  bss=$(sum "$s" ".bss .uninit")
  flash=$(sum "$s" ".vector_table .text .rodata .data")
  ram=$(sum "$s" ".data .bss .uninit")
  printf '%-17s %8d %8d %6d %7d %10s %9s\n' "$bin" "$text" "$rodata" "$data" "$bss" \
    "$flash B" "$ram B"
  if [ "$bin" = device-stack ]; then
    if [ "$ram" -gt "$RAM_BUDGET" ] || [ "$flash" -gt "$FLASH_BUDGET" ]; then
      echo "device-stack is over its budget: $ram B of static RAM (max $RAM_BUDGET), $flash B of flash (max $FLASH_BUDGET)" >&2
      failed=1
    fi
  fi
done
if [ "$failed" -eq 0 ]; then
  echo "device-stack is within its budget of $RAM_BUDGET B of static RAM and $FLASH_BUDGET B of flash" \
    "(the stack comes on top: stack.sh, docs/firmware.md)"
fi
exit "$failed"
