"""Bad input through the real CLI: one line naming the field or the file, a non-zero exit code,
no traceback, nothing written (issue 19, item 11).

Each case is one row of BAD: the files it needs, the command, and the words its error line must
hold. A new case is one more row.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# Placeholders, filled in each argument, file and config text: the case's folder, its config
# file, its --out folder (which must not be created), and the address of its coordinator.
TMP, CONFIG, OUT, COORDINATOR = "{tmp}", "{config}", "{out}", "{coordinator}"

RUN = ("run", CONFIG, "--in-process", "-q", "--out", OUT)
LOCAL = ("run", CONFIG, "-q", "--no-dashboard", "--out", OUT)
SERVE = ("serve", CONFIG, "--listen", "127.0.0.1:0", "-q", "--no-dashboard", "--out", OUT)
WORKER = ("worker", "--coordinator", COORDINATOR, "--connect-timeout", "60")

SMALL = 'workers = 2\nrounds = 3\n[data]\ndataset = "synthetic"\nrows = 40\ndim = 10\n'
GOOD_SVM = "".join(f"{1 + i % 2} {1 + i % 5}:1 {6 + i % 4}:0.5\n" for i in range(20))


def on_file(name: str, more: str = "") -> str:
    """A config of the run on TMP/name."""
    return f'workers = 2\nrounds = 3\n{more}\n[data]\ndataset = "{TMP}/{name}"\n'


def small(table: str) -> str:
    """SMALL with one more table (a compressor, a method, a problem)."""
    return f"{table}\n{SMALL}"


@dataclass(frozen=True)
class Bad:
    id: str
    command: tuple[str, ...]
    config: str | bytes  # the text of CONFIG (bytes: written as they are)
    words: tuple[str, ...]  # what the one error line names (the field or the file, the value)
    files: Mapping[str, str | bytes] = field(default_factory=dict)  # more files in TMP, by name
    env: Mapping[str, str] = field(default_factory=dict)
    serve: str | None = None  # a config to serve first, at COORDINATOR


BAD = [
    Bad("k-2.5", RUN, small('compressor = { name = "top_k", k = 2.5 }'), ("compressor 'top_k': k must be an integer", "2.5")),
    Bad("k-2.5-serve", SERVE, small('compressor = { name = "top_k", k = 2.5 }'), ("compressor 'top_k': k must be an integer", "2.5")),
    Bad("k-text", RUN, small('compressor = { name = "rand_k", k = "big" }'), ("compressor 'rand_k': k must be an integer", "'big'")),
    Bad("zeta-text", RUN, small('method = { name = "clag", zeta = "x" }'), ("method 'clag': zeta must be a number", "'x'")),
    Bad("lam-text", RUN, small('problem = { name = "logreg_l2", lam = "x" }'), ("lam must be a number", "'x'")),
    Bad("config-not-utf8", RUN, b"workers = 2\n# caf\xe9\n", (CONFIG, "not UTF-8 text", "0xe9")),
    Bad("config-not-utf8-serve", SERVE, "\ufeffworkers = 2\n".encode("utf-16"), (CONFIG, "not UTF-8 text")),
    Bad("config-unknown-key", RUN, "wrokers = 3\n", (CONFIG, "wrokers: unknown field")),
    Bad("rows-0", RUN, SMALL.replace("rows = 40", "rows = 0"), (CONFIG, "data.rows", "greater than or equal to 1")),
    Bad("svm-nan", RUN, on_file("nan.svm"), ("nan.svm: row 2: a feature value is nan",), {"nan.svm": "1 1:1\n2 1:0.5 2:nan\n"}),
    Bad("svm-inf", RUN, on_file("inf.svm"), ("inf.svm: row 1: a feature value is inf",), {"inf.svm": "1 1:inf\n2 1:1\n"}),
    Bad("svm-nan-label", RUN, on_file("l.svm"), ("l.svm: row 3: the label nan",), {"l.svm": "1 1:1\n2 1:2\nnan 1:3\n"}),
    Bad("svm-index-past-int32", RUN, on_file("big.svm"), ("big.svm: a feature index is too large", "would not fit in memory"),
        {"big.svm": "1 1:0.5\n2 99999999999:1\n"}),
    Bad("svm-d-past-memory", RUN, on_file("wide.svm").replace("workers = 2", "workers = 64"),
        ("wide.svm: d = 2147483646 with 64 workers needs", "more than this machine's memory"), {"wide.svm": "1 1:0.5\n2 2147483646:1\n"}),
    Bad("dim-past-memory", RUN, on_file("ok.svm", "").replace("[data]", "[data]\ndim = 99999999999"),
        ("ok.svm: d = 99999999999 (the width asked for: data.dim) needs",), {"ok.svm": GOOD_SVM}),
    Bad("synthetic-past-memory", RUN, SMALL.replace("dim = 10", "dim = 99999999999"),
        ("synthetic data of 40 rows x 99999999999 features (data.rows, data.dim) needs",)),
    Bad("svm-empty", RUN, on_file("empty.svm"), ("empty.svm: expected two label values, found 0",), {"empty.svm": ""}),
    Bad("svm-one-class", RUN, on_file("one.svm"), ("one.svm: expected two label values, found 1",), {"one.svm": "1 1:1\n1 2:1\n"}),
    Bad("data-missing", LOCAL, on_file("gone/a9a"), (f"data set '{TMP}/gone/a9a' not found; looked for {TMP}/gone/a9a, ",)),
    Bad("data-missing-serve", SERVE, on_file("gone/a9a"), (f"data set '{TMP}/gone/a9a' not found; looked for {TMP}/gone/a9a, ",)),
    Bad("worker-data-nan", (*WORKER, "--data", f"{TMP}/nan.svm"), "", ("nan.svm: row 2: a feature value is nan",),
        {"nan.svm": "1 1:1\n2 1:0.5 2:nan\n", "ok.svm": GOOD_SVM}, serve=on_file("ok.svm").replace("workers = 2", "workers = 1")),
    Bad("worker-data-missing", (*WORKER, "--data", f"{TMP}/gone.svm"), "", (f"data set '{TMP}/gone.svm' not found",),
        {"ok.svm": GOOD_SVM}, serve=on_file("ok.svm").replace("workers = 2", "workers = 1")),
    Bad("out-under-a-file", ("run", CONFIG, "--in-process", "-q", "--out", f"{TMP}/a-file/out"), SMALL,
        (f"--out {TMP}/a-file/out: cannot write there", "Not a directory"), {"a-file": "not a folder\n"}),
]


# The CLI under an 8 GiB address-space limit: a case that allocates what it should have
# refused fails with MemoryError, not by taking the machine's memory from everyone else.
LIMITED = (
    "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
    "from threepc.server.cli import main; main(sys.argv[1:])"
)


def _threepc(args: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LIMITED, *args], env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_input_is_one_line_naming_it(case: Bad, tmp_path: Path) -> None:
    names = {TMP: str(tmp_path), CONFIG: str(tmp_path / "run.toml"), OUT: str(tmp_path / "out")}

    def fill(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    for name, content in {**case.files, "run.toml": case.config}.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else fill(content).encode())
    server = None
    try:
        if case.serve is not None:
            (tmp_path / "serve.toml").write_text(fill(case.serve))
            server = _threepc(["serve", str(tmp_path / "serve.toml"), "--listen", "127.0.0.1:0", "-q", "--no-dashboard",
                               "--out", str(tmp_path / "served")], case.env)
            assert server.stderr is not None
            first = server.stderr.readline()
            port = re.search(r"listening on port (\d+)", first)
            assert port, first
            names[COORDINATOR] = f"127.0.0.1:{port.group(1)}"
        proc = _threepc([fill(arg) for arg in case.command], case.env)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if server is not None:
            server.kill()
            server.communicate()  # and its pipes closed
    assert proc.returncode not in (0, None), stdout
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threepc: error: "), stderr
    for words in case.words:
        assert fill(words) in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written for a run that did not start
