"""Sealed key files (issue 11 #16): with a passphrase the key chains are sealed too, the
passphrase never travels in argv, and an old key file (sealed seed, clear chains)
still loads and is sealed whole when it is rewritten."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from test_cli import mh

from meshhealth.cli import passphrase
from meshhealth.cli.main import build_parser
from meshhealth.cli.patient_cmds import all_chains, write_chains
from meshhealth.crypto import keys
from meshhealth.crypto.keys import Identity, read_key_file, save_identity
from meshhealth.errors import KeyFileError
from meshhealth.sharing.keychain import KeyChain

DEAD = "http://127.0.0.1:9"


def test_a_sealed_key_file_holds_no_seed_in_clear(tmp_path: Path) -> None:
    ident = Identity.generate("patient")
    chains = [KeyChain.new(s, 100).to_doc() for s in ("hr", "bp")]
    save_identity(
        ident, tmp_path / "p.key", passphrase="correct horse", extra={"keychains": chains}
    )
    raw = (tmp_path / "p.key").read_bytes()
    seeds = [bytes(ident.signing)] + [bytes.fromhex(c["seed"]) for c in chains]
    for seed in seeds:
        assert seed not in raw and seed.hex().encode() not in raw
    assert set(tomllib.loads(raw.decode())) == {"kind", "public", "sealed"}
    kf = read_key_file(tmp_path / "p.key", passphrase="correct horse")
    assert kf.identity.public == ident.public and kf.extra["keychains"] == chains
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        read_key_file(tmp_path / "p.key", passphrase="wrong")


def test_an_old_key_file_loads_and_is_sealed_whole_when_rewritten(tmp_path: Path) -> None:
    ident = Identity.generate("patient")
    chain = KeyChain.new("hr", 100)
    box_only = tmp_path / "box.key"  # what `--passphrase` wrote before: only the seed boxed
    save_identity(ident, box_only, passphrase="pw")
    doc = tomllib.loads(box_only.read_text())
    box = doc["sealed"].pop("payload")  # the old format had no payload field
    assert box == "toml"
    old = keys._kdf("pw", bytes.fromhex(doc["sealed"]["salt"]), doc["sealed"]["opslimit"],
                    doc["sealed"]["memlimit"])  # fmt: skip
    import nacl.secret

    doc["sealed"]["box"] = nacl.secret.SecretBox(old).encrypt(bytes(ident.signing)).hex()
    doc["keychains"] = [chain.to_doc()]
    box_only.unlink()
    box_only.write_text(tomli_w.dumps(doc))
    assert chain.seed.hex().encode() in box_only.read_bytes()  # the old flaw, reproduced
    assert all_chains(str(box_only), "pw") == [chain]
    write_chains(str(box_only), ident, None, [chain])  # rewritten: sealed whole
    raw = box_only.read_bytes()
    assert chain.seed.hex().encode() not in raw and chain.seed not in raw
    assert read_key_file(box_only, passphrase="pw").extra["keychains"] == [chain.to_doc()]

    clear = tmp_path / "clear.key"  # a clear file rewritten with a passphrase is sealed
    save_identity(ident, clear, extra={"keychains": [chain.to_doc()]})
    assert read_key_file(clear).passphrase is None
    write_chains(str(clear), ident, "new pw", [chain])
    assert chain.seed.hex().encode() not in clear.read_bytes()
    assert read_key_file(clear, passphrase="new pw").identity.public == ident.public


def test_no_command_takes_a_passphrase_in_argv() -> None:
    def walk(p: argparse.ArgumentParser, path: str) -> list[str]:
        found = [
            f"{path} {o}"
            for a in p._actions
            for o in a.option_strings
            if o == "--passphrase" and not isinstance(a, passphrase.Refused)
        ]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    found += walk(sub, f"{path} {name}")
        return found

    assert walk(build_parser(), "meshhealth") == []
    r = mh("patient", "new", "--out", "/nonexistent/x.key", "--passphrase", "secret")
    assert r.returncode == 2 and "--passphrase is gone" in r.stderr, r.stderr
    assert "--passphrase-file" in mh("node", "run", "--help").stdout


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshhealth.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,  # not a terminal: nobody is asked
        env={k: v for k, v in os.environ.items() if k != keys.PASSPHRASE_ENV} | (env or {}),
    )


def test_passphrase_from_a_file_or_the_environment(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("tr0ub4dor&3\n")
    a = run("patient", "new", "--out", str(tmp_path / "a.key"), "--passphrase-file", str(pw))
    assert a.returncode == 0, a.stderr
    b = run("patient", "new", "--out", str(tmp_path / "b.key"), "--seal",
            env={keys.PASSPHRASE_ENV: "from the env"})  # fmt: skip
    assert b.returncode == 0, b.stderr
    c = run("patient", "new", "--out", str(tmp_path / "c.key"), "--seal")
    assert c.returncode == 2 and "--seal needs a passphrase" in c.stderr
    assert not (tmp_path / "c.key").exists()
    for name, secret in (("a.key", "tr0ub4dor&3"), ("b.key", "from the env")):
        path = tmp_path / name
        kf = read_key_file(path, passphrase=secret)
        raw = path.read_bytes()
        for c_ in kf.extra["keychains"]:
            assert c_["seed"].encode() not in raw
        assert bytes(kf.identity.signing).hex().encode() not in raw
        assert secret.encode() not in raw

    # opening: the file, the env var; a wrong one fails clearly, before any network use
    grants = ("patient", "grants", "--key", str(tmp_path / "a.key"), "--node", DEAD)
    ok = run(*grants, "--passphrase-file", str(pw))
    assert ok.returncode == 1 and "wrong passphrase" not in ok.stderr, ok.stderr  # reached out
    ok = run(*grants, env={keys.PASSPHRASE_ENV: "tr0ub4dor&3"})
    assert ok.returncode == 1 and "wrong passphrase" not in ok.stderr, ok.stderr
    bad = run(*grants, env={keys.PASSPHRASE_ENV: "nope"})
    assert bad.returncode == 2 and "wrong passphrase for" in bad.stderr, bad.stderr
    none = run(*grants)
    assert none.returncode == 2 and "is sealed: give --passphrase-file" in none.stderr


def test_on_a_terminal_the_passphrase_is_asked_for(tmp_path: Path) -> None:
    import fcntl
    import pty
    import termios

    def on_tty(*args: str, answers: list[str]) -> tuple[int, str]:
        main, sub = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshhealth.cli.main", *args],
            stdin=sub,
            stdout=sub,
            stderr=sub,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env={k: v for k, v in os.environ.items() if k != keys.PASSPHRASE_ENV},
        )
        os.close(sub)
        out = b""
        for answer in answers:
            while b"passphrase" not in out.split(b"\n")[-1].lower():
                out += os.read(main, 1024)
            os.write(main, answer.encode() + b"\n")
            out += b"\n"
        try:
            while chunk := os.read(main, 1024):
                out += chunk
        except OSError:  # EIO: the child closed the terminal
            pass
        os.close(main)
        return proc.wait(timeout=60), out.decode(errors="replace")

    key = tmp_path / "t.key"
    code, said = on_tty("patient", "new", "--out", str(key), "--seal", answers=["s3cret", "s3cret"])
    assert code == 0, said
    assert "s3cret" not in said  # not echoed
    assert read_key_file(key, passphrase="s3cret").extra["keychains"]
    code, said = on_tty("patient", "grants", "--key", str(key), "--node", DEAD, answers=["bad"])
    assert code == 2 and "wrong passphrase" in said, said
