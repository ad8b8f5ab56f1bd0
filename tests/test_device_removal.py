"""Issue 11 #10: a stolen device key can be cut off; backdated readings are refused; a fetch
skips (and reports) a reading that does not decrypt.  Real Mosquitto, a real node process,
the real CLI (``patient enroll-device``, ``patient remove-device``, ``provider fetch``)."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from signed_http import signed_raw
from test_cli import mh

from device_agents.device import Device
from device_agents.keys import latest_rechains
from meshhealth.crypto.keys import Identity, save_identity
from meshhealth.sharing.keychain import KeyChain, epoch_of
from meshhealth.wire import EnrollDevice, Reading, Rechain, RemoveDevice, decode_control
from meshhealth.wire.codec import unpack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
EPOCH = 60_000  # one-minute key epochs: a rechain's chain starts within a minute of now
MIN = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def patient_file(path: Path) -> tuple[Identity, KeyChain]:
    """A patient whose hr key chain began half an hour ago (room for an import window)."""
    patient = Identity.generate("patient")
    chain = KeyChain.new("hr", epoch_of(now_ms(), EPOCH) - 30, EPOCH)
    save_identity(patient, path, extra={"keychains": [chain.to_doc()]})
    return patient, chain


def enrol(pkey: Path, node: Any, dev: Device, out: Path, *extra: str) -> EnrollDevice:
    r = mh(
        "patient", "enroll-device", "--key", str(pkey), "--device", dev.id.hex(),
        "--node", node.url, "--out", str(out), *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tx = decode_control(out.read_bytes())
    assert isinstance(tx, EnrollDevice)
    dev.accept_enrollment(tx)
    return tx


def one(dev: Device, t_ms: int, value: float = 70.0) -> bytes:
    ((_, raw),) = dev.readings("hr", [(t_ms, (value,))])
    return raw


def signed_only(dev: Device, t_ms: int) -> bytes:
    """A reading the device's signing key makes for any time: valid signature, stream, key
    chain and epoch, but a ciphertext of zeros (what a stolen key can forge)."""
    cur = dev.cursors["hr"]
    seq = dev.next_seq
    dev.next_seq += 1
    return Reading.create(
        dev.identity.signing, patient=dev.patient, stream="hr", seq=seq, t_ms=t_ms, span_ms=0,
        chain_id=cur.chain_id, epoch=t_ms // cur.epoch_ms, nonce=bytes(24), ciphertext=bytes(40),
    ).encode()  # fmt: skip


async def publish(port: int, items: list[tuple[Device, bytes]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as c:
        for dev, raw in items:
            await c.publish(f"mh/v1/readings/{dev.id.hex()}", raw, qos=1)


async def until(node: Any, pred: Any, what: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = (await asyncio.to_thread(node.status))["ingest"]
        if pred(st):
            return st  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {st}")
        await asyncio.sleep(0.2)


def key_txs(node: Any, patient: Identity) -> list[Any]:
    """The patient's enrolments, as the patient lists them (signed: nobody else may)."""
    path = f"/v1/patients/{patient.public.hex()}/enrollments"
    status, body = signed_raw(patient, node.url, path)
    assert status == 200, body
    return [decode_control(raw) for raw in unpack(body, max_len=1 << 24)]


@pytest.mark.timeout(120)
async def test_a_removed_device_is_cut_off_and_backdated_readings_are_refused(
    mosquitto, node_factory, tmp_path
):
    node = node_factory(mosquitto.url)
    pkey = tmp_path / "patient.key"
    patient, _ = patient_file(pkey)
    stolen = Device(Identity.generate("device"), patient.public)
    kept = Device(Identity.generate("device"), patient.public)
    e_stolen = enrol(pkey, node, stolen, tmp_path / "stolen.tx")  # E1: from now on
    t_e = e_stolen.ts_ms
    assert e_stolen.import_from_ms is None and e_stolen.encode()[1:4] == b"\xa2E1"
    e_kept = enrol(pkey, node, kept, tmp_path / "kept.tx", "--import-from", str(t_e - 10 * MIN))
    assert e_kept.import_from_ms == t_e - 10 * MIN and e_kept.encode()[1:4] == b"\xa2E2"

    await asyncio.sleep(0.3)
    await publish(
        mosquitto.port,
        [
            (stolen, one(stolen, now_ms())),  # after its enrolment: stored
            (stolen, signed_only(stolen, t_e - 5 * MIN)),  # backdated: refused
            (kept, one(kept, t_e - 5 * MIN)),  # inside its import window: stored
        ],
    )
    st = await until(node, lambda s: s["readings_committed"] == 2, "two readings stored")
    assert st["rejects"].get("before_enrollment") == 1, st["rejects"]

    # the thief has the device: the patient removes it
    r = mh(
        "patient", "remove-device", "--key", str(pkey), "--device", stolen.id.hex(),
        "--node", node.url, "--switch-after", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "new key chain" in r.stdout and "sealed to 1 device(s)" in r.stdout, r.stdout

    def listed() -> tuple[list[RemoveDevice], dict[str, Rechain]]:
        txs = key_txs(node, patient)
        removals = [t for t in txs if isinstance(t, RemoveDevice)]
        return removals, latest_rechains([t.encode() for t in txs], patient.public)

    deadline = time.monotonic() + 20
    while not all(listed()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    removals, rechains = listed()
    assert [d.device for d in removals] == [stolen.id]
    rc = rechains["hr"]
    # the new chain is sealed to the remaining device only: the stolen key cannot open it
    assert [k.to for k in rc.devices] == [kept.id]
    assert not stolen.accept_rechain(rc)
    assert kept.accept_rechain(rc)

    await asyncio.sleep(max(0.0, (rc.ts_ms - now_ms()) / 1000) + 0.2)  # the switch is past
    committed = (await asyncio.to_thread(node.status))["ingest"]["readings_committed"]
    await publish(
        mosquitto.port,
        [
            (stolen, one(stolen, now_ms())),  # the stolen key's new reading: refused
            (stolen, one(stolen, now_ms() + 1000)),
            # backdated into [enrolment, removal) with a new seq, on the old chain: refused
            # too (issue 11: a removal refuses every new reading of the device)
            (stolen, signed_only(stolen, t_e + 1000)),
            (kept, one(kept, now_ms())),  # the kept device, on the new chain: stored
        ],
    )
    st = await until(
        node, lambda s: s["rejects"].get("removed_device", 0) >= 3, "the stolen key refused"
    )
    st = await until(node, lambda s: s["readings_committed"] == committed + 1, "kept stored")
    assert st["rejects"]["removed_device"] == 3, st["rejects"]
    assert Reading.decode(one(kept, now_ms())).chain_id == rc.chain_id


@pytest.mark.timeout(120)
async def test_a_fetch_skips_and_reports_a_reading_that_does_not_decrypt(
    mosquitto, node_factory, tmp_path
):
    node = node_factory(mosquitto.url)
    pkey = tmp_path / "patient.key"
    patient, _ = patient_file(pkey)
    dev = Device(Identity.generate("device"), patient.public)
    t_e = enrol(pkey, node, dev, tmp_path / "dev.tx", "--import-from", "0").ts_ms
    good = [one(dev, t_e - k * MIN, 60.0 + k) for k in (6, 5, 3)]
    garbage = signed_only(dev, t_e - 4 * MIN)  # signed by the enrolled device; no plaintext
    await publish(mosquitto.port, [(dev, x) for x in (*good, garbage)])
    await until(node, lambda s: s["readings_committed"] == 4, "four readings stored")
    await asyncio.sleep(1.2)  # the block holding them is sealed and indexed

    span = ["--from", str(t_e - 10 * MIN), "--to", str(t_e + MIN)]
    fetch = [
        "provider", "fetch", "--key", str(pkey), "--patient", patient.public.hex(),
        "--stream", "hr", *span, "--node", node.url, "--workers", "0",
    ]  # fmt: skip
    out = mh(*fetch, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 3, out.stdout
    assert "1 skipped" in out.stderr and "warning: 1 reading(s)" in out.stderr, out.stderr
    table = mh(*fetch, "--format", "table")
    assert table.returncode == 0, table.stderr
    assert "# warning: 1 reading(s)" in table.stdout, table.stdout
    fhir = mh(*fetch, "--format", "fhir")
    assert fhir.returncode == 0, fhir.stderr
    assert fhir.stdout.count('"Observation"') == 3, fhir.stdout[:2000]
