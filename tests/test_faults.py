"""Fault injection (issue 9): every scenario of ``bench/faults.py`` with a fixed seed, asserting per image:
completed exactly once per fingerprint, nothing lost, every derivative whole and equal to its row's
sha256, every original unchanged; rework within the Compose batches in flight."""

import pytest

from conftest import MODELS, need

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

_SERVER = pytest.mark.integration  # a moto S3 server or a multi-node Ray cluster of its own
SCENARIOS = ["driver_kills", "decode_actor_kill", "restore_actor_kill", pytest.param("node_removed", marks=_SERVER),
             pytest.param("s3_faults", marks=_SERVER), "two_runs_local", pytest.param("two_runs_s3", marks=_SERVER),
             "readers_during_job"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_fault(name):
    import faults

    need(MODELS / "detection_mobilenet0.25_Final.pth")
    o = faults.run_scenario(name, seed=0)
    assert o.injected > 0, o
    assert (o.lost, o.duplicated, o.originals_changed, o.bad_derivatives) == (0, 0, 0, 0), o
    assert o.redone <= o.redone_bound, o
    assert not o.problems, o
