"""xdist's distributed session, with the fleet's hosts as its workers.

Three small subclasses of xdist's own machinery (xdist has no hook to
replace them): the session provisions the hosts before the workers start and
never restarts a worker on a host that is down; the node manager never
rsyncs (the hosts were provisioned); a remote worker is started with its
own command line, pointing at its host's copy of the tests.
"""

from __future__ import annotations

from typing import Any

import execnet
import pytest
from xdist.dsession import DSession  # type: ignore[import-untyped]
from xdist.workermanage import Marker, NodeManager, WorkerController  # type: ignore[import-untyped]

from .controller import Fleet, FleetError, Remote
from .hosts import Host


class FleetSession(DSession):  # type: ignore[misc]
    def __init__(self, config: pytest.Config, fleet: Fleet) -> None:
        super().__init__(config)
        self.fleet = fleet
        self._why_down: dict[Any, object | None] = {}

    def host_of(self, node: Any) -> Host:
        return self.fleet.host_of_spec(node.gateway.spec)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        try:
            self.fleet.provision()
        except (FleetError, ValueError, RuntimeError) as e:
            raise pytest.UsageError(f"vmpilot fleet: {e}") from None
        if self.fleet.bundled:
            seconds, wheels, files = self.fleet.bundled
            self.report_line(
                f"vmpilot fleet: {wheels} wheels and {files} test files ready in {seconds:.1f} s"
            )
        for r in self.fleet.remotes.values():
            self.report_line(
                f"vmpilot fleet: {r.host.name} ready in {r.seconds:.1f} s "
                f"({r.cores} cores, {self.fleet.workers(r.host)} workers, {r.qemu}; "
                f"installed {len(r.installed)} wheel(s))"
            )
        # xdist's schedulers count the workers from --tx
        self.config.option.tx = self.fleet.specs()
        self.nodemanager = FleetNodeManager(self.config, self.fleet)
        nodes = self.nodemanager.setup_nodes(putevent=self.queue.put)
        self._active_nodes.update(nodes)
        self._session = session

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        super().pytest_sessionfinish()
        for i, note in enumerate(self.fleet.finish()):
            self.report_line(("\n" if i == 0 else "") + "vmpilot fleet: " + note)

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["vmpilot_fleet"] = self.fleet.worker_info(self.host_of(node))

    def worker_errordown(self, node: Any, error: object | None) -> None:
        host = self.host_of(node)
        self._why_down[node] = error
        if not host.local and host.name not in self.fleet.down:
            why = self.fleet.probe(host)
            if why:
                self.fleet.down[host.name] = why
                self.report_line(
                    f"\nvmpilot fleet: host {host.name} is down ({why}); "
                    "its queued tests go to the other hosts"
                )
        if host.name not in self.fleet.down:
            super().worker_errordown(node, error)  # a crash: xdist replaces the worker
            return
        # the host is gone: fail the test it ran, requeue the rest elsewhere, and
        # neither restart the worker nor count it against --max-worker-restart
        self.config.hook.pytest_testnodedown(node=node, error=error)
        try:
            crashitem = self.sched.remove_node(node)
        except KeyError:
            pass
        else:
            if crashitem:
                self.handle_crashitem(crashitem, node)
        self._active_nodes.remove(node)

    @pytest.hookimpl
    def pytest_handlecrashitem(self, crashitem: str, report: Any, sched: Any) -> None:
        node = report.node
        host = self.host_of(node)
        if host.name in self.fleet.down:
            report.longrepr = (
                f"host {host.name} went down while running {crashitem} "
                f"(worker {node.gateway.id}): {self.fleet.down[host.name]}"
            )
        else:
            report.longrepr = (
                f"worker {node.gateway.id} on host {host.name} crashed while running "
                f"{crashitem}: {self._why_down.get(node)}"
            )

    def _clone_node(self, node: Any) -> Any:
        host = self.host_of(node)
        if host.name in self.fleet.down:
            return None
        try:
            return super()._clone_node(node)
        except (execnet.HostNotFound, OSError, EOFError) as e:
            self.fleet.down[host.name] = f"{type(e).__name__}: {e}"
            self.report_line(f"vmpilot fleet: cannot restart a worker on {host.name}: {e}")
            return None


class FleetNodeManager(NodeManager):  # type: ignore[misc]
    def __init__(self, config: pytest.Config, fleet: Fleet) -> None:
        self.fleet = fleet
        super().__init__(config, specs=fleet.specs())

    def _getrsyncdirs(self) -> list[Any]:
        return []  # the hosts were provisioned: nothing to rsync

    def setup_node(self, spec: Any, putevent: Any) -> Any:
        host = self.fleet.host_of_spec(spec)
        if host.local:
            return super().setup_node(spec, putevent)
        if getattr(spec, "execmodel", None) != "main_thread_only":
            spec = execnet.XSpec(f"execmodel=main_thread_only//{spec}")
        gw = self.group.makegateway(spec)
        self.config.hook.pytest_xdist_newgateway(gateway=gw)
        node = RemoteWorker(self, gw, self.config, putevent, self.fleet.remotes[host.name])
        gw.node = node
        node.setup()
        return node


class RemoteWorker(WorkerController):  # type: ignore[misc]
    """A worker on a fleet host: its arguments name the host's copy of the
    tests (xdist would map them onto rsync roots), its tmp dir is in the
    host's run directory."""

    def __init__(self, nodemanager: Any, gateway: Any, config: Any, putevent: Any, remote: Remote):
        super().__init__(nodemanager, gateway, config, putevent)
        self.remote = remote

    def setup(self) -> None:
        self.gateway._rinfo()
        self.config.hook.pytest_configure_node(node=self)
        module = self.config.hook.pytest_xdist_getremotemodule()
        self.channel = self.gateway.remote_exec(module)
        basetemp = f"{self.remote.run_dir}/tmp/{self.gateway.id}"
        argv = self.nodemanager.fleet.remote_argv(self.remote)
        # the message xdist.remote expects: (workerinput, args, options, sys.path or None)
        self.channel.send((self.workerinput, argv, {"basetemp": basetemp}, None))
        if self.putevent:
            self.channel.setcallback(self.process_from_remote, endmarker=Marker.END)
