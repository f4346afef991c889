"""Run a script under several forced host CPU devices (shared by the multi-device tests)."""

import json
import os
import subprocess
import sys


def run_on_cpu_devices(script: str, count: int = 2):
    """Run ``script`` in a fresh Python that sees ``count`` CPU devices (XLA reads the flag only
    before JAX starts, hence the subprocess); returns the JSON value its last output line holds."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
