"""Hostile input, fuzzed with hypothesis: job documents, bytes on the event socket (both ends), caption files.

Each property runs a few dozen examples in seconds; every one goes through the real entry point (`main`, a real
socket, the window's reader)."""

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.cli import main
from trainer.data.files import decode_captions
from trainer.events import (COMMANDS, MAX_COMMAND_BYTES, TOKEN_ENV, LineBuffer, Reporter, command, make_event,
                            encode)
from trainer.job import defaults

FIXTURES_PER_EXAMPLE = settings(max_examples=40, deadline=None,
                                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _field_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths += _field_paths(value, path + ".") if isinstance(value, dict) else [path]
    return paths


FIELDS = _field_paths(defaults())
HOSTILE_TEXT = st.sampled_from(["\ud800/x", "a\x00b", "~/../../etc", "é/𝔘/\u202e", "", " ", "C:\\con\\aux",
                                "x" * 5000, "/dev/zero", "-1", "NaN", "true"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**400)
    | st.floats() | st.text(max_size=20) | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS),
                                                                 inner, max_size=4),
    max_leaves=12)


def _sparse(pairs: list[tuple[str, object]]) -> dict:
    """A job document setting each dotted field path to its value."""
    doc: dict = {}
    for path, value in pairs:
        *sections, key = path.split(".")
        node = doc
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else {}
        node[key] = value
    return doc


def _deep(depth: int) -> str:
    return '{"model": ' + "[" * depth + "]" * depth + "}"


DOCUMENTS = (st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES), max_size=5).map(
                 lambda pairs: json.dumps(_sparse(pairs)))
             | JSON_VALUES.map(json.dumps)
             | st.integers(min_value=1000, max_value=200_000).map(_deep)
             | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not captured.out, captured.err[-500:]
    return lines[0]


@FIXTURES_PER_EXAMPLE
@given(text=DOCUMENTS)
def test_random_job_documents_exit_2_with_one_line_and_write_nothing(text, capsys, monkeypatch):
    with tempfile.TemporaryDirectory() as folder:
        monkeypatch.chdir(folder)  # a relative output_dir would land here
        job = Path(folder) / "job.json"
        job.write_text(text, encoding="utf-8", errors="surrogatepass")
        assert main(["run", str(job)]) == 2
        _one_error_line(capsys)
        assert os.listdir(folder) == ["job.json"]


@FIXTURES_PER_EXAMPLE
@given(pairs=st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES | HOSTILE_TEXT), min_size=1, max_size=3))
def test_a_valid_job_with_hostile_fields_is_checked_or_refused_in_one_line(pairs, demo_template, capsys):
    before = sorted(p for p in demo_template.rglob("*"))
    doc = json.loads((demo_template / "job.json").read_text())
    for path, value in pairs:
        *sections, key = path.split(".")
        node = doc
        for section in sections:
            node = node[section]
        node[key] = value
    with tempfile.TemporaryDirectory() as folder:
        job = Path(folder) / "job.json"
        job.write_text(json.dumps(doc), encoding="utf-8", errors="surrogatepass")
        code = main(["check", str(job)])
        assert code in (0, 2)
        if code == 2:
            _one_error_line(capsys)
        else:
            assert "Traceback" not in capsys.readouterr().err
    assert sorted(p for p in demo_template.rglob("*")) == before  # check writes nothing


CHUNKS = st.lists(st.binary(max_size=300) | st.integers(min_value=MAX_COMMAND_BYTES,
                                                     max_value=4 * MAX_COMMAND_BYTES).map(
    lambda n: b"{" * n) | st.sampled_from([b"\n", b'{"command": "rm -rf /"}\n', b'{"command": ["stop"]}\n',
                                           b"[" * 100_000 + b"\n", b'{"command": "__import__"}\n']), max_size=8)


@settings(max_examples=40, deadline=None)
@given(chunks=CHUNKS)
def test_random_bytes_from_the_window_never_crash_the_trainer(chunks):
    with tempfile.TemporaryDirectory() as folder:
        server = socket.create_server(("127.0.0.1", 0))
        os.environ[TOKEN_ENV] = "tok"
        reporter = Reporter(Path(folder) / "events.jsonl", f"tcp://127.0.0.1:{server.getsockname()[1]}",
                            stream=None)
        peer, _ = server.accept()
        for chunk in chunks:
            peer.sendall(chunk)
        peer.sendall(b"\n" + command("save"))  # a real command after the junk still gets through
        got, deadline = [], time.monotonic() + 5
        while "save" not in got and time.monotonic() < deadline:
            got += reporter.commands()
            assert reporter._inbox.pending() <= MAX_COMMAND_BYTES  # the inbox is bounded
        assert "save" in got and set(got) <= set(COMMANDS)
        reporter.close()
        peer.close()
        server.close()


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=30), limit=st.integers(min_value=1, max_value=20))
def test_line_buffer_is_bounded_and_keeps_every_short_line(chunks, limit):
    buffer = LineBuffer(limit)
    got = []
    for chunk in chunks:
        got += buffer.feed(chunk)
        assert buffer.pending() <= limit
    data = b"".join(chunks)
    ended = data.split(b"\n")[:-1]
    assert got == [line for line in ended if len(line) <= limit]  # only the too-long lines are dropped


@FIXTURES_PER_EXAMPLE
@given(chunks=CHUNKS | st.lists(st.sampled_from([b'{"type": "step"}\n', b'{"type": "step", "step": "x", "epoch": 0, '
                                                 b'"loss": 1, "lr": 1, "its": 1, "eta": 1}\n',
                                                 b'{"type": "log", "level": 3, "message": null}\n']), max_size=4))
def test_random_bytes_from_the_trainer_never_crash_the_window(chunks, app_window):
    runner = app_window.runner
    runner._set_state("running")
    for chunk in chunks:
        runner._dispatch_lines(chunk)  # the reader behind the socket's readyRead
    good = make_event("step", step=7, epoch=0, loss=0.5, lr=1e-4, its=1.0, eta=3.0)
    runner._dispatch_lines(b"\n" + encode(good))
    assert app_window.run_panel.progress.value() == 7
    runner._set_state("idle")


@FIXTURES_PER_EXAMPLE
@given(data=st.binary(max_size=300) | st.sampled_from([b"", b"\xff\xfe\x00a", b"a" * 1_000_001, b"\n\n \n",
                                                       "caf\u00e9".encode("cp1252"), b"\x00" * 10]))
def test_random_caption_files_are_skipped_or_read_as_check_promises(data, demo_template, capsys):
    with tempfile.TemporaryDirectory() as folder:
        dataset = Path(folder) / "dataset"
        shutil.copytree(demo_template / "dataset", dataset)
        txt = sorted(dataset.glob("*.txt"))[0]
        txt.write_bytes(data)
        doc = json.loads((demo_template / "job.json").read_text())
        doc["dataset"]["folders"][0]["path"] = str(dataset)
        doc["output"]["output_dir"] = str(Path(folder) / "run")
        (Path(folder) / "job.json").write_text(json.dumps(doc))
        # --no-estimate: what check promises of captions comes from the scan; tracing the step per example (the
        # estimate, tested on its own) cost two minutes here
        assert main(["check", str(Path(folder) / "job.json"), "--no-estimate"]) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        try:
            decode_captions(data, str(txt)) if len(data) <= 1_000_000 else None
            readable = len(data) <= 1_000_000
        except ValueError:
            readable = False
        if readable:
            assert "images: 12 (" in captured.out
        else:
            assert "images: 11 (" in captured.out and f"  {txt.with_suffix('.png')}: " in captured.out


def test_a_key_with_a_line_separator_stays_on_one_line(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"\x1e": None, "model\u2028": 1}), encoding="utf-8")
    assert main(["run", str(job)]) == 2
    assert "\\x1e" in _one_error_line(capsys)


def test_a_nul_in_a_path_is_refused_by_name(demo_template, tmp_path, capsys):
    doc = json.loads((demo_template / "job.json").read_text())
    doc["output"]["output_dir"] = "a\x00b"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(doc), encoding="utf-8")
    assert main(["check", str(job)]) == 2
    assert "output.output_dir: holds a NUL character" in _one_error_line(capsys)
