"""The event stream contract: lines on disk, the loopback socket, its token, and commands back."""

import json
import socket
import time

import pytest

from trainer.events import (EventListener, Reporter, TOKEN_ENV, command, hello, make_event, parse_address,
                            read_events)


def test_make_event_checks_fields():
    assert make_event("checkpoint", step=3, path="/x")["type"] == "checkpoint"
    with pytest.raises(ValueError, match="missing path"):
        make_event("checkpoint", step=3)
    with pytest.raises(ValueError, match="unknown event type"):
        make_event("stepp", step=1)


def test_reporter_appends_json_lines(tmp_path):
    rep = Reporter(tmp_path / "events.jsonl", stream=None)
    rep.emit("log", level="info", message="hello")
    rep.emit("step", step=1, epoch=0, loss=0.5, lr=1e-4, its=2.0, eta=3.0)
    rep.close()
    events, offset = read_events(tmp_path / "events.jsonl")
    assert [e["type"] for e in events] == ["log", "step"]
    assert offset == (tmp_path / "events.jsonl").stat().st_size


def test_read_events_leaves_a_torn_last_line_for_later(tmp_path):
    path = tmp_path / "events.jsonl"
    full = json.dumps(make_event("log", level="info", message="a")) + "\n"
    path.write_text(full + '{"type": "st')
    events, offset = read_events(path)
    assert len(events) == 1 and offset == len(full)
    with open(path, "a") as f:
        f.write('ep", "step": 1}\n')
    more, _ = read_events(path, offset)
    assert more == [] or more[0]["type"] == "step"


def test_socket_streams_events_and_commands_come_back(tmp_path, monkeypatch):
    listener = EventListener(token="secret")
    monkeypatch.setenv(TOKEN_ENV, "secret")
    rep = Reporter(tmp_path / "events.jsonl", listener.address, stream=None)
    rep.emit("log", level="info", message="over the wire")
    assert listener.wait_for("log", timeout=5)["message"] == "over the wire"
    listener.send("stop")
    deadline = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < deadline:
        got = rep.commands()
        time.sleep(0.01)
    assert got == ["stop"]
    rep.close()
    listener.close()


def test_wrong_token_is_refused_and_training_goes_on(tmp_path, monkeypatch):
    listener = EventListener(token="right")
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    rep = Reporter(tmp_path / "events.jsonl", listener.address, stream=None)
    for i in range(50):  # the refused socket must not stop events reaching the file
        rep.emit("log", level="info", message=str(i))
        time.sleep(0.002)
    assert rep.commands() == []
    rep.close()
    assert listener.refused == 1 and listener.events == []
    events, _ = read_events(tmp_path / "events.jsonl")
    assert len(events) == 50
    listener.close()


def test_a_raw_client_with_a_bad_hello_gets_nothing():
    listener = EventListener(token="t0k")
    _, port = parse_address(listener.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b'{"type": "hello", "token": "guess"}\n')
        s.settimeout(5)
        assert s.recv(100) == b""  # closed by the listener
    assert listener.refused == 1
    listener.close()


def test_unreachable_window_does_not_stop_the_reporter(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
    rep = Reporter(tmp_path / "events.jsonl", f"tcp://127.0.0.1:{port}", stream=None)
    rep.emit("log", level="info", message="still written")
    rep.close()
    assert read_events(tmp_path / "events.jsonl")[0][0]["message"] == "still written"


def test_only_loopback_addresses():
    with pytest.raises(ValueError, match="loopback"):
        parse_address("tcp://10.0.0.5:9000")
    assert parse_address("tcp://127.0.0.1:9000") == ("127.0.0.1", 9000)


def test_commands_are_a_closed_set():
    assert json.loads(command("sample")) == {"command": "sample"}
    with pytest.raises(ValueError):
        command("rm -rf")
    assert json.loads(hello("x")) == {"type": "hello", "token": "x"}


def test_commands_as_files_in_the_run_folder_are_taken_once(tmp_path):
    from trainer.events import COMMAND_DIR, Reporter

    reporter = Reporter(tmp_path / "events.jsonl", stream=None)
    assert reporter.commands() == []  # no folder: nothing, no error
    (tmp_path / COMMAND_DIR).mkdir()
    for name in ("save", "stop", "rm -rf"):
        (tmp_path / COMMAND_DIR / name).touch()
    assert reporter.commands() == ["save", "stop"]
    assert reporter.commands() == []
    assert list((tmp_path / COMMAND_DIR).iterdir()) == []
    reporter.close()


def test_a_command_file_older_than_the_run_is_dropped(tmp_path):
    # A window closed with "Stop the run" writes commands/stop too; a run that had already stopped must not find
    # it when it resumes and stop again at its first step.
    import os

    from trainer.events import COMMAND_DIR, Reporter, read_events

    (tmp_path / COMMAND_DIR).mkdir()
    stale = tmp_path / COMMAND_DIR / "stop"
    stale.touch()
    os.utime(stale, (stale.stat().st_mtime - 60,) * 2)
    reporter = Reporter(tmp_path / "events.jsonl", stream=None)
    (tmp_path / COMMAND_DIR / "save").touch()
    assert reporter.commands() == ["save"]
    assert not stale.exists()
    reporter.close()
    warnings = [e["message"] for e in read_events(tmp_path / "events.jsonl")[0]
                if e["type"] == "log"]
    assert warnings == [f"{COMMAND_DIR}/stop was written before this run started: ignored"]
    # A run's start is when its process began: a command written while it scanned the dataset is its own.
    early = tmp_path / COMMAND_DIR / "pause"
    early.touch()
    os.utime(early, (early.stat().st_mtime - 20,) * 2)
    reporter = Reporter(tmp_path / "events2.jsonl", stream=None, started=early.stat().st_mtime - 10)
    assert reporter.commands() == ["pause"]
    reporter.close()


def test_a_sample_command_carries_its_prompts_by_socket_and_by_file(tmp_path, monkeypatch):
    from trainer.events import COMMAND_DIR, MAX_SAMPLE_PROMPTS

    with pytest.raises(ValueError):
        command("save", ["a cat"])  # only `sample` renders prompts
    with pytest.raises(ValueError):
        command("sample", ["x"] * (MAX_SAMPLE_PROMPTS + 1))
    listener = EventListener(token="secret")
    monkeypatch.setenv(TOKEN_ENV, "secret")
    reporter = Reporter(tmp_path / "events.jsonl", listener.address, stream=None)
    reporter.emit("log", level="info", message="connected")
    assert listener.wait_for("log", timeout=5) is not None

    def next_commands():
        deadline, got = time.monotonic() + 5, []
        while not got and time.monotonic() < deadline:
            got = reporter.commands()
            time.sleep(0.01)
        return got

    listener.send("sample", ["a blue square", " a cat "])
    assert next_commands() == ["sample"] and reporter.take_prompts() == ["a blue square", "a cat"]
    assert reporter.take_prompts() is None  # taken once
    listener.send("sample")
    assert next_commands() == ["sample"] and reporter.take_prompts() is None  # none: the validation prompts

    (tmp_path / COMMAND_DIR).mkdir()
    (tmp_path / COMMAND_DIR / "sample").write_text("a red circle\n\n  a green square\n")
    assert reporter.commands() == ["sample"] and reporter.take_prompts() == ["a red circle", "a green square"]
    (tmp_path / COMMAND_DIR / "sample").write_text("x" * 5000)  # too long: still a sample, of the job's prompts
    assert reporter.commands() == ["sample"] and reporter.take_prompts() is None
    reporter.close()
    listener.close()
    warnings = [e["message"] for e in read_events(tmp_path / "events.jsonl")[0] if e["type"] == "log"
                and e["level"] == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{COMMAND_DIR}/sample: the prompts sent with `sample`")
