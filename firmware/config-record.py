#!/usr/bin/env python3
"""Builds a tracker's configuration record (firmware/src/config.rs) as a binary file to write
to the configuration sector at 0x081E0000:

    python3 firmware/config-record.py --secrets secrets.toml --vehicle north-0001 \
        --fleet north --broker 192.168.1.10:1883 -o north-0001.bin
    probe-rs download --chip STM32F429ZITx --binary-format bin \
        --base-address 0x081E0000 north-0001.bin

The key and the password come from the secrets file `device-sim provision` writes
([devices.<vehicle>] password, key); --open-mode takes the open-mode key instead (HMAC-SHA256
of the vehicle id under the fixed open-mode label, for a broker without logins) and no
password. The output holds the device's secrets: keep it private and delete it after
flashing.
"""

import argparse
import hashlib
import hmac
import ipaddress
import struct
import sys
import tomllib
import zlib

MAGIC = b"FBDC"
VERSION = 1
RECORD_MAX = 256
OPEN_MODE_LABEL = b"fleetbeat open mode: no origin guarantee"


def text(value: str, what: str, limit: int) -> bytes:
    raw = value.encode()
    if len(raw) > limit:
        sys.exit(f"{what} is longer than {limit} bytes")
    return bytes([len(raw)]) + raw


def record(key: bytes, ip: str, port: int, vehicle: str, fleet: str, password: str) -> bytes:
    body = (
        key
        + ipaddress.IPv4Address(ip).packed
        + struct.pack("<H", port)
        + text(vehicle, "the vehicle id", 24)
        + text(fleet, "the fleet id", 24)
        + text(password, "the password", 64)
    )
    head = MAGIC + bytes([VERSION, 0]) + struct.pack("<H", len(body))
    out = head + body
    out += struct.pack("<I", zlib.crc32(out))
    if len(out) > RECORD_MAX:
        sys.exit(f"the record is {len(out)} bytes, more than the {RECORD_MAX} the firmware reads")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicle", required=True, help="vehicle id, e.g. north-0001")
    parser.add_argument("--fleet", required=True, help="fleet id, e.g. north")
    parser.add_argument("--broker", required=True, help="broker IPv4:port, e.g. 192.168.1.10:1883")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--secrets", help="the secrets file of `device-sim provision`")
    source.add_argument("--open-mode", action="store_true", help="open-mode key, no login")
    parser.add_argument("-o", "--output", required=True, help="the record file to write")
    args = parser.parse_args()

    ip, _, port = args.broker.rpartition(":")
    if not ip or not port.isdigit() or not 0 < int(port) < 65536:
        sys.exit("--broker must be IPv4:port")
    if args.open_mode:
        key = hmac.new(OPEN_MODE_LABEL, args.vehicle.encode(), hashlib.sha256).digest()
        password = ""
    else:
        with open(args.secrets, "rb") as f:
            secrets = tomllib.load(f)
        device = secrets.get("devices", {}).get(args.vehicle)
        if device is None:
            sys.exit(f"{args.secrets} has no [devices.{args.vehicle}]")
        key = bytes.fromhex(device["key"])
        if len(key) != 32:
            sys.exit(f"the key of {args.vehicle} is not 64 hex digits")
        password = device["password"]
    out = record(key, ip, int(port), args.vehicle, args.fleet, password)
    with open(args.output, "wb") as f:
        f.write(out)
    print(f"{args.output}: {len(out)} bytes; write it with:")
    print(
        "  probe-rs download --chip STM32F429ZITx --binary-format bin "
        f"--base-address 0x081E0000 {args.output}"
    )


if __name__ == "__main__":
    main()
