"""Time and peak memory of kan-vit-convert on a KAN B/16 checkpoint (target: < 10 s, < 3x the file size).

    python benchmarks/convert_speed.py [--model kan_vit_base_patch16_224] [--workdir DIR]

Writes a randomly initialised model as the original's .msgpack, then converts it in fresh
processes (.msgpack -> .safetensors -> .msgpack, and .msgpack -> .pth). Each child reports the
wall time of `main()` (the process time adds interpreter, torch and timm start-up) and its peak
RSS (VmHWM) above its RSS after the imports (VmRSS), so torch and timm themselves are not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm

from kan_vit.flax import msgpack as flax_msgpack
from kan_vit.flax.layout import timm_to_flax

# /proc (Linux): ru_maxrss would include the parent's RSS at fork time.
CHILD = """
import json, sys, time
from kan_vit.convert import main
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
base = status_kib("VmRSS")
start = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - start
print(json.dumps({"rc": rc, "seconds": seconds, "extra_kib": status_kib("VmHWM") - base}))
"""


def convert(src: Path, dst: Path) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]), process=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kan_vit_base_patch16_224")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        model = timm.create_model(args.model)
        params = timm_to_flax(model.state_dict(), model.blocks[0].attn.num_heads)
        del model
        src = work / "model.msgpack"
        with open(src, "wb") as f:
            flax_msgpack.dump(params, f)
        del params
        size = src.stat().st_size
        print(f"{args.model}: {src.name} is {size / 2**20:.1f} MiB")
        columns = ("main() s", "process s", "peak extra MiB", "x file size")
        print(f"{'direction':<34}" + "".join(f"{c:>16}" for c in columns))
        for a, b in [
            ("model.msgpack", "model.safetensors"),
            ("model.safetensors", "back.msgpack"),
            ("model.msgpack", "model.pth"),
        ]:
            r = convert(work / a, work / b)
            extra = r["extra_kib"] * 1024
            values = (r["seconds"], r["process"], extra / 2**20, extra / size)
            print(f"{a + ' -> ' + b:<34}" + "".join(f"{v:>16.2f}" for v in values))
        same = (work / "back.msgpack").read_bytes() == src.read_bytes()
        print(f"round trip byte-identical: {same}")


if __name__ == "__main__":
    main()
