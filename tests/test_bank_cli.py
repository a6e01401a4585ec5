"""`memlm bank ...` end to end on a small facts JSONL, every action's --help, and one-line errors."""

import json

import pytest

from memlm.cli import main

ACTIONS = [
    "create",
    "import",
    "export",
    "add",
    "edit",
    "delete",
    "show",
    "search",
    "lookup",
    "history",
    "rollback",
    "verify",
    "checkpoint",
    "stats",
]


@pytest.mark.parametrize("action", ACTIONS)
def test_help(action, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bank", action, "--help"])
    assert e.value.code == 0 and "usage: memlm bank" in capsys.readouterr().out


def test_end_to_end(tmp_path, capsys):
    b, src = str(tmp_path / "bank"), tmp_path / "facts.jsonl"
    rows = [
        {"subject": "France", "relation": "capital", "object": "Paris", "text": "The capital of France is Paris.",
         "namespace": "geo", "aliases": ["French Republic"]},
        {"subject": "Japan", "relation": "capital", "object": "Tokyo", "text": "The capital of Japan is Tokyo.", "namespace": "geo"},
        {"text": "Ada Lovelace wrote the first program.", "namespace": "bios", "source": "wiki"},
    ]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*argv):
        code = main(["bank", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("create", b)[0] == 0
    assert "imported 3" in run("import", b, str(src))[1]
    code, out, _ = run("search", b, "capital of France", "-k", "2")
    first = out.splitlines()[0].split("\t")
    assert (
        code == 0
        and first[1] == "0"
        and first[3] == "The capital of France is Paris."
        and float(first[0]) > 0
    )
    assert "bios" not in run("search", b, "capital of France", "--namespace", "geo", "--index", "faiss")[1]
    assert "The capital of France is Lyon." in run("edit", b, "0", "--object", "Lyon")[1]
    assert (
        run("search", b, "capital France", "-k", "1")[1].split("\t")[3].strip()
        == "The capital of France is Lyon."
    )
    assert run("lookup", b, "French Republic", "capital")[1].startswith("alias\t1.0000\t0\tLyon")
    assert run("add", b, "--text", "Grace Hopper wrote a compiler.", "--namespace", "bios")[1].strip() == "3"
    assert "deleted 1" in run("delete", b, "1")[1]
    assert "\t1\t" not in run("search", b, "The capital of Japan is Tokyo.", "-k", "10", "--index", "pk")[1]
    hist = run("history", b, "0")[1].splitlines()
    assert hist[0].startswith("v1\tadd") and "Lyon" in hist[1]
    assert "rolled back to version 1" in run("rollback", b, "1")[1]
    shown = [json.loads(x) for x in run("show", b, "0", "1")[1].splitlines()]
    assert [s["object"] for s in shown] == ["Paris", "Tokyo"]
    assert run("verify", b)[1].strip() == "ok"
    assert json.loads(run("stats", b)[1])["entries"] == 3
    out_file = tmp_path / "out.jsonl"
    assert "exported 3" in run("export", b, str(out_file))[1]
    assert [json.loads(x)["text"] for x in out_file.read_text().splitlines()][0] == rows[0]["text"]


def test_errors_are_one_line(tmp_path, capsys):
    b = str(tmp_path / "bank")
    main(["bank", "create", b])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "x", "namespace": 7}\n')
    assert main(["bank", "import", b, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"memlm bank: error: {bad}:2: field 'namespace': expected a string, got int"
    assert main(["bank", "show", b, "42"]) == 2 and "no entry with id 42" in capsys.readouterr().err
    assert main(["bank", "stats", str(tmp_path / "nope")]) == 2
    assert "not a memlm bank" in capsys.readouterr().err
    assert json.loads(capsys.readouterr().out or "{}") == {}
    main(["bank", "stats", b])
    assert json.loads(capsys.readouterr().out)["entries"] == 0  # the failed import left nothing


def test_second_search_reuses_the_saved_index(tmp_path, capsys, monkeypatch):
    """The first search builds and saves indexes/<kind>-<encoder>; later ones load it and apply the log."""
    from memlm.index import Retriever

    builds = []
    real = Retriever._rebuild
    monkeypatch.setattr(Retriever, "_rebuild", lambda self, **kw: (builds.append(1), real(self, **kw))[1])
    b = str(tmp_path / "bank")
    main(["bank", "create", b])
    for t in ("The capital of France is Paris.", "The capital of Japan is Tokyo.", "Bananas are yellow."):
        main(["bank", "add", b, "--text", t])
    main(["bank", "search", b, "capital of France", "--index", "faiss"])
    assert (
        len(builds) == 1 and (tmp_path / "bank" / "indexes" / "faiss-hashing-v1" / "manifest.json").exists()
    )
    main(["bank", "search", b, "capital of France", "--index", "faiss"])
    main(["bank", "edit", b, "1", "--text", "The capital of Japan is Kyoto, said nobody."])
    capsys.readouterr()
    main(["bank", "search", b, "Kyoto said nobody", "-k", "1", "--index", "faiss"])
    assert "Kyoto" in capsys.readouterr().out  # the edit reached the saved index through the log
    assert len(builds) == 1


def test_refused_imports_leave_no_trace(tmp_path, capsys):
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n\n")
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    b = str(tmp_path / "bank")
    main(["bank", "create", b])
    assert main(["bank", "import", b, str(empty)]) == 2
    assert "empty.jsonl: no entries" in capsys.readouterr().err
    from memlm.bank import MemoryBank

    with MemoryBank.open(b) as bank:
        assert bank.version == 0  # the refused import did not bump the version
    for folder in (tmp_path / "new", tmp_path / "new2"):
        if folder.name == "new2":
            folder.mkdir()  # an empty folder given by the user stays, empty
        assert main(["bank", "import", str(folder), str(bad), "--create"]) == 2
        assert "bad.jsonl:2: field 'text'" in capsys.readouterr().err
        assert folder.exists() == (folder.name == "new2") and not any(folder.glob("*"))
