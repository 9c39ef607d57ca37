"""The ORT throughput search times no candidate while a threaded session's idle workers spin."""
import numpy as np

from targets import ort_throughput


class FakeSession:
    def __init__(self, key, log):
        self.key, self.log = key, log

    def run(self, _outputs, _feed):
        self.log.append(self.key)


def test_search_settles_after_a_threaded_candidate_and_never_inside_a_timed_call(monkeypatch):
    log = []
    monkeypatch.setattr(ort_throughput.time, "sleep", lambda s: log.append("settle"))
    cands = {(1, 2): [FakeSession((1, 2), log)], (2, 1): [FakeSession((2, 1), log), FakeSession((2, 1), log)]}
    search = ort_throughput.Search(cands, "input")
    x = np.zeros((4, 1, 8, 8), np.float32)
    search.choose(x)
    runs = [e for e in log if e != "settle"]
    assert {(1, 2), (2, 1)} <= set(runs)
    # whenever a run follows one of the 2-thread session, a pause lies between them; none otherwise
    last = None
    for e in log:
        if e == "settle":
            assert last in (None, (1, 2)), log
            last = "settled"
            continue
        assert not (last == (1, 2) and e != (1, 2)), log
        last = e
    assert log[0] == "settle"  # the runner's own session may have just run
    n = len(log)
    search([x] * 3)
    assert "settle" not in log[n:] and len(log) - n == 3  # profile.throughput settles before its rounds


def test_single_thread_sessions_have_no_workers_to_wait_for(monkeypatch):
    log = []
    monkeypatch.setattr(ort_throughput.time, "sleep", lambda s: log.append("settle"))
    search = ort_throughput.Search({(1, 1): [FakeSession((1, 1), log)]}, "input")
    search.choose(np.zeros((4, 1, 8, 8), np.float32))
    assert "settle" not in log and log
