"""The end of a DAG's function actors without Ray: release kills what the side table owns,
once; a release on a thread Ray started kills from a thread of its own."""

import _thread
import threading

import pytest
import ray

from dagc.ir import SideTable
from dagc.runtime.actor import function_host


@pytest.fixture
def kills(monkeypatch):
    """ray.kill replaced: records (handle, the thread it ran on)."""
    got = _Kills()
    done = got.done

    def fake_kill(h, no_restart=True):
        assert no_restart
        got.append((h, threading.current_thread()))
        done.set()

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "kill", fake_kill)
    return got


class _Kills(list):
    def __init__(self):
        super().__init__()
        self.done = threading.Event()


def test_release_kills_the_owned_actors_once(kills):
    side = function_host.owning(SideTable(handles={"a0": "user"}), {"a1": "h1", "a2": "h2"})
    assert side.handles == {"a0": "user", "a1": "h1", "a2": "h2"}
    function_host.release(side)
    function_host.release(side)  # teardown after a death's release: nothing twice
    assert [h for h, _ in kills] == ["h1", "h2"]
    assert all(t is threading.current_thread() for _, t in kills)
    function_host.release(SideTable(handles={"a0": "user"}))  # owns nothing
    assert len(kills) == 2


def test_release_on_a_thread_ray_started_kills_from_another(kills):
    side = function_host.owning(SideTable(), {"a0": "h0"})
    caller = []

    def from_foreign_thread():  # a thread threading did not start: a _DummyThread
        caller.append(threading.current_thread())
        function_host.release(side)

    _thread.start_new_thread(from_foreign_thread, ())
    assert kills.done.wait(10)
    assert isinstance(caller[0], threading._DummyThread)
    assert kills[0][0] == "h0" and kills[0][1] is not caller[0]


def test_no_kill_once_ray_is_shut_down(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "kill", lambda *a, **k: pytest.fail("a Ray call after shutdown"))
    function_host.release(function_host.owning(SideTable(), {"a0": "h0"}))
