"""Run each patch's proof test with the patch switched off: it must fail (and pass with it on).

``make proofs``. Prints one row per patch; exits 1 if a test passes without its patch,
which means the patch is no longer needed on this stack (or its test does not test it).
A patch written for another release line of its library (``switch.ONLY_FOR``) is not
applied here: its test must pass as installed, which shows the library doing it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mlx_hub.engine.patches import PROOFS
from mlx_hub.engine.patches.switch import DISABLE_ENV, ONLY_FOR, needed_here


def run(test: str, disabled: str | None) -> bool:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if disabled:
        env[DISABLE_ENV] = disabled
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--timeout", "180", test]
    return subprocess.run(command, env=env, capture_output=True, text=True).returncode == 0


def main() -> int:
    needed = True
    print(f"{'patch':36} {'with it':8} {'without':8} test")
    for name, test in PROOFS.items():
        if not needed_here(name):
            package, releases = ONLY_FOR[name]
            passes = run(test, None)
            needed &= passes
            print(f"{name:36} {'pass' if passes else 'FAIL':8} {'-':8} {test} (only for {package}{releases})")
            continue
        with_it, without = run(test, None), run(test, name)
        needed &= with_it and not without
        print(f"{name:36} {'pass' if with_it else 'FAIL':8} {'pass' if without else 'fails':8} {test}")
    return 0 if needed else 1


if __name__ == "__main__":
    sys.exit(main())
