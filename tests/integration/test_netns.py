"""Stages on separate hosts: every server in its own network namespace, with its own address.

Topology (tests/netns.py): the orchestrator on one host, code2wav on another, and the encoder
stage with two replicas on two more; the test process reaches them over a bridge. The stages
are torch stages (code2wav, then tests/encoder.py): real engines and real gRPC, light enough
to start five processes in seconds. Links are cut with `ip link set ... down`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import omnistage
from omnistage.errors import StageUnavailableError
from omnistage.launch import ServerProcess, stage_args
from omnistage.tensors import tensor_to_numpy
from omnistage.types import PipelineOutput, ProfileReport
from tests import netns
from tests.encoder import SLOW_STEP_LOG
from tests.waiting import wait_for_log, wait_until

REASON = netns.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")

CODES = list(range(0, 1000, 20))  # 50 codes: one second of audio, 50 feature rows
STAGE_OPTIONS = json.dumps({"max_batch_size": 4, "max_wait_ms": 2, "num_threads": 1})


class Topology:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts = netns.Hosts()
        self.processes: list[ServerProcess] = []
        self.orchestrator: ServerProcess | None = None
        self.orchestrator_host = self.hosts.add("orch")
        self.code2wav_host = self.hosts.add("code2wav")
        self.encoder_hosts = [self.hosts.add("enc-a"), self.hosts.add("enc-b")]
        self.laptop = self.hosts.add("laptop")  # a client alone on its host, sharing no disk

    def stage(self, host: netns.Host, name: str, model: str) -> ServerProcess:
        profiler = {"profiler": "torch", "torch_profiler_dir": str(self.tmp / host.name)}
        args = stage_args(name=name, engine="torch", model=model, host="0.0.0.0")
        args += ["--profiler-config", json.dumps(profiler), "--engine-options", STAGE_OPTIONS]
        process = ServerProcess(
            f"{name} on {host.name}",
            args,
            log_path=self.tmp / f"{host.name}.log",
            prefix=host.exec_prefix,
            connect_host=host.address,
        )
        self.processes.append(process)
        return process

    def start(self) -> None:
        stages = [self.stage(self.code2wav_host, "code2wav", "examples.omni.code2wav:build")]
        stages += [self.stage(h, "encoder", "tests.encoder:build") for h in self.encoder_hosts]
        with ThreadPoolExecutor(len(stages)) as pool:
            code2wav, *encoders = pool.map(lambda p: p.wait_serving(timeout=120), stages)
        pipeline = self.tmp / "pipeline.yaml"
        pipeline.write_text(
            "name: hosts\noutputs: all\nhealth_interval_s: 0.5\nstages:\n"
            f"  - name: code2wav\n    address: {code2wav}\n"
            f"  - name: encoder\n    addresses: [{', '.join(encoders)}]\n"
            "    input: {processor: 'tests.encoder:audio_in'}\n"
        )
        orchestrator = ServerProcess(
            "orchestrator",
            ["orchestrator", "serve", "--pipeline", str(pipeline), "--port", "0"],
            log_path=self.tmp / "orchestrator.log",
            prefix=self.orchestrator_host.exec_prefix,
            connect_host=self.orchestrator_host.address,
        )
        self.processes.append(orchestrator)
        orchestrator.wait_serving(timeout=60)
        self.orchestrator = orchestrator

    def close(self) -> None:
        try:
            for process in reversed(self.processes):
                process.stop(timeout=20)
        finally:
            self.hosts.close()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    topology = Topology(tmp_path_factory.mktemp("hosts"))
    try:
        topology.start()
        yield topology
    finally:
        topology.close()


@pytest.fixture(scope="module")
def client(topology: Topology) -> Iterator[omnistage.Client]:
    assert topology.orchestrator is not None
    with omnistage.Client(topology.orchestrator.address) as client:
        yield client


def run(
    client: omnistage.Client, request_id: str = "", timeout: float = 60
) -> list[PipelineOutput]:
    return list(client.generate(token_ids=CODES, request_id=request_id, timeout=timeout))


def expected_features() -> np.ndarray[Any, Any]:
    import torch

    from examples.omni.code2wav import build as build_code2wav
    from tests.encoder import build as build_encoder

    with torch.no_grad():
        audio = build_code2wav({}).module(torch.tensor([CODES]))
        return build_encoder({}).module(audio.reshape(1, -1))[0].numpy()


def wait_until_served(client: omnistage.Client, *, within_s: float) -> list[PipelineOutput]:
    def served() -> list[PipelineOutput]:
        try:
            return run(client, timeout=10)
        except StageUnavailableError:
            return []

    return wait_until(served, timeout=within_s, what="the pipeline to serve again")


def encoder_replicas(outputs: list[PipelineOutput]) -> set[str]:
    return {o.replica.rsplit(":", 1)[0] for o in outputs if o.stage == "encoder"}


def test_a_request_crosses_three_hosts(topology: Topology, client: omnistage.Client) -> None:
    outputs = run(client)
    audio = [o for o in outputs if o.stage == "code2wav" and o.tensor is not None]
    features = [o for o in outputs if o.stage == "encoder" and o.tensor is not None]
    assert sum(int(np.prod(o.tensor.shape)) for o in audio if o.tensor) == len(CODES) * 480
    assert len(features) == 1 and features[0].tensor is not None
    got = tensor_to_numpy(features[0].tensor)
    np.testing.assert_allclose(got, expected_features(), atol=1e-5)
    assert {o.replica.rsplit(":", 1)[0] for o in audio} == {topology.code2wav_host.address}
    assert encoder_replicas(outputs) <= {h.address for h in topology.encoder_hosts}


def test_requests_go_to_both_encoder_replicas(topology: Topology, client: omnistage.Client) -> None:
    used: set[str] = set()
    for _ in range(4):
        used |= encoder_replicas(run(client))
    assert used == {h.address for h in topology.encoder_hosts}


@pytest.fixture(scope="module")
def profiled(client: omnistage.Client) -> ProfileReport:
    """A session of both stages, all three replicas, collected on the orchestrator's host."""
    client.start_profile(stages=["code2wav", "encoder"], label="hosts")
    for _ in range(4):
        run(client)
    return client.stop_profile(output_dir="hosts")


def test_profile_two_stages_across_hosts_and_both_replicas(
    topology: Topology, profiled: ProfileReport
) -> None:
    report = profiled
    session = Path(report.output_dir)
    by_stage: dict[str, list[Any]] = {}
    for result in report.stages:
        by_stage.setdefault(result.stage, []).append(result)
    assert sorted(by_stage) == ["code2wav", "encoder"]
    replicas = {r.replica.rsplit(":", 1)[0] for r in by_stage["encoder"]}
    assert replicas == {h.address for h in topology.encoder_hosts}
    for result in report.stages:
        folder = Path(result.local_dir)
        expected = session / result.stage
        if result.stage == "encoder":
            expected = expected / result.replica.replace(":", "_")
        assert folder == expected
        traces = [f for f in result.files if f.name.endswith(".pt.trace.json.gz")]
        assert traces, f"no trace from {result.stage} {result.replica}"
        for item in result.files:
            data = (folder / item.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == item.sha256
    record = json.loads((session / "report.json").read_text())
    assert {k for k in record["clocks"] if k.startswith("encoder/")} == {
        f"encoder/{r.replica.replace(':', '_')}" for r in by_stage["encoder"]
    }
    assert report.timeline and Path(report.timeline).is_file()


def test_a_replica_behind_a_cut_link_is_skipped(
    topology: Topology, client: omnistage.Client
) -> None:
    down, up = topology.encoder_hosts
    topology.hosts.cut(down)
    try:
        for _ in range(4):
            assert encoder_replicas(run(client, timeout=30)) == {up.address}
    finally:
        topology.hosts.restore(down)
    deadline = time.monotonic() + 30
    used: set[str] = set()
    while used != {down.address, up.address}:
        assert time.monotonic() < deadline, f"{down.address} not used again after the restore"
        used |= encoder_replicas(run(client))


def test_a_cut_link_gives_unavailable_naming_the_stage_then_serves_again(
    topology: Topology, client: omnistage.Client
) -> None:
    host = topology.code2wav_host
    topology.hosts.cut(host)
    try:
        started = time.monotonic()
        with pytest.raises(StageUnavailableError, match="code2wav") as caught:
            run(client, timeout=30)
        assert time.monotonic() - started < 15
        assert host.address in str(caught.value)
    finally:
        topology.hosts.restore(host)
    outputs = wait_until_served(client, within_s=30)
    assert outputs[-1].stage == "encoder" and outputs[-1].finished


def test_a_link_cut_mid_request_gives_unavailable_naming_the_stage(
    topology: Topology, client: omnistage.Client
) -> None:
    # The slow request holds an encoder step; both encoder links go down while it runs.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run, client, "slow-1", 60)
        logs = [topology.tmp / f"{host.name}.log" for host in topology.encoder_hosts]
        wait_for_log(logs, SLOW_STEP_LOG, timeout=30)  # one encoder holds the slow step now
        started = time.monotonic()
        for host in topology.encoder_hosts:
            topology.hosts.cut(host)
        try:
            with pytest.raises(StageUnavailableError, match="stage 'encoder'"):
                pending.result()
            assert time.monotonic() - started < 25
        finally:
            for host in topology.encoder_hosts:
                topology.hosts.restore(host)
    outputs = wait_until_served(client, within_s=40)
    assert outputs[-1].stage == "encoder" and outputs[-1].finished


def files_below(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fetch_from_laptop(topology: Topology, session: str, to: Path) -> subprocess.Popen[str]:
    """`omnistage profile fetch`, run on the laptop host: everything it gets comes by gRPC."""
    assert topology.orchestrator is not None
    command = [*topology.laptop.exec_prefix, sys.executable, "-m", "omnistage.cli"]
    command += ["profile", "fetch", session, "--to", str(to)]
    command += ["--address", topology.orchestrator.address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_client_on_another_host_downloads_the_whole_session(
    topology: Topology, profiled: ProfileReport, tmp_path: Path
) -> None:
    fetch = fetch_from_laptop(topology, profiled.session_id, tmp_path)
    out, err = fetch.communicate(timeout=120)
    assert fetch.returncode == 0, err
    assert "sha256 checked" in out
    local = tmp_path / profiled.session_id
    remote = Path(profiled.output_dir)
    assert files_below(local) == files_below(remote)
    assert {n.split("/")[0] for n in files_below(local)} >= {"code2wav", "encoder", "report.json"}
    traces = [n for n in files_below(local) if n.endswith(".pt.trace.json.gz")]
    assert len(traces) >= 3  # code2wav and both encoder replicas


def test_a_download_cut_by_a_link_drop_resumes(
    topology: Topology, profiled: ProfileReport, tmp_path: Path
) -> None:
    remote = Path(profiled.output_dir)
    big = remote / "encoder" / "large-trace.bin"  # a GPU-sized file beside the real traces
    big.write_bytes(os.urandom(24 << 20))
    # 40 Mbit/s towards the laptop: the file takes about 5 s, long enough to cut the link.
    link = topology.laptop.link
    shape = f"tc qdisc add dev {link} root tbf rate 40mbit burst 64kb latency 2s"
    subprocess.run(shape.split(), check=True)
    try:
        fetch = fetch_from_laptop(topology, profiled.session_id, tmp_path)
        part = tmp_path / profiled.session_id / "encoder" / "large-trace.bin.part"

        def under_way() -> bool:
            assert fetch.poll() is None, fetch.communicate()
            return part.exists() and part.stat().st_size > 2 << 20

        wait_until(under_way, timeout=60, what="2 MiB of the large file on the laptop")
        topology.hosts.cut(topology.laptop)
        assert fetch.stderr is not None
        seen: list[str] = []
        try:
            for line in fetch.stderr:  # the client says when it finds the link dead
                seen.append(line)
                if "resuming" in line:
                    break
        finally:
            topology.hosts.restore(topology.laptop)
        assert any("cut at" in line for line in seen), "".join(seen)
        _, err = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, "".join(seen) + err
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", link, "root"], capture_output=True)
        big.unlink()
    local = tmp_path / profiled.session_id
    assert (local / "encoder" / "large-trace.bin").stat().st_size == 24 << 20
    assert not part.exists()
    expected = files_below(remote)
    expected["encoder/large-trace.bin"] = (local / "encoder" / "large-trace.bin").read_bytes()
    assert files_below(local) == expected
