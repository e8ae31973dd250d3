"""The key epoch: kept next to the CA (a file under ``--ca-dir``, a ConfigMap next to
``--ca-secret``, the latter against the fake API server), raised by ``rotate_all`` and
followed by every replica, so a suspected compromise is never answered by deriving the
same keys again, neither by another replica nor after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from bench.wait import eventually
from mtls.ca import CertificateAuthority
from mtls.epoch import (
    CONFIGMAP_SUFFIX,
    EPOCH_FILE,
    EPOCH_KEY,
    ConfigMapEpoch,
    DirectoryEpoch,
    EpochError,
    EpochStore,
    epoch_store,
)
from mtls.identity import Identity
from mtls.secrets import SecretStore
from tests.mesh.fake_apiserver import core_v1

TD = "cluster.local"
LLAMA, CHAT = Identity("default", "llama"), Identity("default", "chat")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def _wire(store: SecretStore, identity: Identity) -> list[bytes]:
    return [s.SerializeToString() for s in store.bundle(identity).secrets]


# ----------------------------------------------------------------------------- stores


async def test_directory_epoch_rises_and_never_falls(tmp_path: Path) -> None:
    epochs = DirectoryEpoch(tmp_path)
    assert await epochs.read() == 0  # never rotated
    assert await epochs.advance(0) == 1
    assert (tmp_path / EPOCH_FILE).read_text() == "1\n"
    # A second replica signalled at epoch 0 finds 1 already stored: past 0, it is kept.
    assert await DirectoryEpoch(tmp_path).advance(0) == 1
    assert await epochs.advance(1) == 2
    assert await epochs.advance(7) == 8 and await DirectoryEpoch(tmp_path).read() == 8


@pytest.mark.parametrize("text", ["x", "-1", "1.5", "", "٣", "9" * 30])
async def test_a_damaged_epoch_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / EPOCH_FILE).write_text(text)
    with pytest.raises(EpochError, match="not a key epoch"):
        await DirectoryEpoch(tmp_path).read()
    with pytest.raises(EpochError, match="not a key epoch"):
        await DirectoryEpoch(tmp_path).advance(0)
    assert (tmp_path / EPOCH_FILE).read_text() == text  # left for the operator to mend


async def test_configmap_epoch_is_created_then_replaced() -> None:
    async with core_v1() as (fake, api):
        epochs = ConfigMapEpoch(api, "inferlane", "inferlane-ca" + CONFIGMAP_SUFFIX)
        assert await epochs.read() == 0
        assert await epochs.advance(0) == 1
        assert await epochs.advance(1) == 2
        (stored,) = fake.objects("ConfigMap")
        assert stored["metadata"]["name"] == "inferlane-ca-key-epoch"
        assert stored["metadata"]["namespace"] == "inferlane"
        assert stored["data"] == {EPOCH_KEY: "2"}
        assert await ConfigMapEpoch(api, "inferlane", "inferlane-ca-key-epoch").read() == 2


async def test_replicas_raising_the_epoch_together_raise_it_once() -> None:
    """Every replica signalled at once (kill -USR1 on each pod): the creates and updates
    race, the API server's preconditions settle them, and all agree on one epoch."""
    async with core_v1() as (fake, api):
        replicas = [ConfigMapEpoch(api, "inferlane", "ca-key-epoch") for _ in range(4)]
        assert await asyncio.gather(*(r.advance(0) for r in replicas)) == [1, 1, 1, 1]
        assert await asyncio.gather(*(r.advance(1) for r in replicas)) == [2, 2, 2, 2]
        (stored,) = fake.objects("ConfigMap")
        assert stored["data"] == {EPOCH_KEY: "2"}


async def test_configmap_epoch_errors_are_epoch_errors() -> None:
    async with core_v1() as (fake, api):
        epochs = ConfigMapEpoch(api, "inferlane", "ca-key-epoch")
        fake.fail_next(1, status=403)
        with pytest.raises(EpochError, match=r"403 .*Role must allow get and update"):
            await epochs.read()
        await fake.put(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "ca-key-epoch", "namespace": "inferlane"},
                "data": {EPOCH_KEY: "seven"},
            }
        )
        with pytest.raises(EpochError, match="ConfigMap inferlane/ca-key-epoch holds 'seven'"):
            await epochs.read()


def test_the_store_follows_the_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "mesh")
    api: Any = object()
    by_secret = epoch_store(ca_secret="inferlane-ca", ca_dir=tmp_path, configmaps=api)
    assert by_secret is not None and by_secret.where == "ConfigMap mesh/inferlane-ca-key-epoch"
    other = epoch_store(ca_secret="certs/root", configmaps=api)
    assert other is not None and other.where == "ConfigMap certs/root-key-epoch"
    by_dir = epoch_store(ca_dir=tmp_path)
    assert by_dir is not None and by_dir.where == str(tmp_path / EPOCH_FILE)
    assert epoch_store() is None


# ----------------------------------------------------------------------------- the secret store


async def _replica(ca: CertificateAuthority, epochs: EpochStore, **kw: Any) -> SecretStore:
    """A control plane's secret store as ``inferlane serve`` makes it: the stored epoch
    read first, over its own copy of the CA."""
    copy = CertificateAuthority.from_secret_data(ca.secret_data())
    return SecretStore(copy, TD, epochs=epochs, epoch=await epochs.read(), **kw)


async def test_rotate_all_gives_new_keys_that_replicas_and_restarts_keep(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    a = await _replica(ca, DirectoryEpoch(tmp_path))
    b = await _replica(ca, DirectoryEpoch(tmp_path))
    before = {i: _wire(a, i) for i in (LLAMA, CHAT)}
    assert {i: _wire(b, i) for i in (LLAMA, CHAT)} == before

    changes: list[int] = []
    a.on_change = lambda: changes.append(1)
    assert await a.rotate_all() == 2 and changes == [1] and a.epoch == 1
    rotated = {i: _wire(a, i) for i in (LLAMA, CHAT)}
    for identity in (LLAMA, CHAT):
        assert rotated[identity][0] != before[identity][0]  # default: a new key
        assert rotated[identity][1] == before[identity][1]  # ROOTCA: the same CA

    # The other replica reads the new epoch and derives the very same new certificates.
    assert await b.follow_epoch() == 2 and b.epoch == 1
    assert {i: _wire(b, i) for i in (LLAMA, CHAT)} == rotated
    assert await b.follow_epoch() == 0  # nothing new
    # A restart reads it before issuing anything: the compromised keys never come back.
    restarted = await _replica(ca, DirectoryEpoch(tmp_path))
    assert restarted.epoch == 1 and _wire(restarted, LLAMA) == rotated[LLAMA]
    assert restarted.describe()["key_epoch"] == 1


async def test_a_running_replica_follows_within_the_poll_interval(
    ca: CertificateAuthority,
) -> None:
    async with core_v1() as (_fake, api):
        a = await _replica(ca, ConfigMapEpoch(api, "inferlane", "ca-key-epoch"))
        b = await _replica(ca, ConfigMapEpoch(api, "inferlane", "ca-key-epoch"), epoch_poll_s=0.05)
        before = _wire(b, LLAMA)
        changed = asyncio.Event()
        b.on_change = changed.set
        task = asyncio.create_task(b.run(lambda: {LLAMA}))
        try:
            await a.rotate_all()
            async with asyncio.timeout(10):
                await changed.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert b.epoch == 1 and _wire(b, LLAMA) == _wire(a, LLAMA) != before


async def test_rotating_when_the_epoch_cannot_be_stored_still_rotates_here(
    ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / EPOCH_FILE).write_text("garbage")
    store = SecretStore(ca, TD, epochs=DirectoryEpoch(tmp_path), epoch=3)
    before = _wire(store, LLAMA)
    with caplog.at_level(logging.ERROR, logger="mtls.secrets"):
        assert await store.rotate_all() == 1
    assert store.epoch == 4 and _wire(store, LLAMA) != before
    assert "is this process's alone" in caplog.text
    # A failed poll changes nothing, and says so once, not at every poll.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtls.secrets"):
        assert await store.follow_epoch() == 0 and await store.follow_epoch() == 0
    assert store.epoch == 4
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


async def test_a_store_without_an_epoch_store_rotates_in_memory(ca: CertificateAuthority) -> None:
    store = SecretStore(ca, TD)
    before = _wire(store, LLAMA)
    assert await store.rotate_all() == 1 and store.epoch == 1
    assert _wire(store, LLAMA) != before
    assert await store.follow_epoch() == 0


async def test_poll_is_bounded_by_its_interval(ca: CertificateAuthority, tmp_path: Path) -> None:
    """run() reads the stored epoch about once per interval, not in a loop."""
    reads = 0

    class Counting(DirectoryEpoch):
        async def read(self) -> int:
            nonlocal reads
            reads += 1
            return await super().read()

    store = SecretStore(ca, TD, epochs=Counting(tmp_path), epoch_poll_s=0.1)
    store.bundle(LLAMA)
    task = asyncio.create_task(store.run(lambda: {LLAMA}))

    async def polled() -> bool:
        return reads >= 3

    try:
        await eventually(polled, timeout=10, what="three polls")
        seen = reads
        await asyncio.sleep(0.25)
        assert reads - seen <= 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
