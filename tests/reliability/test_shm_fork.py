"""Fork (issue 13 section 4): only the process that created a segment unlinks it. A forked child
that exits through the interpreter (its exit handlers run the owner's finalizer), drops its copy
of the store, closes it, or dies of SIGTERM leaves the parent's segment, its rows and its
liveness mark as they were.

The cases run in one fresh interpreter (``python -c``), so that each child can exit for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each child's last act; then it exits through the interpreter (unless the signal killed it).
CHILDREN = {
    "exits": "pass",
    "drops": "del store; gc.collect()",
    "closes": "store.close()",
    "sigterm": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
}

SCRIPT = """
import gc, os, signal, sys, time
import numpy as np, torch
from rollout.capture import RoutedExpertsReader, RoutingStore, shm

GEN = torch.Generator().manual_seed(SEED)
for case, child in CHILDREN.items():
    name = shm.segment_name(shm.new_instance_id(), 0)
    store = RoutingStore(name=name, num_kv_slots=32, num_moe_layers=2, top_k=2,
                         max_num_tokens=8, device="cpu", lock_path=LOCK)
    rows = torch.randint(0, 100, (8, 2, 2), dtype=torch.int16, generator=GEN)
    slots = list(range(3, 11))
    store.after_forward(rows, 8, slots)
    store.commit()
    pid = os.fork()
    if pid == 0:
        exec(child)
        sys.exit(0)  # a real interpreter exit: atexit hooks and finalizers run
    _, status = os.waitpid(pid, 0)
    print(case, "child exit", os.waitstatus_to_exitcode(status), flush=True)
    assert os.path.exists(f"/dev/shm/{name}"), f"{case}: the child unlinked the segment"
    assert name not in shm.reclaim_orphans(lock_path=LOCK), f"{case}: parent not marked live"
    with RoutedExpertsReader.from_spec(store.reader_spec()) as reader:
        np.testing.assert_array_equal(reader.read(slots), rows.numpy())
    np.testing.assert_array_equal(store.read(slots), rows.numpy())
    store.close()
    assert not os.path.exists(f"/dev/shm/{name}"), f"{case}: the parent did not unlink"
print("ok")
"""


def test_forked_child_leaves_the_parents_segment(tmp_path, seed):
    lock = str(tmp_path / "shm.lock")
    code = f"CHILDREN = {CHILDREN!r}\nLOCK = {lock!r}\nSEED = {seed}\n" + textwrap.dedent(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stdout + proc.stderr
    # The SIGTERM clean-up handler the child inherited lets it die of the signal, as it would
    # have without us; the others exit 0.
    for case in CHILDREN:
        assert f"{case} child exit {-15 if case == 'sigterm' else 0}" in proc.stdout
