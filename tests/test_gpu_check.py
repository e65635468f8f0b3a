"""bench/gpu_check.sh, the check for the first machine with a GPU, runs its dry run here: the
same checks on the CPU with tiny shapes, each a PASS line."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_passes_every_check():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                       timeout=600)
    print(r.stdout)
    passed = {ln.split()[1].rstrip(":") for ln in r.stdout.splitlines() if ln.startswith("PASS ")}
    assert r.returncode == 0 and not any(ln.startswith("FAIL") for ln in r.stdout.splitlines()), r.stdout + r.stderr[-2000:]
    assert passed == {"attention", "load", "fp16", "packed", "greedy", "syncs", "dtype", "eval-dtype", "cache-cpu",
                      "cache-disk", "devices", "determinism", "torchrun", "edit-speed"}
