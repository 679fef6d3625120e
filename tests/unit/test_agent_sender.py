"""The agent's sender, without a model: the bound of its queue, and how it selects the sampled
slots of the staging buffer."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("zmq")

from grokwatch.agent.sender import Sender, _as_slice  # noqa: E402


def test_a_full_queue_drops_and_counts_and_never_blocks(monkeypatch):
    """The training thread's put never waits: past queue_size items it counts queue_full."""
    monkeypatch.setattr(Sender, "_loop", lambda self: None)  # nobody drains the queue
    sender = Sender(endpoint="tcp://127.0.0.1:9", run="r", num_layers=2, num_experts=4, top_k=1,
                    distribution="softmax", queue_size=3)
    for step in range(5):  # the hello took one place
        sender.submit_eval(step, {"math": 0.5})
    assert sender.queue.qsize() == 3
    assert sender.dropped == {"queue_full": 3}
    sender.close(0.1)


@pytest.mark.parametrize("keep, expected", [
    ([0, 4, 8, 12], slice(0, 13, 4)),  # one slot per row (D = 4)
    ([0, 1, 2], slice(0, 3, 1)),  # packed rows, every document slot used
    ([5], slice(5, 6)),
    ([0, 1, 4, 5, 6], None),  # packed rows with fewer documents: fancy indexing
    ([0, 4, 9], None),
])
def test_sampled_slots_as_a_slice_select_the_same_rows(keep, expected):
    """A slice when the slots step evenly (NumPy views, copied once by encode), else fancy indexing:
    both select the same rows."""
    rows = _as_slice(keep)
    if expected is None:
        assert rows == keep
    else:
        assert rows == expected
    table = np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2)
    np.testing.assert_array_equal(table[rows], table[keep])
    np.testing.assert_array_equal(table[rows, 1:], table[keep][:, 1:])


def test_an_idle_sender_sleeps_until_its_heartbeat_and_close_wakes_it():
    """Each time the sender thread wakes it takes the GIL, which the training thread then hands over and
    waits to get back: idle, it wakes for heartbeats only (it used to wake every 100 ms); close() wakes
    it at once, after what is queued is sent, and its last heartbeat goes out."""
    import time

    import zmq

    from grokwatch.wire import Eval, Heartbeat, decode

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:0")
    try:
        sender = Sender(endpoint=pull.getsockopt_string(zmq.LAST_ENDPOINT), run="r", num_layers=2, num_experts=4,
                        top_k=1, distribution="softmax", heartbeat_interval_s=30.0)
        time.sleep(1.0)
        assert sender.wakes <= 1  # the hello
        sender.submit_eval(3, {"math": 0.5})
        t = time.monotonic()
        sender.close(5.0)
        assert time.monotonic() - t < 3.0  # not the 30 s heartbeat interval, nor close's 5 s timeout
        kinds = []
        while pull.poll(500):
            kinds.append(type(decode(pull.recv())))
        assert kinds[-2:] == [Eval, Heartbeat]
    finally:
        pull.close(0)
        ctx.term()


@pytest.mark.parametrize("done", [True, False])
def test_the_sender_waits_for_the_device_copy_only_while_it_is_not_done(monkeypatch, done):
    """On CUDA each message carries the event recorded after its device-to-host copy. Waiting on it releases
    the GIL and takes it back (a hand-over with the training thread): the sender asks first, and waits only
    if the copy is still running. A stand-in for torch.cuda.Event (no CUDA here); the CUDA tests run the real one."""
    import torch

    from grokwatch.agent.sender import Pending
    from grokwatch.agent.staging import Staging

    class Event:
        def __init__(self):
            self.waited = False

        def query(self):
            return done

        def synchronize(self):
            self.waited = True

    monkeypatch.setattr(Sender, "_loop", lambda self: None)
    staging = Staging(num_layers=2, slots=1, num_experts=4, device=torch.device("cpu"))
    sender = Sender(endpoint="tcp://127.0.0.1:9", run="r", num_layers=2, num_experts=4, top_k=1,
                    distribution="softmax", staging=staging)
    index = staging.take()
    staging.split(staging.pool[index])["tokens_N"][0] = 3
    event = Event()
    message = sender._routing(Pending(source="train", step=0, sample_ids=["a"], groups=["g"], host_index=index,
                                      event=event, with_cosines=False, with_loss=False))
    assert message.sample_ids == ("a",) and message.token_counts_N.tolist() == [3]
    assert event.waited is (not done)
    sender.close(0.1)


def test_all_token_counts_of_a_message_without_sampled_rows_go_with_the_next(monkeypatch):
    """A training message whose sampled rows are all empty is not sent: its all-token counts (and forwards) are
    carried into the next message, added once, the spare column of ids outside 0..E-1 left out."""
    import numpy as np
    import torch

    from grokwatch.agent.sender import Pending
    from grokwatch.agent.staging import Staging

    monkeypatch.setattr(Sender, "_loop", lambda self: None)
    staging = Staging(num_layers=2, slots=1, num_experts=4, device=torch.device("cpu"))
    sender = Sender(endpoint="tcp://127.0.0.1:9", run="r", num_layers=2, num_experts=4, top_k=1,
                    distribution="softmax", staging=staging)
    first = np.arange(10, dtype=np.int64).reshape(2, 5)  # [L, E + 1]
    second = np.full((2, 5), 100, np.int64)
    messages = []
    for tokens, counts, forwards in ((0, first, 3), (7, second, 2)):
        index = staging.take()
        views = staging.split(staging.pool[index])
        views["tokens_N"][0] = tokens  # 0: no sampled row to ship
        views["expert_tokens_LE"].view(torch.int64)[:] = torch.from_numpy(counts)
        messages.append(sender._routing(Pending(source="train", step=len(messages), sample_ids=["a"], groups=["g"],
                                                host_index=index, event=None, with_cosines=False, with_loss=False,
                                                counted_forwards=forwards)))
        staging.give_back(index)
    assert messages[0] is None
    np.testing.assert_array_equal(messages[1].expert_tokens_LE, (first + second)[:, :4])
    assert messages[1].counted_forwards == 5
    sender.close(0.1)
