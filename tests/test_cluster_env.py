"""`cluster.serve_ingress`: the environment a local Ray instance started by raytrain inherits (no Ray started here;
the serving tests run Serve under it, and `tests/test_serving.py` checks that HAProxy is what answers)."""

from __future__ import annotations

import pytest

from raytrain.cluster import use_serve_ingress

KEYS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
        "RAYTRAIN_SERVE_INGRESS")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in KEYS:  # set, then removed: monkeypatch then restores each as it was, whatever the test sets
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_haproxy_gets_ports_of_its_own_and_the_app_runs_on_the_replica_loop(clean_env: pytest.MonkeyPatch) -> None:
    import os

    use_serve_ingress("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = {os.environ["RAY_SERVE_HAPROXY_STATS_PORT"], os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(ports) == 2 and not ports & {"8404", "9101"}  # not HAProxy's fixed defaults
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    # A later local instance of the same process may choose again.
    use_serve_ingress("proxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_what_the_caller_exported_wins(clean_env: pytest.MonkeyPatch) -> None:
    import os

    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    use_serve_ingress("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "RAY_SERVE_HAPROXY_STATS_PORT" not in os.environ
    clean_env.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    clean_env.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    use_serve_ingress("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"


def test_an_unknown_ingress_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'haproxy' or 'proxy'"):
        use_serve_ingress("nginx")
